"""Staging executors: apply a plan's gather/scatter descriptor lists to torch byte tensors.

Protocol map
============

A staged ``TransferPlan`` (see ``plan.py``) has three kinds of steps; this module runs the two local
ones, on the side that owns the memory:

  source side       ``gather_into(pool_u8, staging_u8, plan.gather)``     pool -> its staging
  link (backend)    one descriptor per slice, staging -> staging (NIXL WRITE/READ, peer copy, ...)
  destination side  ``scatter_from(staging_u8, pool_u8, plan.scatter)``   its staging -> pool

Per slice ``k`` of ``plan.slices`` the same calls take ``slices[k].gather`` / ``slices[k].scatter``,
so an executor can overlap gather(k+1), wire(k) and scatter(k-1) on different CUDA streams.
``execute_local`` runs a whole plan when one process can address both pools (tests, same-process
fallback, two GPUs of one process), pipelined over three CUDA streams when the pools are on GPUs.

Tensors are flat ``torch.uint8`` views (``pool.view(torch.uint8).flatten()`` of a contiguous pool),
CPU or CUDA, offsets in bytes from their start. Every descriptor is bounds-checked on the host before
anything is launched (an out-of-range index on the GPU is a fatal device assert, not an exception).

Speed: no Python loop per chunk. The descriptors' common unit ``u`` (the GCD of all offsets and
sizes; the chunk size for KV plans, merged runs being multiples of it) turns both tensors into
``[rows, u]`` views (of int64 elements when ``u`` and the buffers' alignment allow: the index kernels
move elements, and 8-byte elements move several times faster than bytes); the copy is then one ``index_select`` written straight into the contiguous
staging range (gather) or one ``index_copy_`` read straight from it (scatter), no temporary. Other
lists fall back to ``index_select`` + ``index_copy_`` through a temporary, and to a plain loop when the
unit is tiny (under ``MIN_VECTOR_UNIT`` bytes) or there is a single descriptor.

``stream``: a ``torch.cuda.Stream`` the copies are enqueued on (the caller orders it against the
producers and consumers of the bytes with events); ignored for CPU tensors. The calls return as soon
as the work is enqueued: the row indices are uploaded in one copy on an idle per-device upload
stream that ``stream`` waits for (a pageable upload on a busy stream would block the thread until
that stream drained), and are recorded on ``stream`` so the caching allocator keeps them alive.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import numpy as np
import torch

from .plan import Descriptor, DescriptorArray, TransferPlan

__all__ = ["MIN_VECTOR_UNIT", "copy_descriptors", "execute_local", "gather_into", "scatter_from"]

MIN_VECTOR_UNIT = 16  # bytes; below this the [rows, unit] index tensors cost more than a loop
MAX_VECTOR_ROWS = 1 << 26


def _as_array(descs: Sequence[Descriptor] | DescriptorArray | np.ndarray) -> np.ndarray:
    if isinstance(descs, DescriptorArray):
        return descs.array
    a = np.asarray(descs if len(descs) else np.zeros((0, 3)), dtype=np.int64)
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"descriptors must be (N, 3) (src_offset, dst_offset, nbytes), got shape {a.shape}")
    return a


def _check_tensor(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 1-D torch.uint8 tensor (use .view(torch.uint8).flatten())")


def _check_bounds(a: np.ndarray, src_len: int, dst_len: int) -> None:
    if int(a[:, 2].min()) <= 0:
        raise ValueError("descriptor with nbytes <= 0")
    for col, length, what in ((0, src_len, "reads outside the source"), (1, dst_len, "writes outside the destination")):
        end = a[:, col] + a[:, 2]
        if int(a[:, col].min()) < 0 or int(end.max()) > length:
            bad = a[(a[:, col] < 0) | (end > length)][0].tolist()
            raise ValueError(f"descriptor {bad} {what} tensor ({length} bytes)")


def _stream_ctx(t: torch.Tensor, stream: Any) -> Any:
    if stream is not None and t.is_cuda:
        return torch.cuda.stream(stream)
    return contextlib.nullcontext()


def _div(x: np.ndarray, unit: int) -> np.ndarray:
    """x // unit, as a shift when unit is a power of two (integer division is slow in NumPy)."""
    if unit & (unit - 1) == 0:
        return x >> (unit.bit_length() - 1)
    return x // unit


