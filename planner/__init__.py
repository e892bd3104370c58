"""Dynamo planner plugins for dynamo_ext (see README.md). Pure policies: no KV bytes, no NIXL, no torch."""
