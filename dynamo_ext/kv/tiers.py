"""KV tiers: move blocks down (offload) and up (onload) between G1, G2 and G3.

    G1  the engine's pool (device or host ``KvPool``), block ids owned by ``BlockPool``
    G2  host pool (``KvPool`` HOST, block-major), slots owned here
    G3  file pool (``KvPool`` FILE, block-major), slots owned here, moved with NIXL's POSIX backend

Operations (synchronous; a shortage of destination slots raises ``OutOfBlocks`` before any byte
moves; G3 traffic is staged through free G2 slots, in rounds when fewer are free than blocks)::

    store = TieredStore.create(g1, g2_blocks=64, g3_path="/nvme/kv.bin", g3_blocks=1024)
    handles = store.offload(block_ids, Tier.G2 | Tier.G3)   G1 -> G2 (local copy), or G1 -> G2 -> G3
    store.onload(handles, dst_block_ids)                    G2 -> G1, G3 -> G2 -> G1 (G1 blocks allocated
                                                            by the caller); the handles stay valid
    handles = store.move(handles, Tier.G2 | Tier.G3)        between G2 and G3; the old slots are released
    store.release(handles)                                  slots become free (DoubleFree if not held)
    store.free_slots(tier), store.close()

How bytes move: ``transport.plan.plan_transfer(src_layout, src_ids, dst_layout, dst_ids, stage=False)``
gives merged ``(src_offset, dst_offset, nbytes)`` descriptors between two compatible layouts.
G1 <-> G2 is a copy by the owning process, never NIXL between a process and itself over UCX: numpy
for host pools; for a device G1, ``staged_copy`` gathers the blocks on the GPU into one contiguous
buffer, crosses PCIe once, and scatters on the host (and the reverse), then synchronises. G2 <-> G3 is one NIXL POSIX transfer (``transport.file_tier``),
the agent being its own remote. G1 <-> G3 goes through temporary G2 slots.

What triggers a move (memory pressure, a routing or planner decision) is decided elsewhere; this
module only performs them. A handle is ``(tier, slot)``; it does not record which tokens the block
holds: the caller keeps that (e.g. hash -> handle).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgspec
import numpy as np

from dynamo_ext.transport.layout import KvLayout, MemoryOrder
from dynamo_ext.transport.plan import plan_transfer
from dynamo_ext.transport.pool import KvPool, MemoryKind

from .pool import DoubleFree, OutOfBlocks

__all__ = ["Tier", "TierHandle", "SlotAllocator", "TieredStore", "local_copy", "staged_copy", "block_major"]


class Tier(str, Enum):
    G1 = "G1"
    G2 = "G2"
    G3 = "G3"


@dataclass(frozen=True)
class TierHandle:
    tier: Tier
    slot: int


class SlotAllocator:
    """Free list of slots of one tier (no prefix cache: the tier's user keeps hash -> handle)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free: deque[int] = deque(range(num_slots))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} slots, {len(self._free)} free of {self.num_slots}")
        out = [self._free.popleft() for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, slots: Sequence[int]) -> None:
        if len(set(slots)) != len(slots) or not set(slots) <= self._used:
            raise DoubleFree(f"slots not held: {sorted(set(slots) - self._used)[:8] or 'repeated ids'}")
        self._used.difference_update(slots)
        self._free.extend(slots)


def block_major(layout: KvLayout, num_blocks: int) -> KvLayout:
    """The same block shape, ``num_blocks`` blocks, each block contiguous (a tier's layout)."""
    return msgspec.structs.replace(layout, num_blocks=num_blocks, order=MemoryOrder.BLOCK_MAJOR)


def local_copy(src: KvPool, src_ids: Sequence[int], dst: KvPool, dst_ids: Sequence[int],
               *, staged: bool | None = None) -> int:
    """Copy blocks between two pools this process can address (host or device); synchronous.

    Host <-> host: numpy copies of the merged descriptors. Same torch device: one vectorised
    ``copy_descriptors``. Different devices (``staged`` None), or ``staged=True``: ``staged_copy``.
    Returns bytes copied."""
    if MemoryKind.FILE in (src.kind, dst.kind):
        raise ValueError("local_copy moves host/device pools; files go through NixlFileIO")
    plan = plan_transfer(src.layout, list(src_ids), dst.layout, list(dst_ids), stage=False)
    d = plan.wire.array
    if not staged and src.kind is MemoryKind.HOST and dst.kind is MemoryKind.HOST:
        sv, dv = src.host_view(), dst.host_view()
        for s, t, n in d.tolist():
            dv[t : t + n] = sv[s : s + n]
        return int(d[:, 2].sum())
    st, dt = src.tensor_u8(), dst.tensor_u8()
    if staged or (staged is None and st.device != dt.device):
        return staged_copy(src, src_ids, dst, dst_ids)
    from dynamo_ext.transport.staging import copy_descriptors  # torch, lazily

    n = copy_descriptors(st, dt, d)
    _sync(st, dt)
    return n


def staged_copy(src: KvPool, src_ids: Sequence[int], dst: KvPool, dst_ids: Sequence[int]) -> int:
    """Across devices in one crossing: gather the blocks on the source's device into a contiguous
    block-major buffer (request order), copy that buffer across once, scatter it on the destination's
    device. Synchronous."""
    import torch

    from dynamo_ext.transport.staging import copy_descriptors

    n = len(src_ids)
    if n == 0:
        return 0
    canon = block_major(src.layout, n)
    st, dt = src.tensor_u8(), dst.tensor_u8()
    buf = torch.empty(canon.pool_bytes, dtype=torch.uint8, device=st.device)
    copy_descriptors(st, buf, plan_transfer(src.layout, list(src_ids), canon, list(range(n)), stage=False).wire)
    buf = buf.to(dt.device)
    copy_descriptors(buf, dt, plan_transfer(canon, list(range(n)), dst.layout, list(dst_ids), stage=False).wire)
    _sync(st, dt)
    return canon.pool_bytes


def _sync(*tensors: Any) -> None:
    """Wait for enqueued CUDA copies, so a returned move is complete for any reader."""
    for t in tensors:
        if t.device.type == "cuda":
            import torch

            torch.cuda.synchronize(t.device)


class TieredStore:
    def __init__(self, g1: KvPool, g2: KvPool, g3: KvPool | None = None, file_io: Any = None) -> None:
        if g2.kind is not MemoryKind.HOST:
            raise ValueError(f"G2 must be a host pool, got {g2.kind.value}")
        g1.layout.check_compatible(g2.layout)
        if g3 is not None:
            if g3.kind is not MemoryKind.FILE or file_io is None:
                raise ValueError("G3 must be a file pool, with a NixlFileIO to move it")
            g1.layout.check_compatible(g3.layout)
            file_io.register(g2)
            file_io.register(g3)
        self.g1, self.g2, self.g3, self.file_io = g1, g2, g3, file_io
        self._slots = {Tier.G2: SlotAllocator(g2.layout.num_blocks)}
        if g3 is not None:
            self._slots[Tier.G3] = SlotAllocator(g3.layout.num_blocks)
        self._owned: list[Any] = []  # pools / io created by ``create``

    @classmethod
    def create(cls, g1: KvPool, g2_blocks: int, g3_path: str | None = None, g3_blocks: int = 0,
               *, file_io: Any = None, name: str = "kv") -> "TieredStore":
        """G2 (block-major host pool) and optionally G3 (block-major file) sized in blocks."""
        g2 = KvPool.allocate_host(f"{name}-g2", block_major(g1.layout, g2_blocks))
        owned: list[Any] = []
        g3 = None
        if g3_path is not None:
            g3 = KvPool.open_file(f"{name}-g3", block_major(g1.layout, g3_blocks), g3_path)
            owned.append(g3)
            if file_io is None:
                from dynamo_ext.transport.file_tier import NixlFileIO

                file_io = NixlFileIO(f"{name}-file-io")
                owned.append(file_io)
        store = cls(g1, g2, g3, file_io)
        store._owned = owned
        return store

    # -- helpers ------------------------------------------------------------------------------
    def free_slots(self, tier: Tier) -> int:
        return self._slots[tier].num_free

    def _alloc(self, tier: Tier, n: int) -> list[int]:
        if tier not in self._slots:
            raise ValueError(f"tier {tier.value} is not configured")
        return self._slots[tier].allocate(n)

    def _file_descs(self, g2_slots: Sequence[int], g3_slots: Sequence[int]) -> np.ndarray:
        assert self.g3 is not None
        return plan_transfer(self.g2.layout, list(g2_slots), self.g3.layout, list(g3_slots), stage=False).wire.array

    def _g2_to_g3(self, g2_slots: Sequence[int], g3_slots: Sequence[int]) -> None:
        assert self.g3 is not None
        self.file_io.write(self.g2, self.g3, self._file_descs(g2_slots, g3_slots))

    def _g3_to_g2(self, g3_slots: Sequence[int], g2_slots: Sequence[int]) -> None:
        assert self.g3 is not None
        d = self._file_descs(g2_slots, g3_slots)  # (g2 offset, g3 offset, n): host first, as NixlFileIO wants
        self.file_io.read(self.g2, self.g3, d)

    def _staging_rounds(self, n: int) -> Iterator[tuple[int, list[int]]]:
        """(start, temporary G2 slots) rounds covering n blocks; slots are freed after each round."""
        if n and self.free_slots(Tier.G2) == 0:
            raise OutOfBlocks("no free G2 slot to stage file-tier blocks through")
        lo = 0
        while lo < n:
            tmp = self._alloc(Tier.G2, min(n - lo, self.free_slots(Tier.G2)))
            try:
                yield lo, tmp
            finally:
                self._slots[Tier.G2].free(tmp)
            lo += len(tmp)

    # -- operations ---------------------------------------------------------------------------------
    def offload(self, block_ids: Sequence[int], tier: Tier = Tier.G2) -> list[TierHandle]:
        """Copy G1 blocks down to ``tier``; the G1 blocks are untouched (the caller frees them)."""
        tier = Tier(tier)
        if tier is Tier.G1:
            raise ValueError("offload goes to G2 or G3")
        block_ids = list(block_ids)
        n = len(block_ids)
        if tier is Tier.G2:
            slots = self._alloc(Tier.G2, n)
            try:
                local_copy(self.g1, block_ids, self.g2, slots)
            except BaseException:
                self._slots[Tier.G2].free(slots)
                raise
            return [TierHandle(Tier.G2, s) for s in slots]
        slots3 = self._alloc(Tier.G3, n)
        try:
            for lo, tmp in self._staging_rounds(n):
                local_copy(self.g1, block_ids[lo : lo + len(tmp)], self.g2, tmp)
                self._g2_to_g3(tmp, slots3[lo : lo + len(tmp)])
        except BaseException:
            self._slots[Tier.G3].free(slots3)
            raise
        return [TierHandle(Tier.G3, s) for s in slots3]

    def onload(self, handles: Sequence[TierHandle], dst_block_ids: Sequence[int]) -> None:
        """Copy tier blocks up into G1 blocks ``dst_block_ids`` (same order). Handles stay held."""
        if len(handles) != len(dst_block_ids):
            raise ValueError(f"{len(handles)} handles for {len(dst_block_ids)} destination blocks")
        if len(set(dst_block_ids)) != len(dst_block_ids):
            raise ValueError("repeated destination block ids")
        self._check_held(handles)
        g2 = [(h.slot, b) for h, b in zip(handles, dst_block_ids) if h.tier is Tier.G2]
        g3 = [(h.slot, b) for h, b in zip(handles, dst_block_ids) if h.tier is Tier.G3]
        if g3 and self.free_slots(Tier.G2) == 0:
            raise OutOfBlocks("onload from G3 needs at least one free G2 slot to stage through")
        if g2:
            local_copy(self.g2, [s for s, _ in g2], self.g1, [b for _, b in g2])
        for lo, tmp in self._staging_rounds(len(g3)):
            part = g3[lo : lo + len(tmp)]
            self._g3_to_g2([s for s, _ in part], tmp)
            local_copy(self.g2, tmp, self.g1, [b for _, b in part])

    def move(self, handles: Sequence[TierHandle], tier: Tier) -> list[TierHandle]:
        """Move G2 <-> G3; returns the new handles (same order) and releases the old slots."""
        tier = Tier(tier)
        if tier is Tier.G1:
            raise ValueError("use onload to bring blocks into G1")
        self._check_held(handles)
        todo = [i for i, h in enumerate(handles) if h.tier is not tier]
        new = self._alloc(tier, len(todo))
        src = [handles[i].slot for i in todo]
        try:
            if todo and tier is Tier.G3:
                self._g2_to_g3(src, new)
            elif todo:
                self._g3_to_g2(src, new)
        except BaseException:
            self._slots[tier].free(new)
            raise
        out = list(handles)
        for i, s in zip(todo, new):
            out[i] = TierHandle(tier, s)
        self.release([handles[i] for i in todo])
        return out

    def release(self, handles: Sequence[TierHandle]) -> None:
        self._check_held(handles)
        for tier in (Tier.G2, Tier.G3):
            slots = [h.slot for h in handles if h.tier is tier]
            if slots:
                self._slots[tier].free(slots)

    def _check_held(self, handles: Sequence[TierHandle]) -> None:
        for h in handles:
            alloc = self._slots.get(h.tier)
            if alloc is None or h.slot not in alloc._used:
                raise DoubleFree(f"{h} is not held")

    def close(self) -> None:
        for o in reversed(self._owned):
            o.close()
        self._owned = []
