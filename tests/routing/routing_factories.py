"""Builders for routing tests: small, readable worker snapshots and link tables."""

from __future__ import annotations

from dynamo_ext.routing import LinkInfo, LinkTable, RequestShape, Role, WorkerSnapshot

BLOCK = 16
KV_PER_TOKEN = 100_000  # 1.6 MB per block: 1,000 tokens = 0.1 GB


def request(tokens: int = 4096, **kw) -> RequestShape:
    return RequestShape(prompt_tokens=tokens, block_size=BLOCK, kv_bytes_per_token=KV_PER_TOKEN, **kw)


def prefill(wid: int, thr: float = 10_000.0, **kw) -> WorkerSnapshot:
    kw.setdefault("layout_key", "L")
    return WorkerSnapshot(worker_id=wid, role=Role.PREFILL, prefill_tokens_per_s=thr, **kw)


def decode(wid: int, thr: float = 5_000.0, **kw) -> WorkerSnapshot:
    kw.setdefault("layout_key", "L")
    kw.setdefault("free_blocks", 100_000)
    return WorkerSnapshot(worker_id=wid, role=Role.DECODE, prefill_tokens_per_s=thr, **kw)


def links(entries: dict | None = None, gbps: float = 50.0, latency: float = 0.0, **kw) -> LinkTable:
    return LinkTable(entries or {}, default=LinkInfo(gbps, latency), **kw)
