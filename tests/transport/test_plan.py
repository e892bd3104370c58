"""TransferPlan property tests: every byte lands where the layouts say, nothing else is touched.

A NumPy simulator applies a plan to byte arrays (source pool random bytes that never equal the
sentinel, destination pool filled with the sentinel): gather -> wire -> scatter per slice, or wire only.
Staged plans are also run pipelined (scatter(k-2), wire(k-1), gather(k) per step, the order the ring
rules allow), so slices are proven independent and ring-slot reuse is proven safe.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from dynamo_ext.transport.errors import InvalidBlocks, LayoutMismatch
from dynamo_ext.transport.layout import KvLayout, MemoryOrder, preset
from dynamo_ext.transport.plan import (
    Descriptor,
    DescriptorArray,
    TransferPlan,
    TransferSlice,
    plan_naive,
    plan_transfer,
)

SENTINEL = 255

# -- simulator -------------------------------------------------------------------------------------


def _copy(src: np.ndarray, dst: np.ndarray, descs) -> None:
    for s, d, n in descs:
        assert n > 0
        assert 0 <= s and s + n <= src.shape[0], ("read out of bounds", s, n, src.shape[0])
        assert 0 <= d and d + n <= dst.shape[0], ("write out of bounds", d, n, dst.shape[0])
        dst[d : d + n] = src[s : s + n]


def simulate(plan: TransferPlan, src_pool: np.ndarray, dst_pool: np.ndarray, *, pipelined: bool = False) -> None:
    if not plan.staged:
        assert plan.wire_src == plan.wire_dst == "pool"
        _copy(src_pool, dst_pool, plan.wire)
        return
    assert plan.wire_src == plan.wire_dst == "staging"
    sstg = np.zeros(plan.staging_bytes, dtype=np.uint8)
    dstg = np.zeros(plan.staging_bytes, dtype=np.uint8)
    sl = plan.slices
    if not pipelined:
        for g, w, s in sl:
            _copy(src_pool, sstg, g)
            _copy(sstg, dstg, (w,))
            _copy(dstg, dst_pool, s)
        return
    for t in range(len(sl) + 2):
        if 0 <= t - 2 < len(sl):
            _copy(dstg, dst_pool, sl[t - 2].scatter)
        if 0 <= t - 1 < len(sl):
            _copy(sstg, dstg, (sl[t - 1].wire,))
        if t < len(sl):
            _copy(src_pool, sstg, sl[t].gather)


def expected_dst(src_layout, src_blocks, dst_layout, dst_blocks, src_pool) -> np.ndarray:
    exp = np.full(dst_layout.pool_bytes, SENTINEL, dtype=np.uint8)
    cb = src_layout.chunk_bytes
    for s, d in zip(src_blocks, dst_blocks):
        for layer in range(src_layout.num_layers):
            for kv in (0, 1):
                o = src_layout.chunk_offset(s, layer, kv)
                q = dst_layout.chunk_offset(d, layer, kv)
                exp[q : q + cb] = src_pool[o : o + cb]
    return exp


def _no_overlap(descs, key: int) -> bool:
    iv = sorted((d[key], d[key] + d[2]) for d in descs)
    return all(a[1] <= b[0] for a, b in zip(iv, iv[1:]))


def _maximal(descs) -> bool:
    """No two descriptors adjacent in source order could have been merged into one."""
    ds = sorted(descs)
    return not any(a.src_offset + a.nbytes == b.src_offset and a.dst_offset + a.nbytes == b.dst_offset for a, b in zip(ds, ds[1:]))


def check_plan(plan: TransferPlan, src_layout, src_blocks, dst_layout, dst_blocks, seed: int) -> None:
    rng = np.random.default_rng(seed)
    cb = src_layout.chunk_bytes
    total = len(src_blocks) * src_layout.chunks_per_block * cb
    st_ = plan.stats()
    assert st_.bytes == total == plan.total_bytes
    assert st_.chunks == len(src_blocks) * src_layout.chunks_per_block
    assert all(d.nbytes % cb == 0 for d in plan.wire)
    src_pool = rng.integers(0, SENTINEL, src_layout.pool_bytes, dtype=np.uint8)  # never the sentinel
    exp = expected_dst(src_layout, src_blocks, dst_layout, dst_blocks, src_pool)
    runs = [False, True] if plan.staged else [False]
    for pipelined in runs:
        dst_pool = np.full(dst_layout.pool_bytes, SENTINEL, dtype=np.uint8)
        simulate(plan, src_pool, dst_pool, pipelined=pipelined)
        assert np.array_equal(dst_pool, exp), f"bytes misplaced (pipelined={pipelined})"

    if not plan.staged:
        assert _no_overlap(plan.wire, 1), "wire descriptors overlap on the destination"
        assert _maximal(plan.wire)
        assert plan.slices == () and len(plan.gather) == 0 and len(plan.scatter) == 0
        return
    # Staged: slices partition gather/wire/scatter, in order.
    assert [tuple(w) for w in plan.wire] == [tuple(s.wire) for s in plan.slices]
    assert list(plan.gather) == [d for s in plan.slices for d in s.gather]
    assert list(plan.scatter) == [d for s in plan.slices for d in s.scatter]
    slots = plan.staging_slots
    for k, s in enumerate(plan.slices):
        w = s.wire
        assert w.src_offset == w.dst_offset and w.src_offset + w.nbytes <= plan.staging_bytes
        # gather fills exactly the wire's source range, scatter drains exactly its destination range
        assert sum(d.nbytes for d in s.gather) == w.nbytes == sum(d.nbytes for d in s.scatter)
        assert all(w.src_offset <= d.dst_offset and d.dst_offset + d.nbytes <= w.src_offset + w.nbytes for d in s.gather)
        assert all(w.dst_offset <= d.src_offset and d.src_offset + d.nbytes <= w.dst_offset + w.nbytes for d in s.scatter)
        assert _no_overlap(s.gather, 1) and _no_overlap(s.scatter, 1)
        assert _maximal(s.gather) and _maximal(s.scatter)
    # Wire descriptors that may be in flight together never overlap on the destination.
    window = slots if slots else len(plan.slices)
    for k in range(len(plan.slices)):
        assert _no_overlap([s.wire for s in plan.slices[k : k + max(window, 1)]], 1)
    assert _no_overlap(plan.scatter, 1)


# -- strategies ------------------------------------------------------------------------------------

orders = st.sampled_from([MemoryOrder.LAYER_MAJOR, MemoryOrder.BLOCK_MAJOR])


@st.composite
def layout_pair(draw):
    shape = dict(
        num_layers=draw(st.integers(1, 4)),
        num_kv_heads=draw(st.integers(1, 2)),
        head_dim=draw(st.integers(1, 4)),
        block_size=draw(st.integers(1, 3)),
        dtype=draw(st.sampled_from(["uint8", "float16", "float32"])),
    )
    src = KvLayout(num_blocks=draw(st.integers(1, 12)), order=draw(orders), **shape)
    dst = KvLayout(num_blocks=draw(st.integers(1, 12)), order=draw(orders), **shape)
    return src, dst


@st.composite
def transfer_case(draw):
    src, dst = draw(layout_pair())
    n = draw(st.integers(0, min(src.num_blocks, dst.num_blocks)))
    style = draw(st.sampled_from(["random", "consecutive", "shuffled_runs", "repeat_src"]))
    if style in ("consecutive", "shuffled_runs"):  # runs that merge (in request order or not)
        s0 = draw(st.integers(0, src.num_blocks - n))
        d0 = draw(st.integers(0, dst.num_blocks - n))
        src_blocks, dst_blocks = list(range(s0, s0 + n)), list(range(d0, d0 + n))
        if style == "shuffled_runs":
            perm = draw(st.permutations(range(n)))
            src_blocks, dst_blocks = [src_blocks[i] for i in perm], [dst_blocks[i] for i in perm]
    else:
        dst_blocks = draw(st.permutations(range(dst.num_blocks)))[:n]
        if style == "repeat_src":
            src_blocks = draw(st.lists(st.integers(0, src.num_blocks - 1), min_size=n, max_size=n))
        else:
            src_blocks = draw(st.permutations(range(src.num_blocks)))[:n]
    return src, src_blocks, dst, dst_blocks


@st.composite
def plan_options(draw, cb: int, total_chunks: int):
    kw: dict = {"stage": draw(st.sampled_from([None, True, False]))}
    kw["max_wire_descriptors"] = draw(st.integers(1, 8))
    if draw(st.booleans()):
        kw["staging_capacity_bytes"] = draw(st.integers(1, max(1, total_chunks + 2))) * cb + draw(st.integers(0, cb - 1))
    if draw(st.booleans()):
        kw["slice_bytes"] = draw(st.integers(1, max(1, total_chunks)) ) * cb + draw(st.integers(0, cb - 1))
    kw["staging_buffers"] = draw(st.integers(1, 3))
    return kw


def _run_property(data) -> None:
    src, sb, dst, db = data.draw(transfer_case())
    kw = data.draw(plan_options(src.chunk_bytes, len(sb) * src.chunks_per_block))
    plan = plan_transfer(src, sb, dst, db, **kw)
    if kw["stage"] is True:
        assert plan.staged or not sb
    elif kw["stage"] is False:
        assert not plan.staged
    else:
        direct = plan_transfer(src, sb, dst, db, stage=False)
        assert plan.staged == (len(direct.wire) > kw["max_wire_descriptors"])
    if plan.staged and kw.get("staging_capacity_bytes") is not None:
        assert plan.staging_bytes <= kw["staging_capacity_bytes"]
    event(f"{src.order.value}->{dst.order.value}")
    event("staged, ring" if plan.staging_slots else f"staged, {len(plan.slices)} slice(s)" if plan.staged else "direct")
    check_plan(plan, src, sb, dst, db, seed=data.draw(st.integers(0, 2**32 - 1)))
    assert plan == plan_transfer(src, sb, dst, db, **kw)  # deterministic


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=600, **SETTINGS)
@given(st.data())
def test_plan_moves_every_byte(data):
    _run_property(data)


@pytest.mark.soak  # 20,000 cases (40 s on 2 cores); test_plan_moves_every_byte runs 600 of the same in the suite
@settings(max_examples=20_000, **SETTINGS)
@given(st.data())
def test_plan_moves_every_byte_many(data):
    _run_property(data)


@settings(max_examples=300, **SETTINGS)
@given(transfer_case())
def test_naive_plan_moves_every_byte(case):
    src, sb, dst, db = case
    plan = plan_naive(src, sb, dst, db)
    assert len(plan.wire) == len(sb) * src.chunks_per_block
    assert all(d.nbytes == src.chunk_bytes for d in plan.wire)
    check_plan_bytes_only(plan, src, sb, dst, db)


def check_plan_bytes_only(plan, src, sb, dst, db) -> None:
    rng = np.random.default_rng(0)
    src_pool = rng.integers(0, SENTINEL, src.pool_bytes, dtype=np.uint8)
    dst_pool = np.full(dst.pool_bytes, SENTINEL, dtype=np.uint8)
    simulate(plan, src_pool, dst_pool)
    assert np.array_equal(dst_pool, expected_dst(src, sb, dst, db, src_pool))


# -- errors ------------------------------------------------------------------------------------------

MISMATCH_FIELDS = ["num_layers", "num_kv_heads", "head_dim", "block_size", "dtype"]


@settings(max_examples=200, **SETTINGS)
@given(layout_pair(), st.sampled_from(MISMATCH_FIELDS), st.lists(st.integers(-5, 50)), st.lists(st.integers(-5, 50)))
def test_layout_mismatch_is_checked_first(pair, field, sb, db):
    src, dst = pair
    other = {"num_layers": src.num_layers + 1, "num_kv_heads": src.num_kv_heads + 1, "head_dim": src.head_dim + 1,
             "block_size": src.block_size + 1, "dtype": "bfloat16" if src.dtype != "bfloat16" else "float32"}[field]
    import msgspec

    bad = msgspec.structs.replace(dst, **{field: other})
    for stage in (None, True, False):
        with pytest.raises(LayoutMismatch, match=field):
            plan_transfer(src, sb, bad, db, stage=stage)  # even with garbage block ids
    with pytest.raises(LayoutMismatch):
        plan_naive(src, sb, bad, db)


@settings(max_examples=300, **SETTINGS)
@given(transfer_case(), st.sampled_from(["src_range", "dst_range", "dup_dst", "length", "type"]), st.data())
def test_invalid_blocks(case, kind, data):
    src, sb, dst, db = case
    sb, db = list(sb), list(db)
    if kind == "src_range":
        sb.append(data.draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=src.num_blocks))))
        db.append(db[0] if db else 0)  # may also be a duplicate: either way InvalidBlocks
    elif kind == "dst_range":
        sb.append(0)
        db.append(data.draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=dst.num_blocks))))
    elif kind == "dup_dst":
        assume(db)
        sb.append(sb[0])
        db.append(data.draw(st.sampled_from(db)))
    elif kind == "length":
        if data.draw(st.booleans()) or not sb:
            sb.append(0)
        else:
            db.pop()
    else:
        sb.append(data.draw(st.sampled_from([1.0, True, "3", None])))
        db.append(0 if 0 not in db else max(db) + 1)
    for stage in (None, True, False):
        with pytest.raises(InvalidBlocks):
            plan_transfer(src, sb, dst, db, stage=stage)
    with pytest.raises(InvalidBlocks):
        plan_naive(src, sb, dst, db)


def test_invalid_blocks_is_a_value_error_and_numpy_ids_work():
    lay = preset("tiny", 8)
    with pytest.raises(ValueError):
        plan_transfer(lay, [0, 1], lay, [2, 2])
    p = plan_transfer(lay, np.array([3, 4], dtype=np.int32), lay, [np.int64(5), 6])
    assert p.src_blocks == (3, 4) and p.dst_blocks == (5, 6)
    assert all(type(b) is int for b in p.src_blocks + p.dst_blocks)
    with pytest.raises(InvalidBlocks):
        plan_transfer(lay, np.array([0.0, 1.0]), lay, [0, 1])
    with pytest.raises(InvalidBlocks):
        plan_transfer(lay, [2**70], lay, [0])


def test_bad_options():
    lay = preset("tiny", 8)
    with pytest.raises(ValueError):
        plan_transfer(lay, [0, 1], lay, [2, 3], stage=True, staging_capacity_bytes=lay.chunk_bytes - 1)
    with pytest.raises(ValueError):
        plan_transfer(lay, [0, 1], lay, [2, 3], max_wire_descriptors=0)
    with pytest.raises(ValueError):
        plan_transfer(lay, [0, 1], lay, [2, 3], stage=True, slice_bytes=0)


# -- merge counts ----------------------------------------------------------------------------------


def test_block_major_consecutive_ids_merge_into_one():
    lay = preset("llama3-8b", 100, "block_major")
    p = plan_transfer(lay, range(10, 30), lay, range(50, 70), stage=False)
    assert list(p.wire) == [Descriptor(10 * lay.block_bytes, 50 * lay.block_bytes, 20 * lay.block_bytes)]
    assert p.stats().chunks == 20 * 64 and p.stats().wire_descriptors == 1


def test_layer_major_runs_merge_per_plane_and_across_planes():
    lay = preset("tiny", 10)  # 2 layers -> 4 planes
    p = plan_transfer(lay, [3, 4, 5], lay, [6, 7, 8], stage=False)
    assert len(p.wire) == 4 and all(d.nbytes == 3 * lay.chunk_bytes for d in p.wire)
    # The whole pool, same ids on both sides: the planes are adjacent -> one descriptor.
    p = plan_transfer(lay, range(10), lay, range(10), stage=False)
    assert list(p.wire) == [Descriptor(0, 0, lay.pool_bytes)]
    # Request order does not matter: sorted by source offset before merging.
    p = plan_transfer(lay, [5, 3, 4], lay, [8, 6, 7], stage=False)
    assert len(p.wire) == 4


def test_mixed_orders_merge_nothing_across_blocks():
    s = preset("tiny", 10, "layer_major")
    d = preset("tiny", 10, "block_major")
    p = plan_transfer(s, range(10), d, range(10), stage=False)
    assert len(p.wire) == 10 * s.chunks_per_block


def test_staged_block_major_gather_merges_whole_blocks_and_runs():
    lay = preset("llama3-70b", 64, "block_major")
    p = plan_transfer(lay, [5, 6, 7, 40, 2], lay, [9, 1, 33, 34, 35], stage=True)
    assert p.staged and len(p.wire) == 1 and p.wire[0] == Descriptor(0, 0, 5 * lay.block_bytes)
    assert len(p.gather) == 3  # [5, 6, 7] run, 40, 2
    assert len(p.scatter) == 3  # 9, 1, [33, 34, 35] run
    assert p.staging_bytes == 5 * lay.block_bytes and p.staging_slots == 0
    assert p.slices == (TransferSlice(p.gather, p.wire[0], p.scatter),)


def test_auto_stage_threshold():
    lay = preset("tiny", 64)  # layer-major: random ids give one descriptor per chunk
    ids = [1, 9, 17, 25, 33]
    direct = plan_transfer(lay, ids, lay, ids, stage=False)
    assert len(direct.wire) == 20
    assert not plan_transfer(lay, ids, lay, ids, max_wire_descriptors=20).staged
    assert plan_transfer(lay, ids, lay, ids, max_wire_descriptors=19).staged


def test_ring_staging_slices():
    lay = preset("tiny", 64, "block_major")
    cb = lay.chunk_bytes
    ids = list(range(0, 40, 2))  # 20 blocks x 4 chunks = 80 chunks
    p = plan_transfer(lay, ids, lay, ids[::-1], stage=True, staging_capacity_bytes=10 * cb + 5)
    assert p.staging_slots == 2 and p.staging_bytes == 10 * cb
    assert len(p.slices) == 16 and all(s.wire.nbytes == 5 * cb for s in p.slices)
    assert [s.wire.src_offset for s in p.slices[:4]] == [0, 5 * cb, 0, 5 * cb]
    p1 = plan_transfer(lay, ids, lay, ids, stage=True, staging_capacity_bytes=10 * cb, staging_buffers=1)
    assert p1.staging_slots == 1 and len(p1.slices) == 8
    # Linear slicing when everything fits: no slot reuse.
    p2 = plan_transfer(lay, ids, lay, ids, stage=True, slice_bytes=16 * cb)
    assert p2.staging_slots == 0 and len(p2.slices) == 5 and p2.staging_bytes == 80 * cb
    assert [s.wire.src_offset for s in p2.slices] == [k * 16 * cb for k in range(5)]


def test_empty_transfer():
    lay = preset("tiny", 4)
    for stage in (None, True, False):
        p = plan_transfer(lay, [], lay, [], stage=stage)
        assert p.total_bytes == 0 and len(p.wire) == 0 and p.stats().chunks == 0


def test_descriptor_array_sequence_behaviour():
    a = DescriptorArray([(0, 8, 4), (16, 32, 4)])
    assert len(a) == 2 and a[1] == Descriptor(16, 32, 4) and a[-1].nbytes == 4
    assert list(a) == [Descriptor(0, 8, 4), Descriptor(16, 32, 4)]
    assert a == ((0, 8, 4), (16, 32, 4)) and a == DescriptorArray(a.array.copy())
    assert a[:1] == [(0, 8, 4)] and a.total_bytes == 8 and a.uniform_nbytes() == 4
    assert a.tolist() == [[0, 8, 4], [16, 32, 4]] and hash(a) == hash(DescriptorArray(a.tolist()))
    assert not a.array.flags.writeable
    assert np.asarray(a).shape == (2, 3) and np.asarray(a, dtype=np.uint64).dtype == np.uint64
    with pytest.raises(ValueError):
        DescriptorArray([(1, 2)])
    assert DescriptorArray() == () and len(DescriptorArray([])) == 0


def test_lead_constructor_still_valid():
    lay = preset("tiny", 4)
    p = TransferPlan(lay, lay, (0,), (1,), (Descriptor(0, 0, 8),))
    assert p.total_bytes == 8 and not p.staged and p.stats().wire_descriptors == 1


# -- speed -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order,direct_descs", [("layer_major", 32_800), ("block_major", 205)])
def test_planning_1gib_llama3_70b_is_fast(order, direct_descs):
    lay = preset("llama3-70b", 4096, order)
    n = -(-(1 << 30) // lay.block_bytes)  # 205 blocks = 32,800 chunks of 32 KiB
    rng = np.random.default_rng(7)
    src = rng.choice(4096, n, replace=False).tolist()
    dst = rng.choice(4096, n, replace=False).tolist()
    for kw in (dict(stage=False), dict(), dict(staging_capacity_bytes=64 << 20)):
        plan_transfer(lay, src, lay, dst, **kw)  # warm
        best = min(_timed(lambda: plan_transfer(lay, src, lay, dst, **kw)) for _ in range(5))
        assert best < 0.025, f"{order} {kw}: planning took {best * 1e3:.1f} ms"
    assert len(plan_transfer(lay, src, lay, dst, stage=False).wire) == direct_descs
    assert len(plan_transfer(lay, src, lay, dst).wire) == 1


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
