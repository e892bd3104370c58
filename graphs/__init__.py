"""Graph definitions for `dynamo-ext serve` (see README.md)."""
