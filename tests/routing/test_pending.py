"""PendingPrefixes: prefixes routed to a worker count as cached there until their KV events can have arrived."""

from __future__ import annotations

import pytest

from dynamo_ext.routing import PendingPrefixes


def test_match_is_the_longest_leading_run_per_worker_until_the_ttl():
    p = PendingPrefixes(ttl_s=5.0)
    p.add(1, [10, 11, 12, 13], now=0.0)
    p.add(2, [10, 11, 99], now=1.0)
    p.add(1, [10, 20], now=1.0)
    assert p.match([10, 11, 12, 40], now=2.0) == {1: 3, 2: 2}
    assert p.match([50, 11], now=2.0) == {}
    assert p.match([10, 11, 12, 40], now=5.5) == {1: 1, 2: 2}  # the first entry expired
    p.forget(2)
    assert p.match([10, 11], now=5.5) == {1: 1}
    assert p.match([10], now=6.5) == {} and len(p) == 0


def test_bounds():
    p = PendingPrefixes(ttl_s=100.0, max_entries=2)
    for w in range(5):
        p.add(w, [w], now=0.0)
    assert len(p) == 2 and p.match([4], now=0.0) == {4: 1}
    with pytest.raises(ValueError):
        PendingPrefixes(ttl_s=0)
