"""Staging executors: byte-exact against a NumPy reference, on CPU tensors (and CUDA when present)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from dynamo_ext.transport.layout import KvLayout, MemoryOrder, preset  # noqa: E402
from dynamo_ext.transport.plan import Descriptor, DescriptorArray, plan_transfer  # noqa: E402
from dynamo_ext.transport.staging import copy_descriptors, execute_local, gather_into, scatter_from  # noqa: E402

SENTINEL = 255


def ref_copy(src: np.ndarray, dst: np.ndarray, descs) -> np.ndarray:
    out = dst.copy()
    for s, d, n in descs:
        out[d : d + n] = src[s : s + n]
    return out


def expected_dst(src_layout, sb, dst_layout, db, src_pool: np.ndarray) -> np.ndarray:
    exp = np.full(dst_layout.pool_bytes, SENTINEL, dtype=np.uint8)
    cb = src_layout.chunk_bytes
    for s, d in zip(sb, db):
        for layer in range(src_layout.num_layers):
            for kv in (0, 1):
                o, q = src_layout.chunk_offset(s, layer, kv), dst_layout.chunk_offset(d, layer, kv)
                exp[q : q + cb] = src_pool[o : o + cb]
    return exp


@st.composite
def desc_lists(draw):
    """Non-overlapping destination ranges; units from 1 byte (loop path) to 64 (vector path)."""
    unit = draw(st.sampled_from([1, 3, 16, 64]))
    src_rows = draw(st.integers(1, 40))
    dst_rows = draw(st.integers(1, 40))
    n = draw(st.integers(0, min(src_rows, dst_rows)))
    dst_starts = sorted(draw(st.permutations(range(dst_rows)))[:n])
    descs = []
    for i, d0 in enumerate(dst_starts):
        room = (dst_starts[i + 1] if i + 1 < n else dst_rows) - d0
        length = draw(st.integers(1, room))
        s0 = draw(st.integers(0, src_rows - 1))
        length = min(length, src_rows - s0)
        descs.append((s0 * unit, d0 * unit, length * unit))
    descs = draw(st.permutations(descs))
    return unit, src_rows * unit, dst_rows * unit, descs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(desc_lists(), st.sampled_from([None, True, False]), st.integers(0, 2**32 - 1))
def test_copy_descriptors_matches_reference(case, vectorize, seed):
    unit, src_len, dst_len, descs = case
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 255, src_len, dtype=np.uint8)
    dst = np.full(dst_len, SENTINEL, dtype=np.uint8)
    exp = ref_copy(src, dst, descs)
    ts, td = torch.from_numpy(src.copy()), torch.from_numpy(dst.copy())
    assert copy_descriptors(ts, td, descs, vectorize=vectorize) == sum(d[2] for d in descs)
    assert np.array_equal(td.numpy(), exp)
    assert np.array_equal(ts.numpy(), src)  # source untouched


def _plan_case(order_s, order_d, n, stage_kw, seed=0):
    rng = np.random.default_rng(seed)
    S = KvLayout(3, 2, 4, 2, "float16", 16, order_s)
    D = KvLayout(3, 2, 4, 2, "float16", 20, order_d)
    sb = rng.choice(16, n, replace=False).tolist()
    db = rng.choice(20, n, replace=False).tolist()
    return S, sb, D, db, plan_transfer(S, sb, D, db, **stage_kw)


STAGE_KWS = [
    dict(stage=True),
    dict(stage=True, slice_bytes=7 * 32),
    dict(stage=True, staging_capacity_bytes=10 * 32),
    dict(stage=True, staging_capacity_bytes=3 * 32, staging_buffers=3),
    dict(stage=False),
]


@pytest.mark.parametrize("order_s", list(MemoryOrder))
@pytest.mark.parametrize("order_d", list(MemoryOrder))
@pytest.mark.parametrize("kw", STAGE_KWS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_gather_and_scatter_per_slice_cpu(order_s, order_d, kw):
    S, sb, D, db, plan = _plan_case(order_s, order_d, 9, kw)
    src = np.random.default_rng(1).integers(0, 255, S.pool_bytes, dtype=np.uint8)
    ts = torch.from_numpy(src.copy())
    td = torch.full((D.pool_bytes,), SENTINEL, dtype=torch.uint8)
    if plan.staged:
        ss = torch.zeros(plan.staging_bytes, dtype=torch.uint8)
        ds = torch.zeros(plan.staging_bytes, dtype=torch.uint8)
        for g, w, s in plan.slices:
            gather_into(ts, ss, g)
            ds[w.dst_offset : w.dst_offset + w.nbytes] = ss[w.src_offset : w.src_offset + w.nbytes]
            scatter_from(ds, td, s)
    else:
        copy_descriptors(ts, td, plan.wire)
    assert np.array_equal(td.numpy(), expected_dst(S, sb, D, db, src))
    # execute_local gives the same bytes
    td2 = torch.full((D.pool_bytes,), SENTINEL, dtype=torch.uint8)
    assert execute_local(plan, ts, td2) == plan.total_bytes
    assert torch.equal(td, td2)


def test_whole_gather_list_in_one_call_fills_canonical_staging():
    """plan.gather in one call packs staging block-major in request order."""
    S, sb, D, db, plan = _plan_case(MemoryOrder.LAYER_MAJOR, MemoryOrder.BLOCK_MAJOR, 6, dict(stage=True))
    src = np.random.default_rng(2).integers(0, 255, S.pool_bytes, dtype=np.uint8)
    stg = torch.zeros(plan.staging_bytes, dtype=torch.uint8)
    gather_into(torch.from_numpy(src), stg, plan.gather)
    cb = S.chunk_bytes
    for i, b in enumerate(sb):
        for layer in range(S.num_layers):
            for kv in (0, 1):
                o = ((i * S.num_layers + layer) * 2 + kv) * cb
                q = S.chunk_offset(b, layer, kv)
                assert np.array_equal(stg[o : o + cb].numpy(), src[q : q + cb])


def test_vector_paths_are_taken_and_exact(monkeypatch):
    """Uniform and merged (multiple-of-unit) lists go through index_select / index_copy_, no loop."""
    calls = {"select": 0, "copy": 0}
    real_select, real_copy = torch.index_select, torch.Tensor.index_copy_

    def sel(*a, **k):
        calls["select"] += 1
        return real_select(*a, **k)

    def cp(self, *a, **k):
        calls["copy"] += 1
        return real_copy(self, *a, **k)

    monkeypatch.setattr(torch, "index_select", sel)
    monkeypatch.setattr(torch.Tensor, "index_copy_", cp)
    lay = preset("tiny", 64, "block_major")  # merged gather runs of whole blocks: sizes differ
    sb = [3, 4, 5, 9, 30, 31, 7]
    db = [0, 10, 11, 12, 40, 50, 51]
    plan = plan_transfer(lay, sb, lay, db, stage=True)
    assert plan.gather.uniform_nbytes() is None
    src = np.random.default_rng(3).integers(0, 255, lay.pool_bytes, dtype=np.uint8)
    ts = torch.from_numpy(src)
    ss = torch.zeros(plan.staging_bytes, dtype=torch.uint8)
    td = torch.full((lay.pool_bytes,), SENTINEL, dtype=torch.uint8)
    gather_into(ts, ss, plan.gather)
    assert calls == {"select": 1, "copy": 0}  # straight into the staging range
    scatter_from(ss, td, plan.scatter)
    assert calls == {"select": 1, "copy": 1}  # straight from the staging range
    assert np.array_equal(td.numpy(), expected_dst(lay, sb, lay, db, src))


def test_rejects_bad_tensors_and_out_of_bounds():
    a = torch.zeros(64, dtype=torch.uint8)
    b = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="outside the source"):
        copy_descriptors(a, b, [(60, 0, 8)])
    with pytest.raises(ValueError, match="outside the destination"):
        copy_descriptors(a, b, [(0, 60, 8), (8, 0, 8)])
    with pytest.raises(ValueError):
        copy_descriptors(a, b, [(0, 0, 0)])
    with pytest.raises(ValueError, match="uint8"):
        copy_descriptors(a.view(torch.int32), b, [(0, 0, 4)])
    with pytest.raises(ValueError, match="1-D"):
        copy_descriptors(a.view(8, 8), b, [(0, 0, 4)])
    assert copy_descriptors(a, b, []) == 0
    assert copy_descriptors(a, b, DescriptorArray()) == 0
    assert copy_descriptors(a, b, np.array([[0, 8, 8]])) == 8
    assert copy_descriptors(a, b, [Descriptor(0, 16, 8)]) == 8
    plan = plan_transfer(preset("tiny", 4), [0, 1], preset("tiny", 4), [1, 0], stage=True)
    with pytest.raises(ValueError, match="staging_bytes"):
        execute_local(plan, torch.zeros(preset("tiny", 4).pool_bytes, dtype=torch.uint8),
                      torch.zeros(preset("tiny", 4).pool_bytes, dtype=torch.uint8), torch.zeros(8, dtype=torch.uint8))


# -- CUDA -----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("order", list(MemoryOrder))
@pytest.mark.parametrize("kw", STAGE_KWS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_execute_local_cuda_matches_cpu(order, kw):
    S, sb, D, db, plan = _plan_case(order, MemoryOrder.LAYER_MAJOR, 12, kw, seed=5)
    src = np.random.default_rng(4).integers(0, 255, S.pool_bytes, dtype=np.uint8)
    ts = torch.from_numpy(src).cuda()
    td = torch.full((D.pool_bytes,), SENTINEL, dtype=torch.uint8, device="cuda")
    execute_local(plan, ts, td)
    assert np.array_equal(td.cpu().numpy(), expected_dst(S, sb, D, db, src))


@pytest.mark.gpu
def test_gather_scatter_cuda_on_a_stream_llama3_70b():
    lay = preset("llama3-70b", 512, "layer_major")
    rng = np.random.default_rng(6)
    sb = rng.choice(512, 64, replace=False).tolist()
    db = rng.choice(512, 64, replace=False).tolist()
    plan = plan_transfer(lay, sb, lay, db, stage=True, staging_capacity_bytes=64 << 20)
    src = torch.randint(0, 255, (lay.pool_bytes,), dtype=torch.uint8, device="cuda")
    dst = torch.full((lay.pool_bytes,), SENTINEL, dtype=torch.uint8, device="cuda")
    s = torch.cuda.Stream()
    ss = torch.empty(plan.staging_bytes, dtype=torch.uint8, device="cuda")
    ds = torch.empty(plan.staging_bytes, dtype=torch.uint8, device="cuda")
    s.wait_stream(torch.cuda.current_stream())
    for g, w, sc in plan.slices:  # sequential on one stream: ring reuse is ordered by the stream
        gather_into(src, ss, g, stream=s)
        with torch.cuda.stream(s):
            ds[w.dst_offset : w.dst_offset + w.nbytes].copy_(ss[w.src_offset : w.src_offset + w.nbytes])
        scatter_from(ds, dst, sc, stream=s)
    s.synchronize()
    cb = lay.chunk_bytes
    for b_s, b_d in zip(sb, db):
        for layer in (0, 41, 79):
            for kv in (0, 1):
                o, q = lay.chunk_offset(b_s, layer, kv), lay.chunk_offset(b_d, layer, kv)
                assert torch.equal(dst[q : q + cb], src[o : o + cb])
    untouched = torch.ones(lay.pool_bytes, dtype=torch.bool, device="cuda")
    for b_d in db:
        for layer in range(lay.num_layers):
            for kv in (0, 1):
                q = lay.chunk_offset(b_d, layer, kv)
                untouched[q : q + cb] = False
    assert bool((dst[untouched] == SENTINEL).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_execute_local_two_gpus_pipelined():
    lay = preset("llama3-70b", 256, "layer_major")
    rng = np.random.default_rng(8)
    sb = rng.choice(256, 100, replace=False).tolist()
    db = rng.choice(256, 100, replace=False).tolist()
    plan = plan_transfer(lay, sb, lay, db, staging_capacity_bytes=128 << 20)
    src = torch.randint(0, 255, (lay.pool_bytes,), dtype=torch.uint8, device="cuda:0")
    dst = torch.full((lay.pool_bytes,), SENTINEL, dtype=torch.uint8, device="cuda:1")
    execute_local(plan, src, dst)
    exp = expected_dst(lay, sb, lay, db, src.cpu().numpy())
    assert np.array_equal(dst.cpu().numpy(), exp)