def _rows(a: np.ndarray, unit: int) -> tuple[np.ndarray, np.ndarray]:
    """Expand descriptors into row indices of [rows, unit] views (source rows, destination rows)."""
    s0, d0 = _div(a[:, 0], unit), _div(a[:, 1], unit)
    if bool((a[:, 2] == unit).all()):
        return s0, d0
    cnt = _div(a[:, 2], unit)
    total = int(cnt.sum())
    first = np.cumsum(cnt) - cnt
    within = np.arange(total, dtype=np.int64) - np.repeat(first, cnt)
    return np.repeat(s0, cnt) + within, np.repeat(d0, cnt) + within


def _contiguous_range(rows: np.ndarray) -> tuple[np.ndarray, int] | None:
    """If ``rows`` is a permutation of ``lo .. lo+len-1``: (order that sorts it, lo); else None.
    O(n), no sort: place every position at its row's slot and check every slot was filled once."""
    n = rows.shape[0]
    lo = int(rows.min())
    if int(rows.max()) - lo + 1 != n:
        return None
    order = np.full(n, -1, dtype=np.int64)
    order[rows - lo] = np.arange(n, dtype=np.int64)
    if bool((order < 0).any()):  # a slot hit twice leaves another empty
        return None
    return order, lo


def _unit(a: np.ndarray) -> int:
    """GCD of every offset and size (the common row width), cheap when sizes are few and aligned."""
    n = a[:, 2]
    g = int(n[0]) if bool((n == n[0]).all()) else int(np.gcd.reduce(n))
    off = a[:, :2]
    misaligned = (off & (g - 1)).any() if g & (g - 1) == 0 else (off % g).any()
    if bool(misaligned):
        g = int(np.gcd.reduce(a.ravel()))
    return g


#: pinned host slots per device for index uploads: (buffer, event of the upload that last read it)
_PINNED_SLOTS = 4
_pinned: dict[int, list[list[Any]]] = {}
_pinned_next: dict[int, int] = {}


def _pinned_slot(dev_index: int, nbytes: int) -> torch.Tensor:
    """A pinned host buffer of >= nbytes whose previous upload has completed (a ring of _PINNED_SLOTS per
    device: the slot's last upload was _PINNED_SLOTS uploads ago, so its event is normally long done)."""
    ring = _pinned.setdefault(dev_index, [[None, None] for _ in range(_PINNED_SLOTS)])
    k = _pinned_next.get(dev_index, 0)
    _pinned_next[dev_index] = (k + 1) % _PINNED_SLOTS
    slot = ring[k]
    if slot[1] is not None:
        slot[1].synchronize()
    if slot[0] is None or slot[0].numel() < nbytes:
        slot[0] = torch.empty(max(nbytes, 64 << 10), dtype=torch.uint8, pin_memory=True)
    slot[1] = None
    return slot


def _upload(arrays: list[np.ndarray], dev: torch.device) -> list[torch.Tensor]:
    """Index arrays -> tensors on ``dev``, one host-to-device copy, ordered before the current stream.

    The copy starts from a pinned slot (``_pinned_slot``), so it is asynchronous on the work stream itself:
    ordered before the kernels that read the indices with no extra stream or event, and it never blocks this
    thread behind the stream's queued work (a pageable upload would wait for the stream to drain)."""
    host = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    host = np.ascontiguousarray(host)
    if dev.type != "cuda":
        return list(torch.from_numpy(host).split([x.shape[0] for x in arrays]))
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    work = torch.cuda.current_stream(dev)
    slot = _pinned_slot(idx, host.nbytes)
    buf = slot[0][: host.nbytes]
    buf.numpy()[:] = host.view(np.uint8).reshape(-1)
    g = torch.empty(host.nbytes, dtype=torch.uint8, device=dev)
    g.copy_(buf, non_blocking=True)
    ev = torch.cuda.Event()
    ev.record(work)
    slot[1] = ev
    g = g.view(torch.from_numpy(host[:0]).dtype)
    return list(g.split([x.shape[0] for x in arrays]))


