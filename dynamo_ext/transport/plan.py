"""TransferPlan: a pure function from (layouts, block ids) to the descriptors that move them.

Protocol map (who does what, in order)
======================================

A transfer moves the KV chunks of ``src_blocks[i]`` in the source pool to ``dst_blocks[i]`` in the
destination pool, for every i, every layer and K and V. A *chunk* is one (block, layer, K|V) tensor,
``chunk_bytes`` long; its byte offset in a pool is given by that pool's ``KvLayout`` (layer-major or
block-major, see ``layout.py``). Both peers call the same pure function with the same inputs and get
the same plan, so peers exchange layouts, block ids and plan parameters (plain msgpack/JSON), never
descriptor lists they would have to trust.

``plan_transfer(src_layout, src_blocks, dst_layout, dst_blocks, *, stage=None, ...)``

  0. Checks, before anything: ``LayoutMismatch`` when the layouts are incompatible (layers, KV
     heads, head dim, block size, dtype); ``InvalidBlocks`` when the id lists differ in length, an
     id is not an integer or out of range, or a destination id repeats. Source ids may repeat (one
     block copied to two destinations).
  1. Chunks: every (i, layer, kv) gives ``(src_offset, dst_offset, chunk_bytes)``. They are sorted
     by source offset and merged into one descriptor wherever the next chunk is contiguous in BOTH
     pools. Block-major pools merge runs of consecutive ids across whole blocks; layer-major pools
     merge runs of consecutive ids inside each (layer, kv) plane, and across planes when a run
     reaches the end of one plane and the start of the next (``num_blocks`` ids).
  2. Direct plan (``stage`` False, or None with at most ``max_wire_descriptors`` merged
     descriptors): ``wire`` = the merged descriptors, pool -> pool. ``gather``/``scatter`` empty.
  3. Staged plan (``stage`` True, or None with more merged descriptors than that):

     - source staging buffer holds the chunks packed canonically, block-major in request order:
       ``staging_offset(i, layer, kv) = ((i * num_layers + layer) * 2 + kv) * chunk_bytes``; the
       destination staging buffer holds the same packing;
     - ``gather``: copies done by the SOURCE side, pool -> its staging (merged where contiguous);
     - ``wire``: one descriptor per slice, staging -> staging (``wire_src == wire_dst == "staging"``);
     - ``scatter``: copies done by the DESTINATION side, its staging -> pool (merged likewise).

     ``slices`` splits the staged plan into ``TransferSlice(gather, wire, scatter)`` triples, in
     order; slice k's gather writes exactly the staging bytes its wire reads, and its scatter reads
     exactly the bytes its wire wrote. An executor may overlap gather(k+1) / wire(k) / scatter(k-1).
     Slicing: ``slice_bytes`` (rounded down to whole chunks, at least one) sets the granularity; when
     ``staging_capacity_bytes`` is smaller than the transfer, the staging buffer is used as a ring of
     ``staging_buffers`` slots of ``capacity // staging_buffers`` bytes (whole chunks) and slice k
     lives in slot ``k % staging_buffers``. Then the executor must keep slot reuse ordered: gather(k)
     after wire(k - staging_buffers) has completed (source side), and wire(k) after
     scatter(k - staging_buffers) has completed (destination side). ``staging_bytes`` is the staging
     size each side needs; ``staging_slots`` is the ring size (0 when no staging byte is reused).

Offsets are always from the start of the region named: ``wire_src``/``wire_dst`` for ``wire``; for
``gather`` source = source pool, destination = source staging; for ``scatter`` source = destination
staging, destination = destination pool.

Descriptor lists are ``DescriptorArray``: an immutable sequence of ``Descriptor`` backed by one
``(N, 3)`` int64 NumPy array (``.array``), so a backend can hand it to NIXL without a Python loop,
and a plan of 32,768 chunks is built in a few milliseconds. ``TransferPlan.stats()`` gives the
counts (chunks, merged descriptors of each list, bytes).

``plan_naive`` is the baseline: one wire descriptor per chunk, in request order, no merging.

``cached_plan_transfer(...)`` (what ``transfer.pull/push/copy`` and the staged protocol call) returns the
same plan OBJECT for the same (layouts, block ids, options): a bounded LRU (``PLAN_CACHE``: at most
``max_entries`` plans and ``max_descriptors`` descriptor rows in all; ``configure_plan_cache``). Plans are
immutable (frozen dataclass, read-only arrays), so sharing one is safe, and ``rowcopy``'s rows cache keys on
its descriptor array. Ids that are not plain integers are never cached (a float id must still be refused).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Literal, NamedTuple, Sequence, overload

import numpy as np

from .errors import InvalidBlocks
from .layout import KvLayout, MemoryOrder

__all__ = [
    "PLAN_CACHE",
    "PlanCache",
    "cached_plan_transfer",
    "configure_plan_cache",
    "Descriptor",
    "DescriptorArray",
    "PlanStats",
    "Region",
    "TransferPlan",
    "TransferSlice",
    "plan_naive",
    "plan_transfer",
]


class Descriptor(NamedTuple):
    src_offset: int
    dst_offset: int
    nbytes: int


Region = Literal["pool", "staging"]

_EMPTY = np.zeros((0, 3), dtype=np.int64)
_EMPTY.flags.writeable = False


class DescriptorArray(Sequence[Descriptor]):
    """Immutable list of ``Descriptor`` stored as one ``(N, 3)`` int64 array (src, dst, nbytes).

    Behaves as a sequence of ``Descriptor`` (``len``, indexing, iteration, ``==`` with any sequence
    of 3-tuples); ``.array`` gives the NumPy array (read-only) for vectorised consumers.
    """

    __slots__ = ("_a",)

    def __init__(self, data: Any = ()) -> None:
        if isinstance(data, DescriptorArray):
            a = data._a
        else:
            a = np.array(data, dtype=np.int64)
            if a.size == 0:
                a = _EMPTY
            elif a.ndim != 2 or a.shape[1] != 3:
                raise ValueError(f"descriptors must be (N, 3) (src_offset, dst_offset, nbytes), got shape {a.shape}")
            else:
                a.flags.writeable = False
        self._a = a

    @classmethod
    def _wrap(cls, a: np.ndarray) -> "DescriptorArray":
        """Adopt ``a`` (an (N, 3) int64 array nobody else holds) without copying."""
        out = cls.__new__(cls)
        if a.shape[0] == 0:
            a = _EMPTY
        else:
            a.flags.writeable = False
        out._a = a
        return out

    # -- array views -----------------------------------------------------------------------
    @property
    def array(self) -> np.ndarray:
        return self._a

    @property
    def src_offsets(self) -> np.ndarray:
        return self._a[:, 0]

    @property
    def dst_offsets(self) -> np.ndarray:
        return self._a[:, 1]

    @property
    def nbytes(self) -> np.ndarray:
        return self._a[:, 2]

    @property
    def total_bytes(self) -> int:
        return int(self._a[:, 2].sum())

    def uniform_nbytes(self) -> int | None:
        """The common descriptor size, or None when sizes differ (or the list is empty)."""
        if not len(self._a):
            return None
        n = self._a[:, 2]
        return int(n[0]) if bool((n == n[0]).all()) else None

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        """``np.asarray(descs)`` -> the (N, 3) int64 array, without a per-descriptor loop."""
        a = self._a if dtype is None else self._a.astype(dtype, copy=False)
        return a.copy() if copy else a

    def tolist(self) -> list[list[int]]:
        """Plain lists of ints: what goes into msgpack/JSON."""
        return self._a.tolist()

    # -- sequence protocol --------------------------------------------------------------------
    def __len__(self) -> int:
        return self._a.shape[0]

    @overload
    def __getitem__(self, i: int) -> Descriptor: ...
    @overload
    def __getitem__(self, i: slice) -> "DescriptorArray": ...
    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        if isinstance(i, slice):
            return DescriptorArray._wrap(self._a[i])
        s, d, n = self._a[i].tolist()
        return Descriptor(s, d, n)

    def __iter__(self) -> Iterator[Descriptor]:
        return map(Descriptor._make, self._a.tolist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DescriptorArray):
            return self._a.shape == other._a.shape and bool((self._a == other._a).all())
        if isinstance(other, (tuple, list)):
            try:
                return self == DescriptorArray(other)
            except (ValueError, TypeError):
                return False
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._a.tobytes())

    def __repr__(self) -> str:
        if len(self) <= 4:
            return f"DescriptorArray({list(self)!r})"
        return f"DescriptorArray(<{len(self)} descriptors, {self.total_bytes} bytes>)"


class TransferSlice(NamedTuple):
    """One pipelinable step of a staged plan: gather, then wire, then scatter."""

    gather: DescriptorArray
    wire: Descriptor
    scatter: DescriptorArray


@dataclass(frozen=True)
class PlanStats:
    chunks: int  # (block, layer, K|V) chunks moved = descriptors of the naive plan
    chunk_bytes: int
    bytes: int  # payload bytes
    wire_descriptors: int
    gather_descriptors: int
    scatter_descriptors: int
    staged: bool
    slices: int
    staging_bytes: int  # staging buffer bytes each side needs (0 when not staged)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TransferPlan:
    src_layout: KvLayout
    dst_layout: KvLayout
    src_blocks: tuple[int, ...]
    dst_blocks: tuple[int, ...]
    wire: Sequence[Descriptor]
    wire_src: Region = "pool"
    wire_dst: Region = "pool"
    gather: Sequence[Descriptor] = ()
    scatter: Sequence[Descriptor] = ()
    # Added by the planner (defaults keep the lead's constructor valid):
    slices: tuple[TransferSlice, ...] = ()
    staging_bytes: int = 0  # staging buffer bytes each side needs
    staging_slots: int = 0  # 0: each slice has its own staging range; m: slice k reuses slot k % m

    @property
    def total_bytes(self) -> int:
        if isinstance(self.wire, DescriptorArray):
            return self.wire.total_bytes
        return sum(d.nbytes for d in self.wire)

    @property
    def num_descriptors(self) -> int:
        return len(self.wire)

    @property
    def staged(self) -> bool:
        return bool(self.gather or self.scatter) or self.wire_src == "staging"

    @property
    def num_chunks(self) -> int:
        return len(self.src_blocks) * self.src_layout.chunks_per_block

    def stats(self) -> PlanStats:
        return PlanStats(
            chunks=self.num_chunks,
            chunk_bytes=self.src_layout.chunk_bytes,
            bytes=self.num_chunks * self.src_layout.chunk_bytes,
            wire_descriptors=len(self.wire),
            gather_descriptors=len(self.gather),
            scatter_descriptors=len(self.scatter),
            staged=self.staged,
            slices=len(self.slices),
            staging_bytes=self.staging_bytes,
        )


# -- input checks ----------------------------------------------------------------------------------


def _as_ids(blocks: Sequence[int] | np.ndarray, layout: KvLayout, what: str) -> np.ndarray:
    if isinstance(blocks, np.ndarray):
        if blocks.ndim != 1 or (blocks.size and blocks.dtype.kind not in "iu"):
            raise InvalidBlocks(f"{what} ids must be a 1-D integer sequence, got {blocks.dtype} array of shape {blocks.shape}")
        arr = blocks.astype(np.int64, copy=False)
    else:
        blocks = list(blocks)
        bad = [b for b in blocks if not (type(b) is int or isinstance(b, np.integer))]
        if bad:
            raise InvalidBlocks(f"{what} ids must be integers: {bad[:8]!r}")
        try:
            arr = np.array(blocks, dtype=np.int64)
        except OverflowError:
            raise InvalidBlocks(f"{what} ids out of range [0, {layout.num_blocks})") from None
    out = (arr < 0) | (arr >= layout.num_blocks)
    if out.any():
        bad_ids = arr[out][:8].tolist()
        more = " ..." if int(out.sum()) > 8 else ""
        raise InvalidBlocks(f"{what} ids out of range [0, {layout.num_blocks}): {bad_ids}{more}")
    return arr


def _check(
    src_layout: KvLayout, src_blocks: Sequence[int], dst_layout: KvLayout, dst_blocks: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Validate inputs (LayoutMismatch first, then InvalidBlocks); return the ids as int64 arrays."""
    src_layout.check_compatible(dst_layout)
    if len(src_blocks) != len(dst_blocks):
        raise InvalidBlocks(f"{len(src_blocks)} source blocks but {len(dst_blocks)} destination blocks")
    s = _as_ids(src_blocks, src_layout, "source block")
    d = _as_ids(dst_blocks, dst_layout, "destination block")
    if len(d) > 1:
        u, counts = np.unique(d, return_counts=True)
        if len(u) != len(d):
            raise InvalidBlocks(
                f"destination block ids repeat ({u[counts > 1][:8].tolist()}): two chunks would land on the same bytes"
            )
    return s, d


