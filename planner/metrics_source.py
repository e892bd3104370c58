"""Latency, KV-usage and transfer-share signals from Prometheus text endpoints (ours and Dynamo's).

Dynamo's pipeline context gives the plugins worker counts and ForwardPassMetrics (queues), but
not TTFT, ITL, `kv_cache_usage_perc` or the KV transfer time. `MetricsScraper` reads them from the
`/metrics` endpoints of the frontend and our workers, one scrape per planner tick:

    scrape (HTTP GET, text format)  ->  Snapshot (sums of the named series)  ->  window(prev, cur)

`window` is pure: TTFT and ITL are means over the window from histogram `_sum` / `_count`
deltas, `requests` is the TTFT count delta, `transfer_share` = mean transfer seconds / mean TTFT,
`kv_usage` is the max of the usage gauges of non-prefill endpoints (an endpoint whose
`dynamo_ext_worker_info` says role="prefill" holds KV only until decode pulls it), `queue` the sum
of the queue gauges. The first scrape
yields only gauges (no window yet). Counter resets (a restarted process) make a delta negative;
that window's latency fields are then None.

Metric names are configurable (`MetricNames`); defaults are Dynamo's frontend metrics and the
dynamo_ext worker/transport metrics.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class MetricNames:
    ttft: str = "dynamo_frontend_time_to_first_token_seconds"
    itl: str = "dynamo_frontend_inter_token_latency_seconds"
    transfer: str = "dynamo_ext_kv_transfer_seconds"
    kv_usage: tuple[str, ...] = ("dynamo_ext_kv_cache_usage_perc", "kv_cache_usage_perc")
    queue: tuple[str, ...] = ("dynamo_frontend_queued_requests",)
    worker_info: str = "dynamo_ext_worker_info"  # label `role`: KV usage of "prefill" endpoints is not decode load


@dataclass(frozen=True)
class Snapshot:
    sums: dict[str, float] = field(default_factory=dict)  # "<histogram>_sum" / "_count" totals
    kv_usage: float | None = None
    queue: float | None = None
    role: str | None = None


@dataclass(frozen=True)
class Window:
    ttft_s: float | None = None
    itl_s: float | None = None
    transfer_share: float | None = None
    requests: float | None = None
    kv_usage: float | None = None
    queue: float | None = None


def parse(text: str, names: MetricNames, into: dict[str, float] | None = None) -> Snapshot:
    """Sum the histogram _sum/_count of the named series (all label sets) and read the gauges."""
    sums: dict[str, float] = dict(into or {})
    kv: float | None = None
    queue: float | None = None
    role: str | None = None
    hist = {names.ttft, names.itl, names.transfer}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            base = s.name[: -len("_sum")] if s.name.endswith("_sum") else s.name[: -len("_count")] if s.name.endswith("_count") else None
            if base in hist:
                sums[s.name] = sums.get(s.name, 0.0) + float(s.value)
            elif s.name in names.kv_usage:
                v = float(s.value)
                v = v / 100.0 if v > 1.0 else v  # accept 0..1 or 0..100
                kv = v if kv is None else max(kv, v)
            elif s.name in names.queue:
                queue = (queue or 0.0) + float(s.value)
            elif s.name == names.worker_info and s.value:
                role = s.labels.get("role", role)
    return Snapshot(sums=sums, kv_usage=kv, queue=queue, role=role)


def merge(snaps: list[Snapshot]) -> Snapshot:
    sums: dict[str, float] = {}
    kv: float | None = None
    queue: float | None = None
    for sn in snaps:
        for k, v in sn.sums.items():
            sums[k] = sums.get(k, 0.0) + v
        if sn.kv_usage is not None and sn.role != "prefill":
            kv = sn.kv_usage if kv is None else max(kv, sn.kv_usage)
        if sn.queue is not None:
            queue = (queue or 0.0) + sn.queue
    return Snapshot(sums=sums, kv_usage=kv, queue=queue)


def _mean(prev: Snapshot, cur: Snapshot, base: str) -> tuple[float | None, float | None]:
    """(mean, count) of a histogram over the window; (None, None) when absent or reset."""
    s1, c1 = cur.sums.get(base + "_sum"), cur.sums.get(base + "_count")
    if s1 is None or c1 is None:
        return None, None
    ds, dc = s1 - prev.sums.get(base + "_sum", 0.0), c1 - prev.sums.get(base + "_count", 0.0)
    if dc < 0 or ds < 0:
        return None, None
    return (ds / dc if dc > 0 else None), dc


def window(prev: Snapshot | None, cur: Snapshot, names: MetricNames) -> Window:
    if prev is None:
        return Window(kv_usage=cur.kv_usage, queue=cur.queue)
    ttft, n = _mean(prev, cur, names.ttft)
    itl, _ = _mean(prev, cur, names.itl)
    xfer, _ = _mean(prev, cur, names.transfer)
    share = None
    if ttft and xfer is not None:
        share = max(0.0, min(1.0, xfer / ttft))
    return Window(ttft_s=ttft, itl_s=itl, transfer_share=share, requests=n, kv_usage=cur.kv_usage, queue=cur.queue)


class MetricsScraper:
    """Scrapes a fixed list of `/metrics` URLs; `sample()` returns the window since the last call."""

    def __init__(self, urls: list[str], names: MetricNames | None = None, timeout_s: float = 2.0) -> None:
        self.urls = list(urls)
        self.names = names or MetricNames()
        self.timeout_s = timeout_s
        self._prev: Snapshot | None = None

    def _fetch(self, url: str) -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as r:  # noqa: S310 - operator-given URL
                return r.read().decode("utf-8", "replace")
        except OSError:
            return None

    def sample(self) -> Window:
        snaps = [parse(t, self.names) for t in (self._fetch(u) for u in self.urls) if t is not None]
        if not snaps:
            return Window()
        cur = merge(snaps)
        w = window(self._prev, cur, self.names)
        self._prev = cur
        return w
