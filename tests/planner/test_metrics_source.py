"""TTFT/ITL/KV-usage/transfer-share windows from Prometheus text (pure parse + a real local HTTP scrape)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

from planner.metrics_source import MetricNames, MetricsScraper, parse, window

N = MetricNames()


def registry():
    reg = CollectorRegistry()
    ttft = Histogram("dynamo_frontend_time_to_first_token_seconds", "", ["model"], registry=reg)
    itl = Histogram("dynamo_frontend_inter_token_latency_seconds", "", ["model"], registry=reg)
    xfer = Histogram("dynamo_ext_kv_transfer_seconds", "", ["path", "direction", "backend"], registry=reg)
    kv = Gauge("dynamo_ext_kv_cache_usage_perc", "", ["worker"], registry=reg)
    q = Gauge("dynamo_frontend_queued_requests", "", ["model"], registry=reg)
    return reg, ttft, itl, xfer, kv, q


def test_window_means_and_transfer_share():
    reg, ttft, itl, xfer, kv, q = registry()
    first = parse(generate_latest(reg).decode(), N)
    for _ in range(4):
        ttft.labels("m").observe(0.4)
        itl.labels("m").observe(0.02)
        xfer.labels("device->device", "read", "nixl").observe(0.1)
    kv.labels("w1").set(0.3)
    kv.labels("w2").set(0.7)
    q.labels("m").set(3)
    second = parse(generate_latest(reg).decode(), N)
    w = window(first, second, N)
    assert w.requests == 4 and w.ttft_s == pytest.approx(0.4) and w.itl_s == pytest.approx(0.02)
    assert w.transfer_share == pytest.approx(0.25) and w.kv_usage == pytest.approx(0.7) and w.queue == 3
    idle = window(second, parse(generate_latest(reg).decode(), N), N)
    assert idle.requests == 0 and idle.ttft_s is None  # no requests: latency unknown, not zero
    assert window(None, second, N).ttft_s is None  # first scrape: gauges only
    reset = window(second, first, N)  # counters went backwards (process restart)
    assert reset.ttft_s is None and reset.requests is None


def test_scraper_over_http():
    reg, ttft, *_ = registry()

    class H(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = generate_latest(reg)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_port}/metrics"
        sc = MetricsScraper([url, "http://127.0.0.1:1/metrics"], timeout_s=1.0)  # a dead endpoint is skipped
        sc.sample()
        ttft.labels("m").observe(1.0)
        ttft.labels("m").observe(3.0)
        w = sc.sample()
        assert w.requests == 2 and w.ttft_s == pytest.approx(2.0)
        assert MetricsScraper(["http://127.0.0.1:1/metrics"], timeout_s=0.5).sample().ttft_s is None
    finally:
        srv.shutdown()


def test_prefill_endpoint_kv_usage_not_counted_as_decode_load():
    from planner.metrics_source import merge

    def endpoint(role, usage):
        reg = CollectorRegistry()
        Gauge("dynamo_ext_worker_info", "", ["role", "instance_id"], registry=reg).labels(role, "1").set(1)
        Gauge("dynamo_ext_kv_cache_usage_perc", "", registry=reg).set(usage)
        return parse(generate_latest(reg).decode(), N)

    m = merge([endpoint("prefill", 0.95), endpoint("decode", 0.4), endpoint("decode", 0.6)])
    assert m.kv_usage == pytest.approx(0.6)