def check_blocks(src_layout: KvLayout, src_blocks: Sequence[int], dst_layout: KvLayout,
                 dst_blocks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The checks of every plan (layouts compatible, ids in range, equal lengths, no destination twice), for
    paths that move whole blocks without a plan (``TransferBackend.post_blocks``); the ids as int64 arrays."""
    return _check(src_layout, src_blocks, dst_layout, dst_blocks)


# -- chunk arithmetic (in units of chunks) --------------------------------------------------------------


def _chunk_index(layout: KvLayout, lk: np.ndarray, block: np.ndarray) -> np.ndarray:
    """Chunk index (offset / chunk_bytes) of plane ``lk = layer * 2 + kv`` of ``block`` (broadcasts)."""
    if layout.order is MemoryOrder.LAYER_MAJOR:
        return lk * layout.num_blocks + block
    return block * layout.chunks_per_block + lk


def _merge_runs(
    src_idx: np.ndarray, dst_idx: np.ndarray, unit: int, group: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Merge consecutive entries contiguous in both index spaces (and in the same group).

    Returns ``(descs, starts)``: ``descs`` an (N, 3) int64 array in bytes, ``starts`` the positions
    in the input where each merged descriptor begins.
    """
    m = src_idx.shape[0]
    if m == 0:
        return np.zeros((0, 3), dtype=np.int64), np.zeros(0, dtype=np.int64)
    brk = np.diff(src_idx) != 1
    brk |= np.diff(dst_idx) != 1
    if group is not None:
        brk |= np.diff(group) != 0
    nb = int(np.count_nonzero(brk))
    out = np.empty((nb + 1, 3), dtype=np.int64)
    if nb == m - 1:  # nothing merges (scattered ids): no fancy indexing
        out[:, 0] = src_idx
        out[:, 0] *= unit
        out[:, 1] = dst_idx
        out[:, 1] *= unit
        out[:, 2] = unit
        return out, np.arange(m, dtype=np.int64)
    starts = np.empty(nb + 1, dtype=np.int64)
    starts[0] = 0
    starts[1:] = np.flatnonzero(brk) + 1
    lengths = np.diff(starts, append=m)
    out[:, 0] = src_idx[starts] * unit
    out[:, 1] = dst_idx[starts] * unit
    out[:, 2] = lengths * unit
    return out, starts


# -- planners ---------------------------------------------------------------------------------------


def plan_naive(
    src_layout: KvLayout, src_blocks: Sequence[int], dst_layout: KvLayout, dst_blocks: Sequence[int]
) -> TransferPlan:
    """One descriptor per (block, layer, K|V) chunk, in request order: what a connector without
    planning sends (the benchmark baseline)."""
    s, d = _check(src_layout, src_blocks, dst_layout, dst_blocks)
    cb = src_layout.chunk_bytes
    lk = np.arange(src_layout.chunks_per_block, dtype=np.int64)
    a = np.empty((len(s), lk.shape[0], 3), dtype=np.int64)
    a[:, :, 0] = _chunk_index(src_layout, lk[None, :], s[:, None]) * cb
    a[:, :, 1] = _chunk_index(dst_layout, lk[None, :], d[:, None]) * cb
    a[:, :, 2] = cb
    return TransferPlan(
        src_layout, dst_layout, tuple(s.tolist()), tuple(d.tolist()), DescriptorArray._wrap(a.reshape(-1, 3))
    )


def plan_transfer(
    src_layout: KvLayout,
    src_blocks: Sequence[int],
    dst_layout: KvLayout,
    dst_blocks: Sequence[int],
    *,
    stage: bool | None = None,
    max_wire_descriptors: int = 64,
    staging_capacity_bytes: int | None = None,
    slice_bytes: int | None = None,
    staging_buffers: int = 2,
) -> TransferPlan:
    """Plan the transfer of ``src_blocks[i] -> dst_blocks[i]`` (see the module docstring).

    stage: True = always stage; False = never; None = stage when the merged direct plan has more
        than ``max_wire_descriptors`` descriptors.
    staging_capacity_bytes: size of each side's staging buffer; None = as large as needed.
    slice_bytes: pipelining granularity of a staged plan (None = one slice when it fits).
    staging_buffers: ring slots used when the transfer is larger than the staging capacity.
    """
    s, d = _check(src_layout, src_blocks, dst_layout, dst_blocks)
    if max_wire_descriptors < 1:
        raise ValueError(f"max_wire_descriptors must be >= 1, got {max_wire_descriptors}")
    cb = src_layout.chunk_bytes
    cpb = src_layout.chunks_per_block
    n = s.shape[0]
    src_t, dst_t = tuple(s.tolist()), tuple(d.tolist())

    # Chunks sorted by source offset: sort the (few) block ids, then lay the planes out in the
    # source pool's order. When a source id repeats, that grid is not sorted (block-major), and ties
    # must be broken by the other side's offset for runs to merge: sort the chunks themselves then.
    perm = np.argsort(s, kind="stable")
    dup = n > 1 and bool((np.diff(s[perm]) == 0).any())
    if stage is not True:
        src_idx, lk_g, d_g, _ = _source_grid(src_layout, s, d, perm)
        dst_idx = _chunk_index(dst_layout, lk_g, d_g).ravel()  # broadcasts to the full chunk grid
        if dup:
            src_idx, dst_idx = _sort_pairs(src_idx, dst_idx)
        wire, _ = _merge_runs(src_idx, dst_idx, cb)
        if stage is False or wire.shape[0] <= max_wire_descriptors:
            return TransferPlan(src_layout, dst_layout, src_t, dst_t, DescriptorArray._wrap(wire))

    # Staged: the gather's destination is the canonical staging packing (request order).
    src_idx, lk_g, _, i_g = _source_grid(src_layout, s, d, perm)
    stg_idx = (i_g * cpb + lk_g).ravel()
    if dup:
        src_idx, stg_idx = _sort_pairs(src_idx, stg_idx)
    return _plan_staged(
        src_layout, dst_layout, src_t, dst_t, d, src_idx, stg_idx,
        staging_capacity_bytes=staging_capacity_bytes, slice_bytes=slice_bytes, staging_buffers=staging_buffers,
    )


def _sort_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    o = np.lexsort((b, a))
    return a[o], b[o]


def _source_grid(
    src_layout: KvLayout, s: np.ndarray, d: np.ndarray, perm: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Chunk grid in source-pool order for blocks sorted by ``perm``: (source chunk index raveled,
    plane index, destination block id and request index, the last three broadcastable to the grid)."""
    lk = np.arange(src_layout.chunks_per_block, dtype=np.int64)
    ss, ds = s[perm], d[perm]
    if src_layout.order is MemoryOrder.LAYER_MAJOR:  # plane-major: (lk, sorted block)
        lk_g, s_g, d_g, i_g = lk[:, None], ss[None, :], ds[None, :], perm[None, :]
    else:  # block-major: (sorted block, lk)
        lk_g, s_g, d_g, i_g = lk[None, :], ss[:, None], ds[:, None], perm[:, None]
    return _chunk_index(src_layout, lk_g, s_g).ravel(), lk_g, d_g, i_g


def _plan_staged(
    src_layout: KvLayout,
    dst_layout: KvLayout,
    src_t: tuple[int, ...],
    dst_t: tuple[int, ...],
    d: np.ndarray,
    src_idx: np.ndarray,
    stg_idx: np.ndarray,
    *,
    staging_capacity_bytes: int | None,
    slice_bytes: int | None,
    staging_buffers: int,
) -> TransferPlan:
    """Staged plan. ``src_idx``/``stg_idx``: source-pool and canonical staging chunk index of every
    chunk, in source-offset order."""
    cb = src_layout.chunk_bytes
    cpb = src_layout.chunks_per_block
    total = stg_idx.shape[0]  # chunks
    if total == 0:
        return TransferPlan(src_layout, dst_layout, src_t, dst_t, DescriptorArray(), "staging", "staging",
                            DescriptorArray(), DescriptorArray())

    # Slice geometry, in chunks.
    if slice_bytes is not None and slice_bytes <= 0:
        raise ValueError(f"slice_bytes must be positive, got {slice_bytes}")
    if staging_buffers < 1:
        raise ValueError(f"staging_buffers must be >= 1, got {staging_buffers}")
    sc = total if slice_bytes is None else max(1, min(total, slice_bytes // cb))
    ring = staging_capacity_bytes is not None and staging_capacity_bytes < total * cb
    nbuf = 1
    if ring:
        cap_chunks = staging_capacity_bytes // cb
        if cap_chunks < 1:
            raise ValueError(f"staging capacity {staging_capacity_bytes} B is smaller than one chunk ({cb} B)")
        nbuf = min(staging_buffers, cap_chunks)
        sc = min(sc, cap_chunks // nbuf)
    nslices = -(-total // sc)
    if ring:
        nbuf = min(nbuf, nslices)

    def phys(v: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Canonical (virtual) staging chunk index -> chunk index in the staging buffer."""
        return (k % nbuf) * sc + (v - k * sc) if ring else v

    # Gather: source pool -> source staging, grouped by slice, source order within a slice.
    k_g = stg_idx // sc
    if nslices > 1:
        o = np.argsort(k_g, kind="stable")
        src_o, stg_o, k_o = src_idx[o], stg_idx[o], k_g[o]
    else:
        src_o, stg_o, k_o = src_idx, stg_idx, k_g
    gather, g_starts = _merge_runs(src_o, phys(stg_o, k_o), cb, k_o if nslices > 1 else None)

    # Scatter: destination staging -> destination pool, in staging order.
    lk = np.arange(cpb, dtype=np.int64)
    v = np.arange(total, dtype=np.int64)
    k_s = v // sc
    dst_idx = _chunk_index(dst_layout, lk[None, :], d[:, None]).ravel()
    scatter, s_starts = _merge_runs(phys(v, k_s), dst_idx, cb, k_s if nslices > 1 else None)

    # Wire: one descriptor per slice; split gather/scatter by slice.
    ks = np.arange(nslices, dtype=np.int64)
    base = (ks % nbuf) * sc if ring else ks * sc
    lens = np.minimum(sc, total - ks * sc)
    wire = np.stack([base * cb, base * cb, lens * cb], axis=1)
    if nslices > 1:
        g_cut = np.searchsorted(k_o[g_starts], ks[1:], side="left")
        s_cut = np.searchsorted(k_s[s_starts], ks[1:], side="left")
        g_parts = np.split(gather, g_cut)
        s_parts = np.split(scatter, s_cut)
    else:
        g_parts, s_parts = [gather], [scatter]
    wire_da = DescriptorArray._wrap(wire)
    slices = tuple(
        TransferSlice(DescriptorArray._wrap(gp), w, DescriptorArray._wrap(sp))
        for gp, w, sp in zip(g_parts, wire_da, s_parts)
    )
    return TransferPlan(
        src_layout, dst_layout, src_t, dst_t, wire_da, "staging", "staging",
        DescriptorArray._wrap(gather), DescriptorArray._wrap(scatter),
        slices=slices,
        staging_bytes=(nbuf * sc if ring else total) * cb,
        staging_slots=nbuf if ring else 0,
    )



# -- the plan cache ---------------------------------------------------------------------------------------


def _ids_key(ids: Any) -> bytes | tuple[int, ...] | None:
    """A hashable key of a block id sequence, or None when it must not be cached (not plain integers)."""
    if isinstance(ids, np.ndarray):
        return ids.astype(np.int64, copy=False).tobytes() if ids.ndim == 1 and ids.dtype.kind in "iu" else None
    if isinstance(ids, (list, tuple, range)):
        t = tuple(ids)
        return t if all(type(b) is int for b in t) else None
    return None


class PlanCache:
    """Bounded LRU of ``plan_transfer`` results keyed by (layouts, block ids, keyword options)."""

    def __init__(self, max_entries: int = 64, max_descriptors: int = 1 << 20) -> None:
        self.max_entries, self.max_descriptors = max_entries, max_descriptors
        self._plans: OrderedDict[tuple[Any, ...], tuple[TransferPlan, int]] = OrderedDict()
        self._rows = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._plans)

    @property
    def rows(self) -> int:
        """Descriptor rows held (wire + gather + scatter of every cached plan)."""
        return self._rows

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
            self._rows = 0

    def plan(self, src_layout: KvLayout, src_blocks: Sequence[int], dst_layout: KvLayout,
             dst_blocks: Sequence[int], **kw: Any) -> TransferPlan:
        sk, dk = _ids_key(src_blocks), _ids_key(dst_blocks)
        if sk is None or dk is None or self.max_entries <= 0:
            return plan_transfer(src_layout, src_blocks, dst_layout, dst_blocks, **kw)
        try:
            key = (src_layout, dst_layout, sk, dk, tuple(sorted(kw.items())))
            hash(key)
        except TypeError:  # an unhashable option: plan without the cache
            return plan_transfer(src_layout, src_blocks, dst_layout, dst_blocks, **kw)
        with self._lock:
            hit = self._plans.get(key)
            if hit is not None:
                self._plans.move_to_end(key)
                self.hits += 1
                return hit[0]
        plan = plan_transfer(src_layout, src_blocks, dst_layout, dst_blocks, **kw)  # raises on bad input
        rows = len(plan.wire) + len(plan.gather) + len(plan.scatter)
        with self._lock:
            self.misses += 1
            if rows <= self.max_descriptors and key not in self._plans:
                self._plans[key] = (plan, rows)
                self._rows += rows
                while self._plans and (len(self._plans) > self.max_entries or self._rows > self.max_descriptors):
                    _, (_, r) = self._plans.popitem(last=False)
                    self._rows -= r
        return plan


PLAN_CACHE = PlanCache()


def configure_plan_cache(max_entries: int | None = None, max_descriptors: int | None = None) -> PlanCache:
    """Resize the process's plan cache (0 entries = off); returns it. Existing entries beyond the bounds go."""
    with PLAN_CACHE._lock:  # noqa: SLF001
        if max_entries is not None:
            PLAN_CACHE.max_entries = int(max_entries)
        if max_descriptors is not None:
            PLAN_CACHE.max_descriptors = int(max_descriptors)
        while PLAN_CACHE._plans and (len(PLAN_CACHE._plans) > max(PLAN_CACHE.max_entries, 0)  # noqa: SLF001
                                     or PLAN_CACHE._rows > PLAN_CACHE.max_descriptors):  # noqa: SLF001
            _, (_, r) = PLAN_CACHE._plans.popitem(last=False)  # noqa: SLF001
            PLAN_CACHE._rows -= r  # noqa: SLF001
    return PLAN_CACHE


def cached_plan_transfer(src_layout: KvLayout, src_blocks: Sequence[int], dst_layout: KvLayout,
                         dst_blocks: Sequence[int], **kw: Any) -> TransferPlan:
    """``plan_transfer`` through the process's bounded LRU (``PLAN_CACHE``): the same inputs give the same
    plan object without planning again."""
    return PLAN_CACHE.plan(src_layout, src_blocks, dst_layout, dst_blocks, **kw)
