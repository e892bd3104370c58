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


DIGEST_KINDS = ("xxh3", "wsum")


def digest_kind_for(pool: KvPool) -> str:
    """The digest a holder computes for its pool: xxh3 over host memory (~GB/s per core, no copies), the
    weighted sum on the GPU for device memory (one gather, where the bytes are)."""
    return "wsum" if pool.kind.value == "device" else "xxh3"


def block_digests(pool: KvPool, layout: KvLayout, blocks: Sequence[int], kind: str | None = None) -> list[int]:
    """One 64-bit digest per block (every (layer, K|V) chunk of it, in (layer, K|V) order): equal bytes give
    equal digests in every process and memory order; a changed byte changes it except with ~2^-64 odds (not a
    cryptographic hash). What ``kv_transfer.verify`` checks. ``kind`` (default ``digest_kind_for(pool)``):
    ``xxh3`` = XXH3-64 of the chunks (host pools; a device pool is read through a host copy), ``wsum`` = the
    chunks as int64 words x, sum(x * w) + sum(x) mod 2^64 with position-dependent odd weights (computed where
    the pool lives: the GPU for device pools)."""
    kind = kind or digest_kind_for(pool)
    if kind not in DIGEST_KINDS:
        raise ValueError(f"unknown digest kind {kind!r} (allowed: {', '.join(DIGEST_KINDS)})")
    n = len(blocks)
    if n == 0:
        return []
    if kind == "xxh3":
        return _xxh3_digests(pool, layout, blocks)
    import torch  # noqa: PLC0415

    unit = layout.chunk_bytes
    if unit % 8:
        raise ValueError(f"block digests need chunk_bytes % 8 == 0, got {unit}")
    ids = np.asarray(list(blocks), dtype=np.int64)
    lkv = np.arange(layout.num_layers * 2, dtype=np.int64)
    probe = [layout.chunk_offset(0, 0, 0), layout.chunk_offset(min(1, layout.num_blocks - 1), 0, 0),
             layout.chunk_offset(0, 0, 1)]
    sb, sl = (probe[1] - probe[0]) if layout.num_blocks > 1 else 0, probe[2] - probe[0]
    offs = (ids[:, None] * sb + lkv[None, :] * sl).reshape(-1) // unit  # chunk rows, (block, layer*2+kv) order
    t = pool.tensor_u8()
    rows = t[: (t.numel() // unit) * unit].view(-1, unit).view(torch.int64)
    g = rows.index_select(0, torch.from_numpy(offs).to(t.device)).reshape(n, -1)
    w = torch.arange(g.shape[1], dtype=torch.int64, device=t.device).mul_(-7046029254386353131).add_(1) | 1
    d = (g * w).sum(dim=1) + g.sum(dim=1)
    return [int(x) & (2**64 - 1) for x in d.tolist()]


def _xxh3_digests(pool: KvPool, layout: KvLayout, blocks: Sequence[int]) -> list[int]:
    import xxhash  # noqa: PLC0415

    if pool.kind.value == "device":
        buf = memoryview(pool.tensor_u8().cpu().numpy())
    else:
        buf = memoryview(pool.tensor_u8().numpy())
    n = layout.chunk_bytes
    out = []
    for b in blocks:
        h = xxhash.xxh3_64()
        for layer in range(layout.num_layers):
            for kv in (0, 1):
                o = layout.chunk_offset(int(b), layer, kv)
                h.update(buf[o:o + n])
        out.append(h.intdigest())
    return out


__all__ = ["DIGEST_KINDS", "block_digests", "chunk_ranges", "digest_kind_for", "digest", "fingerprint", "pattern"]
