"""Prometheus metrics of the transport layer, updated once per completed transfer.

Called by ``transfer.TransferHandle`` when a transfer completes (successfully: bytes and seconds;
failed: the error counter). Labels: ``path`` ("host->host", "device->device", ...), ``direction``
("read" | "write" | "copy"), ``backend`` ("nixl" | "tcp" | "local" | "cuda_ipc").
Registered in prometheus_client's default registry unless a registry is passed to ``make_metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

LABELS = ("path", "direction", "backend")


@dataclass(frozen=True)
class TransportMetrics:
    bytes_total: Counter
    seconds: Histogram
    descriptors: Histogram
    errors_total: Counter

    def observe(self, *, path: str, direction: str, backend: str, nbytes: int, seconds: float, descriptors: int) -> None:
        lab = (path, direction, backend)
        self.bytes_total.labels(*lab).inc(nbytes)
        self.seconds.labels(*lab).observe(seconds)
        self.descriptors.labels(*lab).observe(descriptors)

    def error(self, *, path: str, direction: str, backend: str, kind: str) -> None:
        self.errors_total.labels(path, direction, backend, kind).inc()


def make_metrics(registry: CollectorRegistry | None = REGISTRY) -> TransportMetrics:
    kw: dict[str, Any] = {"registry": registry}
    return TransportMetrics(
        bytes_total=Counter("dynamo_ext_kv_transfer_bytes_total", "KV bytes moved by completed transfers", LABELS, **kw),
        seconds=Histogram("dynamo_ext_kv_transfer_seconds", "Wall time of completed KV transfers", LABELS,
                          buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                          **kw),
        descriptors=Histogram("dynamo_ext_kv_transfer_descriptors", "Wire descriptors per completed KV transfer",
                              LABELS, buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144), **kw),
        errors_total=Counter("dynamo_ext_kv_transfer_errors_total", "Failed KV transfers by error type",
                             LABELS + ("error",), **kw),
    )


_METRICS: TransportMetrics | None = None


def metrics() -> TransportMetrics:
    """The process-wide metrics (created on first use in the default registry)."""
    global _METRICS
    if _METRICS is None:
        _METRICS = make_metrics()
    return _METRICS
