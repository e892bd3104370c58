"""The paged KV pool is exactly the memory a ``KvLayout`` describes; plus a free-list block allocator.

    PagedKvPool(layout, device)
      buffer: uint8 tensor of layout.pool_bytes           what NIXL registers and moves; on the CPU it lives in
                                                          shared memory (transport.pool.shared_host_tensor: a
                                                          memfd a peer worker of the same host maps, backend shm)
      k[layer], v[layer]: typed views [num_blocks, block_size, num_kv_heads, head_dim]
          chunk (block, layer, kv) starts at layout.chunk_offset(block, layer, kv)  (both memory orders)
      chunk(block, layer, kv) -> uint8 view of that chunk
    FreeListAllocator(num_blocks)                           BlockAllocator with reference counts
      allocate(n) / free(ids) / share(ids) (one more reference) / num_free / refcount(id)

In ``layer_major`` order the per-layer views are contiguous; in ``block_major`` they are strided
(the stride between blocks is a whole block). Indexing with block ids works the same on both, so
attention has one code path.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import torch

from dynamo_ext.transport.layout import KvLayout, MemoryOrder
from dynamo_ext.transport.pool import shared_host_tensor, shared_memory_available

from .model import torch_dtype
from .protocol import OutOfBlocks


class PagedKvPool:
    def __init__(self, layout: KvLayout, device: str | torch.device = "cpu"):
        self.layout = layout
        self.device = torch.device(device)
        self.dtype = torch_dtype(layout.dtype)
        if self.device.type == "cpu" and shared_memory_available():
            self.buffer = shared_host_tensor(layout.pool_bytes, "kv")  # zero-filled, like torch.zeros
        else:
            self.buffer = torch.zeros(layout.pool_bytes, dtype=torch.uint8, device=self.device)
        L, nb, bs, h, d = layout.num_layers, layout.num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim
        typed = self.buffer.view(self.dtype)
        if layout.order is MemoryOrder.LAYER_MAJOR:
            t = typed.view(L, 2, nb, bs, h, d)
            self.k = [t[i, 0] for i in range(L)]
            self.v = [t[i, 1] for i in range(L)]
        else:
            t = typed.view(nb, L, 2, bs, h, d)
            self.k = [t[:, i, 0] for i in range(L)]
            self.v = [t[:, i, 1] for i in range(L)]

    def chunk(self, block: int, layer: int, kv: int) -> torch.Tensor:
        off = self.layout.chunk_offset(block, layer, kv)
        return self.buffer[off : off + self.layout.chunk_bytes]

    def copy_blocks_from(self, src: "PagedKvPool", src_blocks: Sequence[int], dst_blocks: Sequence[int]) -> None:
        """Byte copy of whole blocks chunk by chunk (what a NIXL transfer does; used by tests)."""
        self.layout.check_compatible(src.layout)
        if len(src_blocks) != len(dst_blocks):
            raise ValueError("src/dst block lists differ in length")
        for sb, db in zip(src_blocks, dst_blocks):
            for layer in range(self.layout.num_layers):
                for kv in (0, 1):
                    self.chunk(db, layer, kv).copy_(src.chunk(sb, layer, kv))


class FreeListAllocator:
    """FIFO free list (lowest ids first) with reference counts."""

    def __init__(self, num_blocks: int):
        self._num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} blocks, {len(self._free)} free of {self._num_blocks}")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def share(self, block_ids: Sequence[int]) -> None:
        for b in block_ids:
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} is free; cannot share it")
            self._refs[b] += 1

    def free(self, block_ids: Sequence[int]) -> None:
        for b in block_ids:
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} freed more often than allocated")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)
