"""A stand-in that makes ``import nixl`` fail (tests: a machine without NIXL)."""

raise ImportError("nixl is hidden for this test (tests/serving/hide_nixl)")
