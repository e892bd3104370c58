"""TransferPlan: a pure function from (layouts, block ids) to the descriptors that move them.

STATUS: API contract written by the lead; the merging/staging implementation and the property
tests are being written (see the transport README once it exists). The naive version below emits
one descriptor per (block, layer, K|V) chunk and is kept as ``plan_naive`` for the benchmark.

Inputs: source layout + source block ids, destination layout + destination block ids (same length,
pairwise: src_blocks[i] -> dst_blocks[i]). Layouts must be compatible (``LayoutMismatch``).

Output: ``TransferPlan`` with
  - ``wire``: the descriptors that cross the link, each ``Descriptor(src_offset, dst_offset, nbytes)``
    with offsets from the start of the source / destination region named by ``wire_src``/``wire_dst``
    ("pool" or "staging");
  - ``gather``: copies done by the source side before the wire step (pool -> its staging buffer),
    empty unless the plan stages;
  - ``scatter``: copies done by the destination side after the wire step (its staging -> pool).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Sequence

from .errors import InvalidBlocks
from .layout import KvLayout


class Descriptor(NamedTuple):
    src_offset: int
    dst_offset: int
    nbytes: int


Region = Literal["pool", "staging"]


@dataclass(frozen=True)
class TransferPlan:
    src_layout: KvLayout
    dst_layout: KvLayout
    src_blocks: tuple[int, ...]
    dst_blocks: tuple[int, ...]
    wire: tuple[Descriptor, ...]
    wire_src: Region = "pool"
    wire_dst: Region = "pool"
    gather: tuple[Descriptor, ...] = ()
    scatter: tuple[Descriptor, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(d.nbytes for d in self.wire)

    @property
    def num_descriptors(self) -> int:
        return len(self.wire)

    @property
    def staged(self) -> bool:
        return bool(self.gather or self.scatter)


def _check(src_layout: KvLayout, src_blocks: Sequence[int], dst_layout: KvLayout, dst_blocks: Sequence[int]) -> None:
    src_layout.check_compatible(dst_layout)
    if len(src_blocks) != len(dst_blocks):
        raise InvalidBlocks(f"{len(src_blocks)} source blocks but {len(dst_blocks)} destination blocks")
    src_layout.validate_blocks(list(src_blocks), "source block")
    dst_layout.validate_blocks(list(dst_blocks), "destination block")
    if len(set(dst_blocks)) != len(dst_blocks):
        raise InvalidBlocks("destination block ids repeat: two chunks would land on the same bytes")


def plan_naive(src_layout: KvLayout, src_blocks: Sequence[int], dst_layout: KvLayout, dst_blocks: Sequence[int]) -> TransferPlan:
    """One descriptor per (block, layer, K|V) chunk: what a connector without planning sends."""
    _check(src_layout, src_blocks, dst_layout, dst_blocks)
    n = src_layout.chunk_bytes
    wire = tuple(
        Descriptor(src_layout.chunk_offset(s, layer, kv), dst_layout.chunk_offset(d, layer, kv), n)
        for s, d in zip(src_blocks, dst_blocks)
        for layer in range(src_layout.num_layers)
        for kv in (0, 1)
    )
    return TransferPlan(src_layout, dst_layout, tuple(src_blocks), tuple(dst_blocks), wire)


def plan_transfer(src_layout: KvLayout, src_blocks: Sequence[int], dst_layout: KvLayout, dst_blocks: Sequence[int], **_: object) -> TransferPlan:
    """Planned transfer (merged runs, optional staging). Naive until the planner lands."""
    return plan_naive(src_layout, src_blocks, dst_layout, dst_blocks)
