"""A worker whose --metrics-port was taken between the launcher's pick and its own bind (another listener, e.g.
its Dynamo runtime's ephemeral ports) serves its metrics on a free port and says which in its READY line
(seen in CI: a prefill worker exited with EADDRINUSE before it was ready)."""

from __future__ import annotations

import json
import socket
import urllib.request
from urllib.parse import urlparse

from conftest import Graph


def test_a_taken_metrics_port_falls_back_to_a_free_one(servers, model_dir, tmp_path):
    etcd, nats = servers
    g = Graph(etcd.url, nats.url, tmp_path, model_dir, namespace="mport")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        w = g.start("agg", args=["--metrics-port", str(port)])
        got = urlparse(w.metrics_url).port
        assert got and got != port, w.metrics_url
        with urllib.request.urlopen(w.metrics_url.replace("/metrics", "/health"), timeout=5) as r:
            assert r.status == 200 and json.loads(r.read())
        assert f"--metrics-port {port} is taken" in w.err_path.read_text(errors="replace")
    finally:
        taken.close()
        g.stop()
