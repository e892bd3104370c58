"""The TTFT cost model: the terms of one option's estimate, as small pure functions.

Written out (units: tokens, bytes, seconds; ``thr`` = the prefilling worker's prefill tokens/s)::

    overlap    = min(worker.overlap_blocks, prompt_blocks)            cached prefix on that worker
    onload     = 0                                       if the prefix is on device
               = overlap * bytes_per_block / tier GB/s   otherwise; if that is not faster than
                                                         recomputing those tokens, overlap := 0
    uncached   = max(prompt_tokens - min(overlap * block_size, prompt_tokens), 1)
    queue_wait = (queue_tokens + shared_queue_tokens) / thr + queued_requests * per_request_overhead_s
                                                         shared_queue_tokens: the queues of the workers
                                                         sharing its compute (same GPU / host CPUs)
    prefill    = uncached / thr
    work       = work_weight * prefill                              RoutingConfig.work_weight (default 0)
    side_cost  = ((queue_wait + onload) + prefill) + work

    disagg (p -> d): total = (side_cost(p) + (pair_kv_bytes(d) / link(p,d) B/s + link latency))
                             + d.admission_delay_s
    local  (d):      total = d.admission_delay_s + side_cost(d)

``pair_kv_bytes(d)`` = the prompt's blocks minus the leading blocks ``d`` holds on device
(``d.overlap_blocks``, tier device), at least one block: the decode worker pulls only what its own
prefix cache lacks (workers/decode.py). Without a device overlap on ``d`` the whole prompt moves.
The addition order above is the one ``decide`` ranks by; reported terms add up to the total in
exactly that order, so a reported estimate is bit-for-bit the value that was compared.
"""

from __future__ import annotations

from typing import NamedTuple

from .decision import Option, OptionKind, Terms
from .inputs import RequestShape, RoutingConfig, Tier, WorkerSnapshot
from .links import LinkInfo, LinkTable

_GB = 1e9


class SideCost(NamedTuple):
    """Prefill-side terms of one worker for one request."""

    cost_s: float
    queue_wait_s: float
    onload_s: float
    prefill_s: float
    overlap_blocks: int
    uncached_tokens: int
    work_s: float = 0.0


def side_cost(w: WorkerSnapshot, req: RequestShape, cfg: RoutingConfig) -> SideCost:
    """Queue wait, onload and prefill of the uncached tokens if ``w`` prefills ``req``.

    ``w.prefill_tokens_per_s`` must be > 0 (callers exclude workers without throughput).
    """
    thr = w.prefill_tokens_per_s
    prompt = req.prompt_tokens
    bs = req.block_size
    ov = w.overlap_blocks
    onload = 0.0
    if ov > 0:
        pblocks = -(-prompt // bs)
        if ov > pblocks:
            ov = pblocks
        if w.overlap_tier is not Tier.DEVICE:
            gbps = w.onload_gb_per_s if w.onload_gb_per_s is not None else cfg.onload_gb_per_s(w.overlap_tier)
            onload = (ov * req.kv_bytes_per_block) / (gbps * _GB)
            cached_tokens = ov * bs if ov * bs < prompt else prompt
            if onload >= cached_tokens / thr:  # recomputing is no slower: ignore the copy
                ov = 0
                onload = 0.0
    cached = ov * bs
    if cached > prompt:
        cached = prompt
    uncached = prompt - cached
    if uncached < 1 and prompt > 0:
        uncached = 1  # the last prompt token is always computed: it yields the first output token
    queue = (w.queue_tokens + w.shared_queue_tokens) / thr + w.queued_requests * cfg.per_request_overhead_s
    prefill = uncached / thr
    work = cfg.work_weight * prefill
    return SideCost(((queue + onload) + prefill) + work, queue, onload, prefill, ov, uncached, work)


def device_blocks_needed_local(w: WorkerSnapshot, req: RequestShape) -> int:
    """Free device blocks a local prefill on ``w`` needs: the prompt minus what is already on device."""
    pblocks = req.prompt_blocks
    if w.overlap_tier is Tier.DEVICE:
        return pblocks - min(w.overlap_blocks, pblocks)
    return pblocks


def local_option(d: WorkerSnapshot, req: RequestShape, cfg: RoutingConfig) -> Option:
    """Local prefill on decode/agg worker ``d``: no transfer, its own overlap and queue."""
    s = side_cost(d, req, cfg)
    adm = d.admission_delay_s
    total = adm + s.cost_s
    terms = Terms(s.queue_wait_s, s.onload_s, s.prefill_s, 0.0, 0.0, adm, total, s.work_s)
    return Option(OptionKind.LOCAL, d.worker_id, d.worker_id, terms, s.overlap_blocks, s.uncached_tokens, 0, 0.0)


def pulled_blocks(d: WorkerSnapshot, req: RequestShape) -> int:
    """Blocks a hand-off to ``d`` moves: the prompt's blocks minus the leading ones ``d`` already holds
    on device (its own prefix cache), but at least one (the decode worker always pulls the last block)."""
    pb = req.prompt_blocks
    ov = d.overlap_blocks
    if ov > 0 and pb > 1 and d.overlap_tier is Tier.DEVICE:
        return pb - (ov if ov < pb - 1 else pb - 1)
    return pb


def pair_kv_bytes(d: WorkerSnapshot, req: RequestShape) -> int:
    """Bytes a hand-off to ``d`` moves (``pulled_blocks`` whole blocks)."""
    return pulled_blocks(d, req) * req.kv_bytes_per_block


def pair_link(p: WorkerSnapshot, d: WorkerSnapshot, links: LinkTable) -> LinkInfo:
    return links.link(p.worker_id, d.worker_id, p.node, d.node)


def pair_option(
    p: WorkerSnapshot, d: WorkerSnapshot, req: RequestShape, links: LinkTable, cfg: RoutingConfig,
    side: SideCost | None = None,
) -> Option:
    """Prefill on ``p``, KV of the prompt blocks ``d`` lacks moved over link ``p -> d``, decode on ``d``."""
    s = side if side is not None else side_cost(p, req, cfg)
    info = pair_link(p, d, links)
    kvb = pair_kv_bytes(d, req)
    xfer = kvb * (1.0 / (info.gb_per_s * _GB))
    lat = info.latency_s
    adm = d.admission_delay_s
    total = (s.cost_s + (xfer + lat)) + adm
    terms = Terms(s.queue_wait_s, s.onload_s, s.prefill_s, xfer, lat, adm, total, s.work_s)
    return Option(OptionKind.DISAGG, p.worker_id, d.worker_id, terms, s.overlap_blocks, s.uncached_tokens,
                  kvb, info.gb_per_s)


__all__ = ["SideCost", "side_cost", "device_blocks_needed_local", "local_option", "pulled_blocks", "pair_kv_bytes",
           "pair_link", "pair_option"]
