"""What the planner policies see: one `Signals` sample per planner tick (plain data, no Dynamo).

Where each field comes from (filled by the adapters in `planner.dynamo_plugins`, or by a test):

| field            | source                                                                             |
|------------------|------------------------------------------------------------------------------------|
| t                | the caller's clock, seconds (monotonic); policies never read the clock themselves  |
| ready_prefill/_decode | Dynamo `WorkerState.ready_*` (workers registered at `prefill` / `backend`)    |
| scaling_in_progress   | Dynamo `WorkerState.*_scaling_in_progress` (a previous decision not landed)   |
| expected_prefill/_decode | Dynamo `WorkerState.expected_*`: the desired counts the planner last published |
| prefill_queue    | FPM `queued_requests.num_prefill_requests` summed over prefill engines, plus the   |
|                  | frontend's `queued_requests` gauge (requests still waiting for a first token)      |
| decode_queue     | FPM queued requests on decode engines (waiting or preempted)                        |
| kv_usage         | our workers' `kv_cache_usage_perc` gauge (max over decode workers, 0..1), else FPM |
|                  | `sum_decode_kv_tokens / kv_capacity_tokens`                                          |
| ttft_s, itl_s    | mean TTFT / ITL over the last window (histogram _sum/_count deltas)                  |
| transfer_share   | mean KV transfer seconds / mean TTFT over the window (0..1): how much of TTFT is the |
|                  | prefill->decode KV pull rather than queueing or prefill compute                       |
| requests         | requests that got a first token in the window; 0 = idle, None = unknown              |

`None` always means "not measured this tick", never zero. The helpers below turn raw per-engine
metrics (duck-typed like Dynamo's `ForwardPassMetrics`) into the queue and KV fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable


@dataclass(frozen=True)
class Signals:
    t: float
    ready_prefill: int
    ready_decode: int
    prefill_queue: float = 0.0
    decode_queue: float = 0.0
    kv_usage: float | None = None
    ttft_s: float | None = None
    itl_s: float | None = None
    transfer_share: float | None = None
    requests: float | None = None
    scaling_in_progress: bool = False
    expected_prefill: int | None = None  # the deployment's desired counts (what the planner last published)
    expected_decode: int | None = None


@dataclass(frozen=True)
class FpmSummary:
    """Queue and KV load summed from one tick of ForwardPassMetrics."""

    prefill_queue: float = 0.0
    decode_queue: float = 0.0
    kv_usage: float | None = None
    engines: int = 0


def summarize_fpm(prefill: Iterable[Any], decode: Iterable[Any], kv_capacity_tokens: int | None = None) -> FpmSummary:
    """Sum queued requests per role; KV usage = max over decode engines of decode KV tokens / capacity.

    `prefill` / `decode` are decoded ForwardPassMetrics (objects with `queued_requests` and
    `scheduled_requests`); None entries (undecodable messages) are skipped.
    """
    pq = dq = 0.0
    n = 0
    usage: float | None = None
    for m in prefill:
        if m is None:
            continue
        n += 1
        pq += m.queued_requests.num_prefill_requests
    for m in decode:
        if m is None:
            continue
        n += 1
        dq += m.queued_requests.num_decode_requests + m.queued_requests.num_prefill_requests
        if kv_capacity_tokens:
            used = m.scheduled_requests.sum_decode_kv_tokens + m.queued_requests.sum_decode_kv_tokens
            u = min(1.0, used / kv_capacity_tokens)
            usage = u if usage is None else max(usage, u)
    return FpmSummary(prefill_queue=pq, decode_queue=dq, kv_usage=usage, engines=n)
