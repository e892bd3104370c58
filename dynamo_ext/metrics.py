"""Prometheus metrics of a worker process, and the small HTTP server that exposes them.

Who calls what::

    worker start-up (dynamo_ext/workers/)      m = WorkerMetrics(role)           gauges/histograms below
                                               srv = serve_http(port, health)    GET /metrics, /health, /live
                                               REGISTRY.register(CountersCollector(...))  counters read at scrape
                                               time from the serving core (router decisions, migrations,
                                               the engine's prefix-cache counters)
    per request                                m.ttft.observe(s), m.tpot.observe(s), m.requests.labels(outcome).inc()
    every metrics tick (~0.5 s)                m.set_load(queued=, running=, kv_usage=, held_handles=)
    decode worker, per received transfer       transport/metrics.py (dynamo_ext_kv_transfer_*), updated by
                                               transport.pull / push / copy themselves, same registry
    shutdown                                   srv.close()

Everything lives in prometheus_client's default registry (one worker per process), so the transfer
metrics of ``transport/metrics.py`` come out of the same ``/metrics``. The server binds 127.0.0.1
unless told otherwise; port 0 picks a free port (``srv.url`` says which). Its ``/metrics`` is the plain
registry (labels as created here); the same series with Dynamo's labels are appended to Dynamo's system
status server by the workers (``workers/observability.py``). Nothing here imports Dynamo.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import REGISTRY, CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

_LAT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class WorkerMetrics:
    ttft: Histogram
    tpot: Histogram
    queue_length: Gauge
    running_requests: Gauge
    kv_cache_usage_perc: Gauge
    held_kv_handles: Gauge
    requests: Counter
    local_prefill_fallbacks: Counter
    kv_pulls: Counter
    kv_pulled_bytes: Counter
    info: Gauge

    def set_load(self, *, queued: int, running: int, kv_usage: float, held_handles: int = 0) -> None:
        self.queue_length.set(queued)
        self.running_requests.set(running)
        self.kv_cache_usage_perc.set(kv_usage)
        self.held_kv_handles.set(held_handles)


def make_worker_metrics(role: str, instance_id: int = 0, registry: CollectorRegistry | None = REGISTRY) -> WorkerMetrics:
    kw: dict[str, Any] = {"registry": registry}
    m = WorkerMetrics(
        ttft=Histogram("dynamo_ext_worker_ttft_seconds", "Time to first token, per request, at this worker",
                       buckets=_LAT_BUCKETS, **kw),
        tpot=Histogram("dynamo_ext_worker_tpot_seconds", "Time per output token after the first, per request",
                       buckets=_LAT_BUCKETS, **kw),
        queue_length=Gauge("dynamo_ext_worker_queue_length", "Requests waiting for admission in the engine", **kw),
        running_requests=Gauge("dynamo_ext_worker_running_requests", "Requests being served", **kw),
        kv_cache_usage_perc=Gauge("dynamo_ext_kv_cache_usage_perc", "Share of KV blocks in use (0..1)", **kw),
        held_kv_handles=Gauge("dynamo_ext_worker_held_kv_handles", "Prefilled KV handles waiting to be pulled", **kw),
        requests=Counter("dynamo_ext_worker_requests_total", "Requests by outcome", ("outcome",), **kw),
        local_prefill_fallbacks=Counter("dynamo_ext_worker_local_prefill_total",
                                        "Decode-side local prefills, by reason", ("reason",), **kw),
        kv_pulls=Counter("dynamo_ext_worker_kv_pulls_total",
                         "KV pulls of this decode worker by outcome: ok (the KV was used) or the failure's type",
                         ("outcome",), **kw),
        kv_pulled_bytes=Counter("dynamo_ext_worker_kv_pulled_bytes_total",
                                "Bytes of the pulls whose KV was used (the transport's bytes_total also counts pulls "
                                "that were then discarded, e.g. a stale handle)", **kw),
        info=Gauge("dynamo_ext_worker_info", "Worker identity", ("role", "instance_id"), **kw),
    )
    m.info.labels(role, str(instance_id)).set(1)
    return m


class CountersCollector(Collector):
    """Counter families read at scrape time: ``families`` = [(name without ``_total``, help, label name,
    read)], where ``read()`` returns {label value: cumulative count} (e.g. the router's decision counts); with
    an empty label name the family has no label and ``read()`` returns ``{"": count}``. A family whose
    ``read`` fails is left out of that scrape."""

    def __init__(self, families: list[tuple[str, str, str, Callable[[], dict[str, float]]]]) -> None:
        self.families = list(families)

    def collect(self) -> Any:
        for name, doc, label, read in self.families:
            try:
                values = read()
            except Exception:  # noqa: BLE001 - a scrape must not fail because one source is not ready
                continue
            fam = CounterMetricFamily(name, doc, labels=[label] if label else [])
            for key, v in sorted(values.items()):
                fam.add_metric([str(key)] if label else [], float(v))
            yield fam


class MetricsServer:
    """GET /metrics (Prometheus text), GET /health (JSON from ``health()``; 503 when its status is not ok:
    stopping / draining, registration lost), GET /live (200 while the process runs, draining included) and GET
    <path> for each of ``json_paths`` (JSON from its callable; the router's ``/routes``)."""

    def __init__(self, host: str, port: int, health: Callable[[], dict[str, Any]],
                 registry: CollectorRegistry = REGISTRY,
                 json_paths: dict[str, Callable[[], Any]] | None = None) -> None:
        reg = registry
        extra = dict(json_paths or {})
        started = time.monotonic()

        class _H(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype, code = generate_latest(reg), CONTENT_TYPE_LATEST, 200
                elif path == "/live":
                    body = json.dumps({"status": "live", "uptime_s": round(time.monotonic() - started, 3)}).encode()
                    ctype, code = "application/json", 200
                elif path == "/health":
                    try:
                        h = health()
                    except Exception as e:  # noqa: BLE001
                        h = {"status": "error", "error": str(e)}
                    body = json.dumps(h).encode()
                    ctype, code = "application/json", 200 if h.get("status") == "ok" else 503
                elif path in extra:
                    try:
                        body, code = json.dumps(extra[path]()).encode(), 200
                    except Exception as e:  # noqa: BLE001
                        body, code = json.dumps({"error": str(e)}).encode(), 500
                    ctype = "application/json"
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: Any) -> None:  # quiet
                pass

        self._srv = ThreadingHTTPServer((host, port), _H)
        self._srv.daemon_threads = True
        self.host, self.port = host, self._srv.server_address[1]
        self._t = threading.Thread(target=self._srv.serve_forever, name="metrics-http", daemon=True)
        self._t.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()


def serve_http(port: int, health: Callable[[], dict[str, Any]], host: str = "127.0.0.1",
               json_paths: dict[str, Callable[[], Any]] | None = None) -> MetricsServer:
    return MetricsServer(host, port, health, json_paths=json_paths)


class NullMetrics:
    """A ``WorkerMetrics`` stand-in whose every metric accepts ``labels(...).inc()`` / ``observe()`` / ``set()``
    and records nothing: for a serving core whose request plane measures elsewhere (the direct harness)."""

    class _Nothing:
        def labels(self, *a: Any, **kw: Any) -> "NullMetrics._Nothing":
            return self

        def inc(self, *a: Any) -> None:
            pass

        def observe(self, *a: Any) -> None:
            pass

        def set(self, *a: Any) -> None:
            pass

    def set_load(self, **kw: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return self._Nothing()
