"""``dynamo_ext.launch.launch_graph``: the graph started as ``dynamo-ext serve`` starts it, as a context manager.

Real: graphs/agg.py (one aggregated worker, Dynamo's frontend and KV router), etcd and NATS started by the
launch on free loopback ports; one completion answers, the children are described from their ready lines,
/metrics is scraped, and after the ``with`` no process of the launch and no etcd/NATS is left. Stub
(tests/launch/stub_python.py): a crash after readiness is reported by ``check()``, an exception in the body
stops everything, a bad config raises LaunchError(code 2) before anything starts; scale() adds a worker and
stop_child() stops one that supervision then leaves stopped."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from dynamo_ext.launch import LaunchError, launch_graph
from dynamo_ext.launch import infra
from dynamo_ext.launch.client import complete

HERE = Path(__file__).parent


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def procs_with_env(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in env and alive(int(pid)) and int(pid) != os.getpid():
            found.append(int(pid))
    return found


def loopback_config(workers: dict, policy: str, model: str = "dynamo-ext/tiny") -> dict:
    return {"model": {"name": model, "preset": "tiny", "block_size": 16, "dtype": "float32"},
            "workers": workers, "router": {"policy": policy},
            "discovery": {"namespace": "dxsession", "etcd": {"endpoints": [f"http://127.0.0.1:{infra.free_port()}"]},
                          "nats": {"url": f"nats://127.0.0.1:{infra.free_port()}"}}}  # fmt: skip


def test_agg_graph_answers_and_nothing_is_left(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAMO_EXT_CACHE", str(tmp_path / "cache"))  # the model directory, generated here
    cfg = loopback_config({"agg": {"count": 1, "num_kv_blocks": 256}}, "dynamo-kv")
    etcd, nats = cfg["discovery"]["etcd"]["endpoints"][0], cfg["discovery"]["nats"]["url"]
    with launch_graph("graphs/agg.py", cfg, log_dir=tmp_path / "logs", env={"DX_SESSION_TEST": str(tmp_path)},
                      ready_timeout=240) as g:  # fmt: skip
        assert g.model == "dynamo-ext/tiny" and g.base_url.startswith("http://127.0.0.1:")
        resp = complete(g.base_url, g.model, "The quick brown fox jumps over the lazy dog", max_tokens=8)
        assert resp["usage"]["completion_tokens"] == 8 and isinstance(resp["choices"][0]["text"], str)
        kids = {c.name: c for c in g.children}
        assert set(kids) == {"agg-0", "frontend"}
        agg = kids["agg-0"]
        assert agg.role == "agg" and agg.instance_id and agg.metrics_url.startswith("http://127.0.0.1:")
        assert kids["frontend"].role == "frontend" and kids["frontend"].metrics_url is None
        texts = g.metrics(role="agg")
        assert list(texts) == ["agg-0"] and "# TYPE" in texts["agg-0"]
        assert g.metrics(role="decode") == {}
        assert g.log_dir == tmp_path / "logs" and (g.log_dir / "agg-0.log").is_file()
        pids = [c.pid for c in g.children]
        assert all(alive(p) for p in pids) and set(pids) <= set(procs_with_env(str(tmp_path)))
        g.check()
    assert not [p for p in pids if alive(p)], "children alive after the with block"
    assert procs_with_env(str(tmp_path)) == []  # etcd/NATS (started with the cache path in env) included
    assert not infra.etcd_healthy(etcd) and not infra.nats_answers(nats)


def test_agg_graph_every_request_passes_the_router(tmp_path, monkeypatch):
    """Issue 14.2: with our router in the aggregated graph, the agg workers do not register the model, so the
    frontend can only pick the router: its decision count equals the requests sent (it was 31-35 of 120 with
    3 agg workers when the workers registered the model too)."""
    import json
    import urllib.request

    monkeypatch.setenv("DYNAMO_EXT_CACHE", str(tmp_path / "cache"))
    cfg = loopback_config({"agg": {"count": 3, "num_kv_blocks": 256}}, "dynamo-ext")
    with launch_graph("graphs/agg.py", cfg, log_dir=tmp_path / "logs", ready_timeout=240) as g:
        router = next(c for c in g.children if c.role == "router")
        health = router.metrics_url.rsplit("/", 1)[0] + "/health"

        def decided() -> int:
            with urllib.request.urlopen(health, timeout=5) as r:
                return sum(json.loads(r.read()).get("decisions", {}).values())

        before = decided()
        sent = 12
        for i in range(sent):
            resp = complete(g.base_url, g.model, f"request {i}: the quick brown fox", max_tokens=2)
            assert resp["usage"]["completion_tokens"] == 2
        assert decided() - before == sent
        with urllib.request.urlopen(g.base_url + "/v1/models", timeout=5) as r:
            assert [m["id"] for m in json.loads(r.read())["data"]] == [g.model]


@pytest.fixture
def stub_python(tmp_path, monkeypatch):
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {HERE / 'stub_python.py'} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("STUB_MODEL", "stub/model")
    monkeypatch.setenv("DYNAMO_EXT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    return str(wrapper)


def test_crash_after_ready_is_reported(tmp_path, stub_python):
    """A stub agg worker exits 5 half a second after its ready line, every time: it is restarted once (the
    launch's supervision thread, nobody calls check() for that), the second exit exhausts max_restarts 1 and
    check() raises LaunchError naming it; the others (and etcd/NATS) are stopped on the way out."""
    cfg = loopback_config({"agg": {"count": 2}}, "round-robin", model="stub/model")
    cfg["supervision"] = {"max_restarts": 1, "backoff_initial_s": 0.1}
    with pytest.raises(LaunchError, match=r"agg-\d exited 2 times within 300s \(exit 5 the last time"):
        with launch_graph("graphs/agg.py", cfg, model_dir=tmp_path / "model", python=stub_python,
                          env={"STUB_CRASH": "agg"}, ready_timeout=60) as g:  # fmt: skip
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                g.check()  # raises once a stub agg worker exited
                time.sleep(0.1)
    assert procs_with_env(str(tmp_path)) == []


def test_exception_in_the_body_stops_everything(tmp_path, stub_python):
    cfg = loopback_config({"agg": {"count": 1}}, "round-robin", model="stub/model")
    with pytest.raises(RuntimeError, match="body failed"):
        with launch_graph("graphs/agg.py", cfg, model_dir=tmp_path / "model", python=stub_python) as g:
            assert [c.role for c in g.children] == ["agg", "router", "frontend"]
            assert complete(g.base_url, g.model, "hi")["choices"][0]["text"] == " stub answer"
            pids = [c.pid for c in g.children]
            raise RuntimeError("body failed")
    assert not [p for p in pids if alive(p)]
    assert procs_with_env(str(tmp_path)) == []


def test_bad_config_raises_before_anything_starts(tmp_path):
    with pytest.raises(LaunchError) as e:
        with launch_graph("graphs/agg.py", {"workers": {"agg": {"count": 1}}, "router": {"policy": "nope"}}):
            pass
    assert e.value.code == 2 and "router.policy" in str(e.value)


def test_scale_and_stop_child(tmp_path, stub_python):
    """LaunchedGraph.scale starts copies of a role's first worker (ready awaited) and stop_child stops one on
    purpose: SIGTERM, never restarted by supervision, no failure for check(); unknown roles/names: LaunchError."""
    cfg = loopback_config({"agg": {"count": 1}}, "round-robin", model="stub/model")
    cfg["supervision"] = {"backoff_initial_s": 0.1}
    with launch_graph("graphs/agg.py", cfg, model_dir=tmp_path / "model", python=stub_python) as g:
        g.scale("agg", 2)
        kids = {c.name: c for c in g.alive()}
        assert {"agg-0", "agg-1"} <= set(kids) and kids["agg-1"].metrics_url != kids["agg-0"].metrics_url
        assert g.stop_child("agg-1") == "exit 0"
        time.sleep(1.0)  # several supervision rounds: a restart would have started by now
        assert [c.name for c in g.alive() if c.role == "agg"] == ["agg-0"] and not alive(kids["agg-1"].pid)
        g.check()
        with pytest.raises(LaunchError, match=r"graph 'agg' has no 'decode' workers \(it has: agg\)"):
            g.scale("decode", 1)
        with pytest.raises(LaunchError, match=r"no running child named 'agg-1'"):
            g.stop_child("agg-1")
        assert complete(g.base_url, g.model, "hi")["choices"][0]["text"] == " stub answer"