_WIDE = ((8, torch.int64), (4, torch.int32), (2, torch.int16))


def _as_rows(t: torch.Tensor, unit: int, other: torch.Tensor) -> torch.Tensor:
    """``t`` as a [rows, unit-bytes] matrix of the widest integer element both tensors' alignment
    and ``unit`` allow: the index kernels move elements, so 8-byte elements move ~8x faster than
    bytes. Integer views copy bits exactly."""
    rows = t[: (t.numel() // unit) * unit].view(-1, unit)
    for size, dtype in _WIDE:
        if unit % size == 0 and t.data_ptr() % size == 0 and other.data_ptr() % size == 0:
            return rows.view(dtype)
    return rows


class _Op:
    """A copy prepared on the host: mode, row unit, first contiguous row, index arrays to upload."""

    __slots__ = ("mode", "unit", "lo", "arrays", "nbytes", "descs")

    def __init__(self, mode: str, unit: int, lo: int, arrays: list[np.ndarray], nbytes: int, descs: np.ndarray) -> None:
        self.mode, self.unit, self.lo, self.arrays, self.nbytes, self.descs = mode, unit, lo, arrays, nbytes, descs


def _prepare(src_u8: torch.Tensor, dst_u8: torch.Tensor, descs: Any, vectorize: bool | None) -> _Op:
    _check_tensor(src_u8, "source")
    _check_tensor(dst_u8, "destination")
    if src_u8.device != dst_u8.device:
        raise ValueError(f"gather/scatter are local copies: source on {src_u8.device}, destination on {dst_u8.device}")
    a = _as_array(descs)
    if a.shape[0] == 0:
        return _Op("none", 1, 0, [], 0, a)
    _check_bounds(a, src_u8.numel(), dst_u8.numel())
    nbytes = int(a[:, 2].sum())
    unit = _unit(a)
    if vectorize is None:
        vectorize = a.shape[0] > 1 and unit >= MIN_VECTOR_UNIT and nbytes // unit <= MAX_VECTOR_ROWS
    if not vectorize:
        return _Op("loop", 1, 0, [], nbytes, a)
    srows, drows = _rows(a, unit)
    rng = _contiguous_range(drows)
    if rng is not None:  # gather: write straight into the contiguous destination range
        order, lo = rng
        return _Op("select", unit, lo, [srows[order]], nbytes, a)
    rng = _contiguous_range(srows)
    if rng is not None:  # scatter: read straight from the contiguous source range
        order, lo = rng
        return _Op("copy", unit, lo, [drows[order]], nbytes, a)
    return _Op("both", unit, 0, [srows, drows], nbytes, a)


def _launch(op: _Op, src_u8: torch.Tensor, dst_u8: torch.Tensor, idx: list[torch.Tensor]) -> None:
    """Enqueue a prepared copy on the current stream (``idx``: its arrays, on the device)."""
    if op.mode == "none":
        return
    if op.mode == "loop":
        for s, d, n in op.descs.tolist():
            dst_u8[d : d + n].copy_(src_u8[s : s + n], non_blocking=True)
        return
    src2d = _as_rows(src_u8, op.unit, dst_u8)
    dst2d = _as_rows(dst_u8, op.unit, src_u8)
    if op.mode == "select":
        n = idx[0].shape[0]
        torch.index_select(src2d, 0, idx[0], out=dst2d[op.lo : op.lo + n])
    elif op.mode == "copy":
        n = idx[0].shape[0]
        dst2d.index_copy_(0, idx[0], src2d[op.lo : op.lo + n])
    else:
        dst2d.index_copy_(0, idx[1], src2d.index_select(0, idx[0]))


def copy_descriptors(
    src_u8: torch.Tensor,
    dst_u8: torch.Tensor,
    descs: Sequence[Descriptor] | DescriptorArray | np.ndarray,
    *,
    stream: Any = None,
    vectorize: bool | None = None,
) -> int:
    """Copy ``src_u8[d.src_offset : +d.nbytes] -> dst_u8[d.dst_offset : +d.nbytes]`` for every
    descriptor. Both tensors on one device. Destinations must not overlap (plans guarantee it).
    ``vectorize``: None = choose (see module docstring); True/False forces the path. Returns bytes."""
    op = _prepare(src_u8, dst_u8, descs, vectorize)
    with _stream_ctx(dst_u8, stream):
        idx = _upload(op.arrays, dst_u8.device) if op.arrays else []
        _launch(op, src_u8, dst_u8, idx)
    return op.nbytes


def gather_into(
    pool_u8: torch.Tensor,
    staging_u8: torch.Tensor,
    descs: Sequence[Descriptor] | DescriptorArray | np.ndarray,
    *,
    stream: Any = None,
) -> int:
    """Source side of a staged plan: pool -> staging (``plan.gather`` or ``slice.gather``)."""
    return copy_descriptors(pool_u8, staging_u8, descs, stream=stream)


def scatter_from(
    staging_u8: torch.Tensor,
    pool_u8: torch.Tensor,
    descs: Sequence[Descriptor] | DescriptorArray | np.ndarray,
    *,
    stream: Any = None,
) -> int:
    """Destination side of a staged plan: staging -> pool (``plan.scatter`` or ``slice.scatter``)."""
    return copy_descriptors(staging_u8, pool_u8, descs, stream=stream)


def _wire_copy(src: torch.Tensor, dst: torch.Tensor, descs: Sequence[Descriptor]) -> None:
    for s, d, n in descs:
        dst[d : d + n].copy_(src[s : s + n], non_blocking=True)


def _upload_all(ops: list[_Op], dev: torch.device) -> torch.Tensor:
    arrays = [x for op in ops for x in op.arrays]
    return _upload([np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)], dev)[0]


def _split(t: torch.Tensor, ops: list[_Op]) -> list[list[torch.Tensor]]:
    """The one uploaded tensor back into each op's index tensors (views)."""
    out, pos = [], 0
    for op in ops:
        mine = []
        for x in op.arrays:
            mine.append(t[pos : pos + x.shape[0]])
            pos += x.shape[0]
        out.append(mine)
    return out


def execute_local(
    plan: TransferPlan,
    src_pool_u8: torch.Tensor,
    dst_pool_u8: torch.Tensor,
    src_staging_u8: torch.Tensor | None = None,
    dst_staging_u8: torch.Tensor | None = None,
    *,
    synchronize: bool = True,
) -> int:
    """Run a whole plan in this process (both pools addressable here). Staging tensors (at least
    ``plan.staging_bytes``) are allocated when not given. On CUDA the slices are pipelined over three
    streams (gather on the source device, wire copy, scatter on the destination device), ordered by
    events, ring-slot reuse included. Returns payload bytes."""
    _check_tensor(src_pool_u8, "source pool")
    _check_tensor(dst_pool_u8, "destination pool")
    if not plan.staged:
        a = _as_array(plan.wire)
        if a.shape[0]:
            _check_bounds(a, src_pool_u8.numel(), dst_pool_u8.numel())
        if src_pool_u8.device == dst_pool_u8.device:
            copy_descriptors(src_pool_u8, dst_pool_u8, a)
        else:
            _wire_copy(src_pool_u8, dst_pool_u8, plan.wire)
        if synchronize and dst_pool_u8.is_cuda:
            torch.cuda.synchronize(dst_pool_u8.device)
        return plan.total_bytes

    if src_staging_u8 is None:
        src_staging_u8 = torch.empty(plan.staging_bytes, dtype=torch.uint8, device=src_pool_u8.device)
    if dst_staging_u8 is None:
        dst_staging_u8 = torch.empty(plan.staging_bytes, dtype=torch.uint8, device=dst_pool_u8.device)
    _check_tensor(src_staging_u8, "source staging")
    _check_tensor(dst_staging_u8, "destination staging")
    if src_staging_u8.numel() < plan.staging_bytes or dst_staging_u8.numel() < plan.staging_bytes:
        raise ValueError(f"staging tensors must hold plan.staging_bytes = {plan.staging_bytes} bytes")

    if not (src_pool_u8.is_cuda and dst_pool_u8.is_cuda):
        for g, w, s in plan.slices:
            gather_into(src_pool_u8, src_staging_u8, g)
            _wire_copy(src_staging_u8, dst_staging_u8, (w,))
            scatter_from(dst_staging_u8, dst_pool_u8, s)
        return plan.total_bytes

    sdev, ddev = src_pool_u8.device, dst_pool_u8.device
    g_stream = torch.cuda.Stream(device=sdev)
    w_stream = torch.cuda.Stream(device=sdev)
    s_stream = torch.cuda.Stream(device=ddev)
    cur_s, cur_d = torch.cuda.current_stream(sdev), torch.cuda.current_stream(ddev)
    for st in (g_stream, w_stream):
        st.wait_stream(cur_s)
    s_stream.wait_stream(cur_d)
    slots = plan.staging_slots
    # Host work first (index arrays of every slice, one upload per device), so the launch loop below
    # only enqueues: an upload issued while the copy engines are busy would stall this thread.
    g_ops = [_prepare(src_pool_u8, src_staging_u8, sl.gather, None) for sl in plan.slices]
    s_ops = [_prepare(dst_staging_u8, dst_pool_u8, sl.scatter, None) for sl in plan.slices]
    with torch.cuda.stream(g_stream):
        g_idx = _split(_upload_all(g_ops, sdev), g_ops)
    with torch.cuda.stream(s_stream):
        s_idx = _split(_upload_all(s_ops, ddev), s_ops)
    ev_w: list[torch.cuda.Event] = []
    ev_s: list[torch.cuda.Event] = []
    for k, (g, w, s) in enumerate(plan.slices):
        if slots and k >= slots:
            g_stream.wait_event(ev_w[k - slots])  # slot's previous bytes have left the source staging
        with torch.cuda.stream(g_stream):
            _launch(g_ops[k], src_pool_u8, src_staging_u8, g_idx[k])
        eg = torch.cuda.Event()
        eg.record(g_stream)
        w_stream.wait_event(eg)
        if slots and k >= slots:
            w_stream.wait_event(ev_s[k - slots])  # slot's previous bytes were scattered
        with torch.cuda.stream(w_stream):
            _wire_copy(src_staging_u8, dst_staging_u8, (w,))
        ew = torch.cuda.Event()
        ew.record(w_stream)
        ev_w.append(ew)
        s_stream.wait_event(ew)
        with torch.cuda.stream(s_stream):
            _launch(s_ops[k], dst_staging_u8, dst_pool_u8, s_idx[k])
        es = torch.cuda.Event()
        es.record(s_stream)
        ev_s.append(es)
    cur_d.wait_stream(s_stream)
    cur_s.wait_stream(w_stream)
    for t, st in ((src_staging_u8, g_stream), (src_staging_u8, w_stream), (dst_staging_u8, s_stream)):
        t.record_stream(st)
    if synchronize:
        torch.cuda.synchronize(sdev)
        torch.cuda.synchronize(ddev)
    return plan.total_bytes
