"""KV cache layout: where every (block, layer, K|V) chunk of a paged KV pool lives in memory.

A pool is one contiguous region of ``num_blocks`` blocks. A *chunk* is the K (kv=0) or V (kv=1)
tensor of one layer for one block: ``block_size * num_kv_heads * head_dim`` elements, contiguous,
``chunk_bytes`` long. Two memory orders:

``layer_major``  (vLLM's per-layer KV tensors laid end to end)::

    offset(block, layer, kv) = ((layer * 2 + kv) * num_blocks + block) * chunk_bytes

``block_major``  (one block holds all of its layers; a whole block is contiguous)::

    offset(block, layer, kv) = ((block * num_layers + layer) * 2 + kv) * chunk_bytes

Two layouts are *compatible* (bytes can move between them) when layers, KV heads, head dim,
tokens per block and dtype agree; memory order and pool size may differ. ``check_compatible``
raises ``LayoutMismatch`` naming every differing field, before any byte moves.

Layouts travel between peers as plain JSON/msgpack (``to_dict``/``from_dict``), validated by msgspec.
"""

from __future__ import annotations

import operator
from enum import Enum
from typing import Any

import msgspec

from .errors import InvalidBlocks, LayoutMismatch

DTYPE_BYTES: dict[str, int] = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "uint8": 1,
}


def _is_index(b: object) -> bool:
    """An integer block id: Python or NumPy integer, not bool (``True`` is not a block id)."""
    if isinstance(b, bool):
        return False
    try:
        operator.index(b)
    except TypeError:
        return False
    return True


class MemoryOrder(str, Enum):
    LAYER_MAJOR = "layer_major"
    BLOCK_MAJOR = "block_major"


class KvLayout(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int  # tokens per block
    dtype: str
    num_blocks: int  # pool capacity in blocks
    order: MemoryOrder = MemoryOrder.LAYER_MAJOR

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "num_blocks"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"KvLayout.{name} must be a positive integer, got {v!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"KvLayout.dtype {self.dtype!r} is not one of {sorted(DTYPE_BYTES)}")
        # msgspec converts ``order`` to the enum only when decoding; a plain ``KvLayout(...,
        # order="layer_major")`` keeps the str, and ``chunk_offset``'s ``is`` test would then
        # silently compute block-major offsets. Normalise (and validate) it here.
        if not isinstance(self.order, MemoryOrder):
            try:
                order = MemoryOrder(self.order)
            except ValueError:
                raise ValueError(
                    f"KvLayout.order {self.order!r} is not one of {[m.value for m in MemoryOrder]}"
                ) from None
            msgspec.structs.force_setattr(self, "order", order)

    # -- sizes -----------------------------------------------------------------------------
    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one (block, layer, K|V) chunk."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers, K and V."""
        return self.chunk_bytes * 2 * self.num_layers

    @property
    def pool_bytes(self) -> int:
        return self.block_bytes * self.num_blocks

    @property
    def chunks_per_block(self) -> int:
        return 2 * self.num_layers

    # -- addressing --------------------------------------------------------------------------
    def chunk_offset(self, block: int, layer: int, kv: int) -> int:
        """Byte offset of chunk (block, layer, kv) from the start of the pool."""
        if not 0 <= block < self.num_blocks:
            raise InvalidBlocks(f"block id {block} out of range [0, {self.num_blocks})")
        if not 0 <= layer < self.num_layers or kv not in (0, 1):
            raise IndexError(f"layer {layer} / kv {kv} out of range")
        if self.order is MemoryOrder.LAYER_MAJOR:
            idx = (layer * 2 + kv) * self.num_blocks + block
        else:
            idx = (block * self.num_layers + layer) * 2 + kv
        return idx * self.chunk_bytes

    def validate_blocks(self, blocks: list[int] | tuple[int, ...], what: str = "block") -> None:
        bad = [b for b in blocks if not _is_index(b) or not 0 <= b < self.num_blocks]
        if bad:
            raise InvalidBlocks(
                f"{what} ids out of range [0, {self.num_blocks}): {bad[:8]}{' ...' if len(bad) > 8 else ''}"
            )

    # -- compatibility -------------------------------------------------------------------------
    def mismatches(self, other: "KvLayout") -> list[str]:
        out = []
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "dtype"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"{name}: {a!r} != {b!r}")
        return out

    def check_compatible(self, other: "KvLayout") -> None:
        diff = self.mismatches(other)
        if diff:
            raise LayoutMismatch("KV layouts are incompatible (" + "; ".join(diff) + ")")

    # -- wire ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KvLayout":
        return msgspec.convert(d, cls)

    def with_blocks(self, num_blocks: int) -> "KvLayout":
        return msgspec.structs.replace(self, num_blocks=num_blocks)


# Named shapes (per-layer shapes of real models). num_blocks is a placeholder: use with_blocks().
PRESETS: dict[str, KvLayout] = {
    "llama3-70b": KvLayout(num_layers=80, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16", num_blocks=1),
    "llama3-8b": KvLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16", num_blocks=1),
    "tiny": KvLayout(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16, dtype="float32", num_blocks=1),
}


def preset(name: str, num_blocks: int = 1, order: MemoryOrder | str = MemoryOrder.LAYER_MAJOR) -> KvLayout:
    if name not in PRESETS:
        raise ValueError(f"unknown layout preset {name!r}; allowed: {sorted(PRESETS)}")
    return msgspec.structs.replace(PRESETS[name], num_blocks=num_blocks, order=MemoryOrder(order))
