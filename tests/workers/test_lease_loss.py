"""Lost registration (workers/runtime.py ``watch_registration``): a worker whose lease is gone does not stay
alive unregistered. It says so on /health (503, ``registration_lost`` + reason), drains what it is serving and
exits 3 within a few seconds, so that ``dynamo-ext serve`` starts a fresh copy with a new lease."""

from __future__ import annotations

import os
import signal
import threading
import time

from conftest import Graph, tokens_of

from dynamo_ext.launch import infra


def _wait_exit(proc, timeout: float) -> float:
    t0 = time.monotonic()
    proc.popen.wait(timeout=timeout)
    return time.monotonic() - t0


def test_revoked_lease_health_503_stream_drained_exit_3(servers, model_dir, tmp_path):
    etcd, nats = servers
    g = Graph(etcd.url, nats.url, tmp_path, model_dir, namespace="leaserev")
    try:
        w = g.start("agg")
        assert w.health()["status"] == "ok"
        # 3 streams up to the context (2048 here), so the worker is still draining when we look at its /health
        req = {"token_ids": list(range(1, 30)), "stop_conditions": {"max_tokens": 2000, "ignore_eos": True},
               "sampling_options": {"temperature": 0}}
        result: list = []
        t = threading.Thread(target=lambda: result.extend(g.call("leaserev.backend.generate", [req] * 3, timeout=120)))
        t.start()
        deadline = time.monotonic() + 30
        while w.health().get("running", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert w.health().get("running") == 3, w.health()
        t_revoke = time.monotonic()
        assert infra.revoke_lease(etcd.url, w.instance_id)
        health = {}
        while time.monotonic() - t_revoke < 10 and w.popen.poll() is None:
            health = w.health()
            if health.get("status") != "ok":
                break
            time.sleep(0.05)
        assert health.get("status") == "registration_lost", health
        assert "is gone from etcd" in health["reason"], health
        assert time.monotonic() - t_revoke < 3.5  # one check per second
        assert w.popen.wait(timeout=40) == 3, w.log()[-3000:]
        t.join(timeout=60)
        assert [len(tokens_of(r)) for r in result] == [2000] * 3, [r[-1:] for r in result]  # drained, not cut
        assert "registration lost: lease" in w.log()
    finally:
        g.stop()


def test_lease_expired_while_stopped_exit_3_after_sigcont(servers, model_dir, tmp_path):
    """The issue's case: SIGSTOP longer than the lease TTL (here 3 s for 5 s), then SIGCONT: the worker notices
    within about a second and exits 3 (before: alive forever, unregistered, /health ok)."""
    etcd, nats = servers
    g = Graph(etcd.url, nats.url, tmp_path, model_dir, namespace="leasestop")
    g.env["ETCD_LEASE_TTL"] = "3"
    try:
        w = g.start("agg")
        os.kill(w.popen.pid, signal.SIGSTOP)
        time.sleep(5)
        os.kill(w.popen.pid, signal.SIGCONT)
        took = _wait_exit(w, 15)
        assert w.popen.returncode == 3, w.log()[-3000:]
        assert took < 5, took
        assert "registration lost" in w.log()
    finally:
        g.stop()
