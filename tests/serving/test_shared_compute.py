"""router.shared_compute (issue 14.5; off by default): workers on the same GPU (or CPU workers of one host) slow each other's
prefills, so the router counts the prefill tokens queued on the others of a worker's compute domain in its
queue wait. On the serving core without processes: the domains come from the workers' topology records."""

from __future__ import annotations

from typing import Any

from dynamo_ext.metrics import NullMetrics
from dynamo_ext.serving import RouterCore, RouterSettings
from dynamo_ext.serving.router import WorkerInfo, compute_domain


def _topo(host: str, gpu: int | None) -> dict[str, Any]:
    return {"host": {"host_id": host}, "worker_gpu": gpu,
            "gpus": [{"index": i, "uuid": f"GPU-{host}-{i}"} for i in range(2)] if gpu is not None else []}


class TwoGpuPlane:
    """Prefill 1 on GPU 0, prefill 2 on GPU 1, decode 3 on GPU 0 (it shares p1's GPU)."""

    def __init__(self) -> None:
        self.topo = {("prefill", 1): _topo("n", 0), ("prefill", 2): _topo("n", 1), ("decode", 3): _topo("n", 0)}

    def prefill_ids(self) -> list[int]:
        return [1, 2]

    def decode_ids(self) -> list[int]:
        return [3]

    def info(self, role: str, worker: int) -> WorkerInfo | None:
        t = self.topo.get((role, worker))
        return WorkerInfo(kv_layout={}, topology=t) if t is not None else None

    def overlap(self, tokens: list[int]) -> dict[int, int]:
        return {}


def test_compute_domain_from_the_topology_record():
    assert compute_domain(WorkerInfo({}, _topo("n", 1))) == "gpu:GPU-n-1"
    assert compute_domain(WorkerInfo({}, _topo("n", None))) == "cpu:n"
    assert compute_domain(WorkerInfo({}, {})) is None and compute_domain(None) is None


def test_a_local_prefill_backlog_on_a_gpu_delays_the_prefill_worker_that_shares_it():
    kw = dict(policy="dynamo-ext", disagg_min_prompt_tokens=0, kv_bytes_per_token=4096, local_prefill=False)
    on = RouterCore(RouterSettings(**kw, shared_compute=True), TwoGpuPlane(), NullMetrics())
    off = RouterCore(RouterSettings(**kw), TwoGpuPlane(), NullMetrics())  # the default: off
    for core in (on, off):
        core.meter.planned("busy", 3, 6_000, True, 0.0)  # decode 3 prefills 6,000 tokens itself, on GPU 0
        core.meter.planned("p2", 2, 1_000, False, 0.0)  # prefill 2 has 1,000 of its own queued
    snaps = {s.worker_id: s for s in on.snapshots({}, [1, 2], [3], 0.0)}
    assert (snaps[1].shared_queue_tokens, snaps[2].shared_queue_tokens, snaps[3].shared_queue_tokens) == (6_000, 0, 0)
    assert snaps[2].queue_tokens == 1_000
    assert all(s.shared_queue_tokens == 0 for s in off.snapshots({}, [1, 2], [3], 0.0))
    prompt = list(range(512))
    assert on.choose(prompt, "a").prefill == 2  # p1 would wait behind GPU 0's 6,000 tokens, p2 behind 1,000
    assert off.choose(prompt, "a").prefill == 1  # each assumed alone: p1 is idle
