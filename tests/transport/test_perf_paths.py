"""The fast paths of the transfer layer: CMA (process_vm_writev/readv) and the reader-side executors.

CMA runs here (two real processes, the peer of tests/transport/peer_proc.py); the iovec batching is
checked against a NumPy model. The GPU executors' host logic (row indices, slicing, the pipelined
loop) is checked on CPU tensors; their CUDA paths run in `-m gpu` and in benchmarks/transfer.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from dynamo_ext.transport import InvalidBlocks, KvLayout, KvPool, RemotePool, make_backend, plan_transfer, pull, push
from dynamo_ext.transport.fallbacks.cma import IOV_MAX, CmaBackend, _advance, _iov_batches, cma_available
from dynamo_ext.transport.probe import digest, pattern, probe_layout

from conftest import scattered, start_peer  # noqa: E402

needs_cma = pytest.mark.skipif(not cma_available(), reason="process_vm_readv not permitted here")


def _segments(liov: np.ndarray, riov: np.ndarray) -> list[tuple[int, int, int]]:
    """What one process_vm_*v call does: the two iovec lists walked as byte streams -> (local, remote, n)."""
    out, i, j, oi, oj = [], 0, 0, 0, 0
    while i < len(liov) and j < len(riov):
        n = min(int(liov[i, 1]) - oi, int(riov[j, 1]) - oj)
        out.append((int(liov[i, 0]) + oi, int(riov[j, 0]) + oj, n))
        oi, oj = oi + n, oj + n
        if oi == int(liov[i, 1]):
            i, oi = i + 1, 0
        if oj == int(riov[j, 1]):
            j, oj = j + 1, 0
    assert i == len(liov) and j == len(riov)  # both lists carry the same bytes
    return out


@pytest.mark.parametrize("contiguous_dst", [False, True])
def test_iov_batches_cover_every_byte_once(contiguous_dst):
    rng = np.random.default_rng(3)
    n = 3 * IOV_MAX + 17
    dst = np.arange(n) if contiguous_dst else rng.permutation(2 * n)[:n]  # a sparse subset: few neighbours
    d = np.stack([rng.permutation(n) * 4096, dst * 4096 + 8192, np.full(n, 4096)], axis=1).astype(np.int64)
    b = _iov_batches(1 << 40, 1 << 41, d)
    assert len(b) == 4 and all(len(liov) <= IOV_MAX and len(riov) <= IOV_MAX for liov, riov, _ in b)
    assert sum(x[2] for x in b) == int(d[:, 2].sum())
    # every byte lands where its descriptor says, once
    want = {int(lo) + (1 << 40): int(ro) + (1 << 41) for lo, ro, _ in d}
    seen = 0
    for liov, riov, nb in b:
        segs = _segments(liov, riov)
        assert sum(x[2] for x in segs) == nb
        for lo, ro, k in segs:
            base = lo - (lo - (1 << 40)) % 4096
            for page in range(base, lo + k, 4096):
                start = max(page, lo)
                assert want[page] + (start - page) == ro + (start - lo)
            seen += k
    assert seen == int(d[:, 2].sum())
    riovs = sum(len(x[1]) for x in b)
    if contiguous_dst:  # remote side merged into one iovec per call, sources still scattered
        assert riovs == len(b) and sum(len(x[0]) for x in b) > 3 * IOV_MAX
    else:
        assert IOV_MAX < riovs < n  # neighbours in the sorted remote order merge, the rest stay
    # a descriptor larger than 1 GiB is split, and no call carries more than 1 GiB
    big = np.array([[0, 0, (5 << 29) + 7]], dtype=np.int64)
    bb = _iov_batches(0, 0, big)
    assert sum(x[2] for x in bb) == (5 << 29) + 7 and max(x[2] for x in bb) <= 1 << 30


def test_advance_after_partial_call():
    iov = np.array([[100, 10], [200, 20], [300, 30]], dtype=np.uint64)
    r = _advance(iov, 15)
    assert r.tolist() == [[205, 15], [300, 30]]
    assert _advance(iov, 30).tolist() == [[300, 30]]


@needs_cma
async def test_auto_picks_cma_for_host_pools():
    be = make_backend("auto", f"auto-{os.getpid()}", memory="host")
    assert isinstance(be, CmaBackend)
    await be.close()


@needs_cma
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("direction", ["write", "read"])
async def test_cma_large_scattered_byte_exact(shared_etcd, threads, direction):
    """300 scattered blocks = 4,800 scattered 8 KiB chunks (37.5 MiB: > IOV_MAX iovecs, threaded path)."""
    layout = KvLayout(num_layers=8, num_kv_heads=4, head_dim=64, block_size=16, dtype="float16", num_blocks=600)
    proc, info = start_peer("cma", f"perf-cma-{threads}-{direction}-{os.getpid()}", layout, shared_etcd.url)
    be = CmaBackend(f"perf-a-{threads}-{direction}-{os.getpid()}", threads=threads)
    await be.start()
    try:
        pool = KvPool.allocate_host("kv", layout)
        pattern(pool.host_view(), 5)
        be.register_pool(pool)
        be.add_peer(info)
        assert be.is_same_node(info.agent_name)
        remote = RemotePool(info.agent_name, info.pool("kv"))
        src, dst = scattered(600, 300, 1), scattered(600, 300, 2)
        plan = plan_transfer(layout, src, layout, dst, stage=False)
        assert len(plan.wire) > IOV_MAX and plan.total_bytes > (1 << 20)
        if direction == "write":
            st = await (await push(be, pool, remote, (src, dst)))
            assert (await proc.acall({"cmd": "digest", "blocks": dst}))["sha256"] == digest(pool.host_view(), layout, src)
        else:
            st = await (await pull(be, remote, pool, (src, dst)))
            assert digest(pool.host_view(), layout, dst) == (await proc.acall({"cmd": "digest", "blocks": src}))["sha256"]
        assert st.backend == "cma" and st.bytes == plan.total_bytes
        with pytest.raises(InvalidBlocks, match="out of range"):
            await push(be, pool, remote, [600])
        with pytest.raises(InvalidBlocks, match="outside the pools"):
            be.post("write", pool, info.agent_name, remote.pool, [(0, remote.pool.nbytes - 8, 16)])
    finally:
        await be.close()
        proc.close()


@needs_cma
async def test_cma_peer_on_other_node_uses_tcp_data_path(shared_etcd):
    """A peer whose node identity differs is served over TCP (same frames as TcpBackend)."""
    import msgspec

    layout = probe_layout(4 << 20, chunk_bytes=64 << 10)
    proc, info = start_peer("cma", f"perf-cma-remote-{os.getpid()}", layout, shared_etcd.url)
    be = CmaBackend(f"perf-b-{os.getpid()}")
    await be.start()
    try:
        fake = msgspec.structs.replace(info, agent_metadata=b"\x80")  # empty map: no boot id
        pool = KvPool.allocate_host("kv", layout)
        pattern(pool.host_view(), 9)
        be.register_pool(pool)
        be.add_peer(fake)
        assert not be.is_same_node(info.agent_name)
        ids = list(range(layout.num_blocks))
        await (await push(be, pool, RemotePool(info.agent_name, info.pool("kv")), ids))
        assert (await proc.acall({"cmd": "digest", "blocks": ids}))["sha256"] == digest(pool.host_view(), layout, ids)
    finally:
        await be.close()
        proc.close()


# -- rowcopy executors: host logic on CPU tensors (CUDA streams/events faked as synchronous) ------------
torch = pytest.importorskip("torch")


class _FakeStream:
    def __init__(self, *a, **k) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, ev) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _FakeEvent(_FakeStream):
    def record(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True


@pytest.fixture
def fake_cuda(monkeypatch):
    """CPU tensors listed in the returned set count as 'on a GPU'; streams run synchronously."""
    import contextlib

    from dynamo_ext.transport import rowcopy

    gpu: set[int] = set()
    monkeypatch.setattr(rowcopy, "_on_gpu", lambda t: t.data_ptr() in gpu)
    monkeypatch.setattr(rowcopy, "_keep", lambda t, s: None)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda dev=None: _FakeStream())
    monkeypatch.setattr(rowcopy, "_streams", {})
    monkeypatch.setattr(rowcopy, "_bufs", {})
    return gpu


def _kv_case(num_blocks: int = 96, k: int = 40, seed: int = 0):
    from dynamo_ext.transport import plan_transfer, preset

    lay = preset("tiny", num_blocks)
    rng = np.random.default_rng(seed)
    s = [int(x) for x in rng.permutation(num_blocks)[:k]]
    d = [int(x) for x in rng.permutation(num_blocks)[:k]]
    plan = plan_transfer(lay, s, lay, d, stage=False)
    src = torch.from_numpy(rng.integers(0, 255, lay.pool_bytes, dtype=np.uint8))
    dst = torch.from_numpy(rng.integers(0, 255, lay.pool_bytes, dtype=np.uint8))
    want = dst.clone()
    for so, do, n in plan.wire.array.tolist():
        want[do:do + n] = src[so:so + n]
    return lay, plan, src, dst, want


@pytest.mark.parametrize("tmp_rows", [1, 3, 1 << 20])
def test_copy_rows_torch_slices_byte_exact(monkeypatch, tmp_rows):
    from dynamo_ext.transport import rowcopy

    lay, plan, src, dst, want = _kv_case()
    monkeypatch.setattr(rowcopy, "SLICE_TMP_BYTES", tmp_rows * lay.chunk_bytes)
    assert rowcopy.copy_rows(src, dst, plan.wire, use_triton=False) == plan.total_bytes
    assert torch.equal(dst, want)


def test_copy_rows_bounds_checked_before_launch():
    from dynamo_ext.transport import rowcopy

    a = torch.zeros(4096, dtype=torch.uint8)
    with pytest.raises(ValueError, match="outside"):
        rowcopy.copy_rows(a, a.clone(), [(0, 4000, 128)])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton kernel on CPU needs TRITON_INTERPRET=1")
def test_copy_rows_triton_kernel_interpreted():
    from dynamo_ext.transport import rowcopy

    if not rowcopy.triton_available():
        pytest.skip("triton not importable")
    _, plan, src, dst, want = _kv_case()
    rowcopy.copy_rows(src, dst, plan.wire, use_triton=True)
    assert torch.equal(dst, want)


@pytest.mark.parametrize("slice_chunks,slots", [(7, 2), (7, 3), (10_000, 2), (1, 1)])
def test_copy_cross_device_pipeline_byte_exact(fake_cuda, slice_chunks, slots):
    from dynamo_ext.transport import rowcopy

    lay, plan, src, dst, want = _kv_case(seed=slots)
    n = rowcopy.copy_cross_device(src, dst, plan.wire, slice_bytes=slice_chunks * lay.chunk_bytes, slots=slots,
                                  use_triton=False)
    assert n == plan.total_bytes and torch.equal(dst, want)


@pytest.mark.parametrize("slice_chunks,slots,threads", [(5, 3, 2), (5, 2, 1), (64, 3, 4), (10_000, 3, 2)])
def test_copy_device_to_host_pipeline_byte_exact(fake_cuda, slice_chunks, slots, threads):
    from dynamo_ext.transport import rowcopy

    lay, plan, src, dst, want = _kv_case(seed=threads)
    fake_cuda.add(src.data_ptr())
    n = rowcopy.copy_device_to_host(src, dst, plan.wire, slice_bytes=slice_chunks * lay.chunk_bytes, slots=slots,
                                    threads=threads)
    assert n == plan.total_bytes and torch.equal(dst, want)


# -- the same executors on CUDA (skipped without it; `-m gpu`) ---------------------------------------
def _ngpu() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(_ngpu() < 1, reason="needs CUDA")
@pytest.mark.parametrize("use_triton", [False, None])
def test_cuda_copy_rows_and_owner_copy_byte_exact(use_triton):
    from dynamo_ext.transport import rowcopy

    _, plan, src, dst, want = _kv_case(num_blocks=300, k=150)
    s, d = src.cuda(), dst.cuda()
    rowcopy.copy_rows(s, d, plan.wire, use_triton=use_triton)
    torch.cuda.synchronize()
    assert torch.equal(d.cpu(), want)
    h = dst.clone().pin_memory()
    rowcopy.copy_device_to_host(s, h, plan.wire, slice_bytes=1 << 20)
    assert torch.equal(h, want)


@pytest.mark.gpu
@pytest.mark.skipif(_ngpu() < 2, reason="needs two GPUs")
def test_cuda_copy_cross_device_byte_exact():
    from dynamo_ext.transport import rowcopy

    _, plan, src, dst, want = _kv_case(num_blocks=300, k=150)
    s, d = src.to("cuda:0"), dst.to("cuda:1")
    rowcopy.copy_cross_device(s, d, plan.wire, slice_bytes=1 << 20)
    torch.cuda.synchronize(1)
    assert torch.equal(d.cpu(), want)


# -- sweep knobs (rowcopy.TUNING) -----------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["direct-read", "direct-write", "staged-torch"])
def test_copy_cross_device_kernels_byte_exact(fake_cuda, kernel):
    """direct-*: one row kernel addressing the other GPU (here: torch index ops on CPU tensors)."""
    from dynamo_ext.transport import rowcopy

    lay, plan, src, dst, want = _kv_case(seed=3)
    n = rowcopy.copy_cross_device(src, dst, plan.wire, kernel=kernel, use_triton=False, slice_bytes=5 * lay.chunk_bytes)
    assert n == plan.total_bytes and torch.equal(dst, want)


def test_rowcopy_tuning_validated_and_index_cache_reused(monkeypatch):
    from dynamo_ext.transport import rowcopy

    monkeypatch.setattr(rowcopy, "TUNING", dict(rowcopy.TUNING))
    with pytest.raises(ValueError, match="cross_kernel"):
        rowcopy.tune(cross_kernel="bogus")
    with pytest.raises(ValueError, match="unknown key"):
        rowcopy.parse_tuning("slices=3")
    with pytest.raises(ValueError, match="power of two"):
        rowcopy.tune(triton_block=1000)
    assert rowcopy.parse_tuning("cross_kernel=direct-read,cross_slice_bytes=1024,index_cache=1") == \
        {"cross_kernel": "direct-read", "cross_slice_bytes": 1024, "index_cache": True}
    rowcopy.tune(index_cache=True)
    monkeypatch.setattr(rowcopy, "_idx_cache", {})
    _, plan, src, dst, want = _kv_case(seed=5)
    rowcopy.copy_rows(src, dst, plan.wire, use_triton=False)
    first = rowcopy._idx_cache["cpu"]
    dst2 = dst.clone().zero_()
    rowcopy.copy_rows(src, dst2, plan.wire, use_triton=False)
    assert rowcopy._idx_cache["cpu"] is first  # same plan: no new upload
    assert torch.equal(dst, want)
    _, plan2, src2, dst3, want2 = _kv_case(seed=6)  # another plan: a new entry, still byte exact
    rowcopy.copy_rows(src2, dst3, plan2.wire, use_triton=False)
    assert rowcopy._idx_cache["cpu"] is not first and torch.equal(dst3, want2)


@pytest.mark.parametrize("kernel", [None, "direct-read"])
def test_rows_cache_reuses_rows_of_the_same_plan_object(fake_cuda, monkeypatch, kernel):
    """rows_cache keys on the descriptor array itself: the same plan object skips rows_of; a new plan
    (same ids, another array) is computed again; bytes exact either way."""
    from dynamo_ext.transport import rowcopy

    monkeypatch.setattr(rowcopy, "TUNING", dict(rowcopy.TUNING, rows_cache=True))
    monkeypatch.setattr(rowcopy, "_rows_cache", {})
    calls = []
    real = rowcopy.rows_of
    monkeypatch.setattr(rowcopy, "rows_of", lambda *a: calls.append(1) or real(*a))
    lay, plan, src, dst, want = _kv_case(seed=8)

    def run(descs, d):
        if kernel is None:
            return rowcopy.copy_rows(src, d, descs, use_triton=False)
        return rowcopy.copy_cross_device(src, d, descs, kernel=kernel, use_triton=False)

    orig = dst.clone()
    view = plan.wire.array.reshape(-1, 3)  # what pull/push/copy pass: a fresh view of the same array
    assert run(view, dst) == plan.total_bytes and torch.equal(dst, want)
    d2 = orig.clone()
    assert run(plan.wire.array.reshape(-1, 3), d2) == plan.total_bytes and torch.equal(d2, want)
    assert len(calls) == 1  # second call: cache hit
    d3 = orig.clone()
    run(plan.wire.array.copy(), d3)  # same values, another array: computed again
    assert len(calls) == 2 and torch.equal(d3, want)


def test_rows_cache_on_by_default_never_caches_a_mutable_array(fake_cuda, monkeypatch):
    """rows_cache is on by default; a writable descriptor array (a caller's, which it could change in place)
    is computed again every time, even the same object, while the plan's read-only array hits."""
    from dynamo_ext.transport import rowcopy

    assert rowcopy.TUNING["rows_cache"] is True
    monkeypatch.setattr(rowcopy, "_rows_cache", {})
    calls = []
    real = rowcopy.rows_of
    monkeypatch.setattr(rowcopy, "rows_of", lambda *a: calls.append(1) or real(*a))
    lay, plan, src, dst, want = _kv_case(seed=9)
    mutable = plan.wire.array.copy()
    for _ in range(2):
        d = dst.clone()
        rowcopy.copy_rows(src, d, mutable, use_triton=False)
        assert torch.equal(d, want)
    assert len(calls) == 2
    mutable[:, 1] = mutable[::-1, 1]  # changed in place: must not reuse the rows of the old contents
    d = dst.clone()
    rowcopy.copy_rows(src, d, mutable, use_triton=False)
    assert len(calls) == 3
    for _ in range(2):
        rowcopy.copy_rows(src, dst.clone(), plan.wire, use_triton=False)
    assert len(calls) == 4  # the read-only plan array: one miss, then a hit


@pytest.mark.parametrize("src_order,dst_order", [("layer_major", "layer_major"), ("layer_major", "block_major"),
                                                 ("block_major", "layer_major")])
def test_copy_blocks_moves_every_chunk_of_each_block_and_nothing_else(src_order, dst_order):
    """rowcopy.copy_blocks (the same-GPU block path of the CUDA IPC backend, no plan): here its torch path on CPU
    tensors; offsets from block_geometry must match KvLayout.chunk_offset in both memory orders."""
    import torch

    from dynamo_ext.transport import rowcopy
    from dynamo_ext.transport.layout import KvLayout
    from dynamo_ext.transport.verify import pattern

    ls = KvLayout(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32", num_blocks=10, order=src_order)
    ld = KvLayout(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32", num_blocks=7, order=dst_order)
    for lay in (ls, ld):  # the geometry is the layout's arithmetic
        sb, sl, cb, n_lkv = rowcopy.block_geometry(lay)
        assert all(lay.chunk_offset(b, layer, kv) == b * sb + (layer * 2 + kv) * sl
                   for b in range(lay.num_blocks) for layer in range(3) for kv in (0, 1)) and n_lkv == 6
    src = torch.zeros(ls.pool_bytes, dtype=torch.uint8)
    pattern(src.numpy(), 3)
    dst = torch.zeros(ld.pool_bytes, dtype=torch.uint8)
    sids, dids = np.array([7, 2, 9]), np.array([0, 5, 3])
    assert rowcopy.copy_blocks(src, dst, ls, ld, sids, dids, use_triton=False) == 3 * ls.block_bytes
    s, d = src.numpy(), dst.numpy()
    moved = 0
    for b in range(ld.num_blocks):
        for layer in range(3):
            for kv in (0, 1):
                o, n = ld.chunk_offset(b, layer, kv), ld.chunk_bytes
                if b in dids:
                    so = ls.chunk_offset(int(sids[list(dids).index(b)]), layer, kv)
                    assert np.array_equal(d[o:o + n], s[so:so + n]), (b, layer, kv)
                    moved += n
                else:
                    assert not d[o:o + n].any(), ("touched", b)
    assert moved == 3 * ls.block_bytes


def test_backends_without_a_block_path_are_planned():
    from dynamo_ext.transport.backend import TransferBackend
    from dynamo_ext.transport.fallbacks.cuda_ipc import CudaIpcBackend
    from dynamo_ext.transport.fallbacks.tcp import TcpBackend

    assert TcpBackend.post_blocks is TransferBackend.post_blocks  # transfer.py plans for these
    assert CudaIpcBackend.post_blocks is not TransferBackend.post_blocks
