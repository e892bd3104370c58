"""The plan LRU of the product's transfer path (plan.PLAN_CACHE via transfer.default_planner): a second
identical pull does not plan again and gets the same plan object; another block set does; the cache stays
within its bounds; ids that are not plain integers are never served from it (still refused)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dynamo_ext.transport import InvalidBlocks, KvPool, RemotePool, TransferOptions, copy, preset, pull
from dynamo_ext.transport import plan as planmod
from dynamo_ext.transport.fallbacks import LocalBackend
from dynamo_ext.transport.plan import PLAN_CACHE, PlanCache, plan_transfer
from dynamo_ext.transport.probe import digest, pattern


@pytest.fixture
def counted(monkeypatch):
    """Count real planning calls; start from an empty process cache."""
    calls: list[tuple] = []
    real = planmod.plan_transfer

    def plan(*a, **kw):
        calls.append((tuple(a[1]), tuple(a[3])))
        return real(*a, **kw)

    monkeypatch.setattr(planmod, "plan_transfer", plan)
    PLAN_CACHE.clear()
    yield calls
    PLAN_CACHE.clear()


async def test_second_identical_pull_does_not_plan_again(counted):
    lay = preset("tiny", 64)
    a, b = LocalBackend(f"pc-a-{os.getpid()}"), LocalBackend(f"pc-b-{os.getpid()}")
    try:
        mine, theirs = KvPool.allocate_host("kv", lay), KvPool.allocate_host("kv", lay)
        a.register_pool(mine)
        b.register_pool(theirs)
        pattern(theirs.host_view(), 3)
        a.add_peer(b.local_peer_info())
        remote = RemotePool(b.agent_name, theirs.descriptor())
        rng = np.random.default_rng(0)
        src, dst = [int(x) for x in rng.permutation(64)[:20]], [int(x) for x in rng.permutation(64)[:20]]
        h1 = await pull(a, remote, mine, (src, dst), TransferOptions(metrics=None))
        await h1
        hits = PLAN_CACHE.hits
        mine.host_view().fill(0)
        h2 = await pull(a, remote, mine, (list(src), list(dst)), TransferOptions(metrics=None))  # equal lists
        await h2
        assert len(counted) == 1 and PLAN_CACHE.hits == hits + 1
        assert h2.plan is h1.plan  # the same immutable object: rowcopy's rows cache keys on its arrays
        assert digest(mine.host_view(), lay, dst) == digest(theirs.host_view(), lay, src)  # bytes moved again
        await (await pull(a, remote, mine, (src[:5], dst[:5]), TransferOptions(metrics=None)))
        assert len(counted) == 2  # another block set is planned
        await (await copy(theirs, mine, (src, dst), TransferOptions(metrics=None)))
        assert len(counted) == 2  # same layouts and ids through copy(): the same plan
    finally:
        a.close_sync()
        b.close_sync()


def test_cache_is_bounded_and_lru(counted):
    lay = preset("tiny", 64)
    c = PlanCache(max_entries=3, max_descriptors=10_000)
    for i in range(5):
        c.plan(lay, [i], lay, [i], stage=False)
    assert len(c) == 3 and len(counted) == 5
    c.plan(lay, [2], lay, [2], stage=False)  # still there: a hit, and now the most recent
    assert len(counted) == 5
    c.plan(lay, [5], lay, [5], stage=False)  # evicts the least recent ([3])
    c.plan(lay, [3], lay, [3], stage=False)
    assert len(counted) == 7 and len(c) == 3
    rows = plan_transfer(lay, list(range(64)), lay, list(range(64))[::-1], stage=False)
    small = PlanCache(max_entries=10, max_descriptors=len(rows.wire) - 1)
    small.plan(lay, list(range(64)), lay, list(range(64))[::-1], stage=False)
    assert len(small) == 0 and small.rows == 0  # larger than the descriptor budget: not kept


def test_non_integer_ids_are_never_served_from_the_cache(counted):
    lay = preset("tiny", 64)
    PLAN_CACHE.plan(lay, [1, 2], lay, [3, 4], stage=False)
    with pytest.raises(InvalidBlocks, match="integers"):
        PLAN_CACHE.plan(lay, [1.0, 2.0], lay, [3, 4], stage=False)  # equal to [1, 2] as a tuple key
    with pytest.raises(InvalidBlocks):
        PLAN_CACHE.plan(lay, [1, 2], lay, [3, 99], stage=False)  # out of range: raised, nothing cached
    assert len(PLAN_CACHE) == 1
    n = len(counted)
    first = PLAN_CACHE.plan(lay, np.array([1, 2]), lay, np.array([3, 4]), stage=False)
    assert PLAN_CACHE.plan(lay, np.array([1, 2]), lay, np.array([3, 4]), stage=False) is first
    assert len(counted) == n + 1  # integer arrays are cached too (keyed by their bytes)
