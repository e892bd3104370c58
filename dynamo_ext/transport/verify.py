"""Test patterns and checksums of pool bytes: what the probe peer, the NCCL comparison, the benchmarks and
the tests use to prove that every chunk landed where the layouts say.

    pattern(view, seed)                          position-dependent uint32 words (every word differs from
                                                 its neighbours), written in place
    chunk_ranges(layout, blocks)                 (offset, nbytes) of each chunk, (block, layer, kv) order
    digest(view, layout, blocks | None, ranges)  sha256 of those chunks / ranges / the whole view (host bytes)
    fingerprint(pool, layout, blocks)            fast position-weighted 64-bit sums, computed where the pool
                                                 lives (torch; GPU: ms per GiB)

Pure helpers over numpy views and KvLayout; ``probe.py`` re-exports them.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from .layout import KvLayout
from .pool import KvPool


def pattern(view: np.ndarray, seed: int) -> None:
    """Fill ``view`` (uint8) with a position-dependent pattern: every 4-byte word differs from its neighbours."""
    n4 = view.nbytes // 4
    w = view[: n4 * 4].view(np.uint32)
    np.multiply(np.arange(n4, dtype=np.uint32), np.uint32(2654435761), out=w)
    w += np.uint32(seed * 97 + 1)
    view[n4 * 4:] = seed & 0xFF


def chunk_ranges(layout: KvLayout, blocks: Sequence[int]) -> list[tuple[int, int]]:
    n = layout.chunk_bytes
    return [(layout.chunk_offset(b, layer, kv), n) for b in blocks for layer in range(layout.num_layers) for kv in (0, 1)]


def digest(view: np.ndarray, layout: KvLayout, blocks: Sequence[int] | None,
           ranges: Sequence[Sequence[int]] | None = None) -> str:
    """sha256 of the chunks of ``blocks`` (block, layer, kv order), of ``ranges``, or of the whole view."""
    h = hashlib.sha256()
    if ranges is not None:
        for off, n in ranges:
            h.update(view[off:off + n].data)
    elif blocks is None:
        h.update(view.data)
    else:
        for off, n in chunk_ranges(layout, blocks):
            h.update(view[off:off + n].data)
    return h.hexdigest()


def fingerprint(pool: KvPool, layout: KvLayout, blocks: Sequence[int]) -> str:
    """A fast check of the chunks of ``blocks`` (block, layer, kv order) where the pool lives (GPU: ~ms
    per GiB, vs seconds for sha256 after a device -> host copy): the chunks gathered as int64 words x,
    then (sum x, sum x * w) with position-dependent odd weights w, both mod 2^64. Any misplaced or
    wrong chunk changes it except with ~2^-64 odds for random data; not a cryptographic hash."""
    import torch  # noqa: PLC0415

    unit = layout.chunk_bytes
    if unit % 8:
        raise ValueError(f"fingerprint needs chunk_bytes % 8 == 0, got {unit}")
    offs = np.fromiter((o for o, _ in chunk_ranges(layout, blocks)), dtype=np.int64)
    t = pool.tensor_u8()
    rows = t[: (t.numel() // unit) * unit].view(-1, unit).view(torch.int64)
    g = rows.index_select(0, torch.from_numpy(offs // unit).to(t.device)).reshape(-1)
    w = torch.arange(g.numel(), dtype=torch.int64, device=t.device).mul_(-7046029254386353131).add_(1) | 1
    a, b = int(g.sum()), int((g * w).sum())
    return f"{a & (2**64 - 1):016x}{b & (2**64 - 1):016x}"


__all__ = ["chunk_ranges", "digest", "fingerprint", "pattern"]
