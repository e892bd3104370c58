"""``dynamo-ext serve`` orchestration with stand-in workers and frontend (tests/launch/stub_python.py):
etcd/NATS auto-start, readiness, --once, failure report, SIGTERM stop, record audit, no orphans."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynamo_ext.cli import main
from dynamo_ext.launch import infra
from dynamo_ext.launch.serve import ServeOptions, serve

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


@pytest.fixture
def stub_python(tmp_path, monkeypatch):
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {HERE / 'stub_python.py'} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("STUB_MODEL", "stub/model")
    monkeypatch.setenv("DYNAMO_EXT_CACHE", str(tmp_path / "cache"))  # also marks every child's environment
    return str(wrapper)


def write_config(tmp_path: Path, workers: str, etcd: str, nats: str, policy: str = "dynamo-ext",
                 supervision: str = "") -> Path:
    cfg = tmp_path / "dynamo.yaml"
    cfg.write_text(f"model: {{name: stub/model, preset: tiny}}\nworkers: {workers}\nrouter: {{policy: {policy}}}\n"
                   f"discovery: {{etcd: {{endpoints: ['{etcd}']}}, nats: {{url: '{nats}'}}}}\n"
                   + (f"supervision: {supervision}\n" if supervision else ""))
    return cfg


def procs_mentioning(text: str, *servers) -> list[int]:
    """Live processes whose command line or environment mention ``text`` (except this one and the fixtures)."""
    skip = {os.getpid()} | {s.proc.pid for s in servers}
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = (Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()).decode(
                errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z" and int(pid) not in skip:
            found.append(int(pid))
    return found


def run_serve(**kw) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = serve(ServeOptions(**kw), out, err)
    return code, out.getvalue(), err.getvalue()


def test_once_starts_etcd_and_nats_answers_and_cleans_up(tmp_path, stub_python):
    etcd, nats = f"http://127.0.0.1:{infra.free_port()}", f"nats://127.0.0.1:{infra.free_port()}"
    cfg = write_config(tmp_path, "{agg: {count: 2}}", etcd, nats)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    code, out, err = run_serve(graph="graphs/agg.py", config=str(cfg), port=infra.free_port(),
                               model_dir=str(tmp_path / "model"), log_dir=str(tmp_path / "logs"),
                               once="Hello there", python=stub_python)
    assert code == 0, err
    assert "answer: ' stub answer'" in out and "curl -s http://127.0.0.1:" in out
    assert f"etcd: none at {etcd}, started one" in err and "nats: none at" in err
    assert "etcd: no records left under" in err
    assert "--router-mode round-robin --namespace dynamo" in (tmp_path / "logs" / "frontend.log").read_text()
    assert {p.name for p in (tmp_path / "logs").iterdir()} >= {"agg-0.log", "agg-1.log", "router-0.log", "etcd.log"}
    assert not infra.etcd_healthy(etcd) and not infra.nats_answers(nats)
    assert procs_mentioning(str(tmp_path)) == []


def test_reused_etcd_stale_record_of_a_worker_is_revoked(tmp_path, stub_python, etcd_server, nats_server, monkeypatch):
    monkeypatch.setenv("STUB_NO_REVOKE", "decode")
    cfg = write_config(tmp_path, "{prefill: {count: 1}, decode: {count: 1}}", etcd_server.url, nats_server.url,
                       policy="dynamo-kv")
    code, out, err = run_serve(graph="graphs.disagg", config=str(cfg), port=infra.free_port(),
                               model_dir=None, log_dir=str(tmp_path / "logs"), once="x", python=stub_python)
    assert code == 0, err
    assert f"etcd: using the one at {etcd_server.url}" in err
    assert "removed 1 stale etcd records" in err
    assert infra.etcd_keys(etcd_server.url, "dynamo_ext/v1/workers/") == []
    assert "--router-mode kv" in (tmp_path / "logs" / "frontend.log").read_text()
    assert not (tmp_path / "logs" / "router-0.log").exists()
    assert (tmp_path / "cache" / "models" / "tiny-seed0-float32" / "model.safetensors").is_file()  # generated
    assert etcd_server.proc.poll() is None  # a reused etcd is never stopped
    assert procs_mentioning(str(tmp_path), etcd_server, nats_server) == []


def test_worker_crash_while_serving_is_reported_and_everything_stops(tmp_path, stub_python, etcd_server, nats_server,
                                                                     monkeypatch):
    """supervision.restart: false: the first exit of a worker stops the graph (the behaviour before supervision)."""
    monkeypatch.setenv("STUB_CRASH", "decode")
    cfg = write_config(tmp_path, "{prefill: {count: 1}, decode: {count: 1}}", etcd_server.url, nats_server.url,
                       supervision="{restart: false}")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    code, out, err = run_serve(graph="graphs/disagg.py", config=str(cfg), port=infra.free_port(),
                               model_dir=str(tmp_path / "m"), log_dir=str(tmp_path / "logs"), python=stub_python)
    assert code == 1
    assert "decode-0 exited unexpectedly" in err and "(exit 5" in err and "| stub crash" in err
    assert "stopping frontend, router-0, decode-0, prefill-0" in err
    assert procs_mentioning(str(tmp_path), etcd_server, nats_server) == []


def test_crashing_worker_is_restarted_until_restarts_are_exhausted(tmp_path, stub_python, etcd_server, nats_server,
                                                                   monkeypatch):
    """A worker that keeps exiting is restarted with back-off (0.1, 0.2 s), its dead instance's lease revoked each
    time; the third exit within the window exhausts max_restarts 2: serve stops everything, exit 1, with the
    reason and the last log lines."""
    monkeypatch.setenv("STUB_CRASH", "decode")
    cfg = write_config(tmp_path, "{prefill: {count: 1}, decode: {count: 1}}", etcd_server.url, nats_server.url,
                       supervision="{max_restarts: 2, window_s: 60, backoff_initial_s: 0.1, backoff_max_s: 0.2}")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    code, out, err = run_serve(graph="graphs/disagg.py", config=str(cfg), port=infra.free_port(),
                               model_dir=str(tmp_path / "m"), log_dir=str(tmp_path / "logs"), python=stub_python)
    assert code == 1
    assert "decode-0 exited (exit 5, after 0." in err and "restarting in 0.1s (exit 1 of at most 3 within 60s)" in err
    assert "restarting in 0.2s (exit 2 of at most 3 within 60s)" in err
    assert "decode-0: restart 1 started" in err and "decode-0: restart 2 started" in err
    assert "decode-0 ready again" in err
    assert err.count("of the exited instance revoked") >= 2
    assert "decode-0 exited 3 times within 60s (exit 5 the last time" in err
    assert "restarts exhausted (supervision.max_restarts: 2)" in err and "| stub crash" in err
    assert "stopping frontend, router-0, decode-0, prefill-0" in err
    log = (tmp_path / "logs" / "decode-0.log").read_text()
    assert log.count("DYNAMO_EXT_READY") == 3 and "[supervisor] restart 2 of decode-0 (exit 5 before)" in log
    assert procs_mentioning(str(tmp_path), etcd_server, nats_server) == []


def test_sigterm_stops_a_serving_launch(tmp_path, stub_python, etcd_server, nats_server):
    cfg = write_config(tmp_path, "{agg: {count: 1}}", etcd_server.url, nats_server.url)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    code = (f"import sys; from dynamo_ext.launch.serve import ServeOptions, serve; "
            f"sys.exit(serve(ServeOptions(graph='graphs/agg.py', config={str(cfg)!r}, port={infra.free_port()}, "
            f"model_dir={str(tmp_path / 'm')!r}, python={stub_python!r})))")
    # the child inherits the marked environment
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        for line in p.stdout:
            if "Ctrl-C to stop" in line:
                break
        assert len(procs_mentioning(str(tmp_path), etcd_server, nats_server)) == 4  # serve, frontend, router, agg
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert "SIGTERM received: stopping" in err and "etcd: no records left" in err
    time.sleep(0.1)
    assert procs_mentioning(str(tmp_path), etcd_server, nats_server) == []


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["serve", "graphs/disagg.py", "-f", "configs/agg.yaml"]) == 2
    err = capsys.readouterr().err
    assert "does not fit graph 'disagg'" in err and "workers.prefill: required" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers: {agg: {cont: 1}}\n")
    assert main(["serve", "graphs.agg", "-f", str(bad)]) == 2
    assert "workers.agg.cont: unknown key (did you mean 'count'?" in capsys.readouterr().err
    assert main(["serve", "graphs/nope.py", "-f", "configs/agg.yaml"]) == 2
    assert "cannot load graph" in capsys.readouterr().err
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["serve", "graphs/agg.py", "-f", "configs/agg.yaml", "--port", str(s.getsockname()[1])]) == 2
    assert "is in use" in capsys.readouterr().err


def test_cuda_model_device_counts_gpus(tmp_path, monkeypatch, capsys):
    """model.device: cuda: serve counts the visible GPUs (none: exit 2 before anything starts) and hands each
    engine worker a --device (launch/plan.py assign_devices: one GPU shared in turn)."""
    from dynamo_ext.config import parse_config
    from dynamo_ext.launch import serve as serve_mod
    from dynamo_ext.launch.graph import load_graph
    from dynamo_ext.launch.plan import plan_processes

    cfg = tmp_path / "cuda.yaml"
    cfg.write_text("model: {preset: tiny, device: cuda}\nworkers: {prefill: {count: 1}, decode: {count: 1}}\n")
    monkeypatch.setattr(serve_mod, "visible_gpu_count", lambda: 0)
    assert main(["serve", "graphs/disagg.py", "-f", str(cfg), "--port", str(infra.free_port())]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device is visible" in err and "Traceback" not in err
    config = parse_config({"model": {"preset": "tiny", "device": "cuda"},
                           "workers": {"prefill": {"count": 1}, "decode": {"count": 1}}})
    specs = plan_processes(load_graph("graphs/disagg.py"), config, config_path=cfg, model_dir=tmp_path, port=1,
                           env={}, gpu_count=1)
    devices = {s.name: s.argv[s.argv.index("--device") + 1] if "--device" in s.argv else None for s in specs}
    assert devices == {"prefill-0": "cuda:0", "decode-0": "cuda:0", "router-0": None, "frontend": None}, devices
    fe = next(s for s in specs if s.name == "frontend")  # frontend.* that only the frontend reads
    assert fe.env["DYN_HTTP_BODY_LIMIT_MB"] == "8" and fe.env["DYN_MIGRATION_LIMIT"] == "3"
    assert "DYN_MIGRATION_LIMIT" not in next(s for s in specs if s.name == "router-0").env


def test_supervision_config_defaults_and_errors():
    """dynamo.yaml ``supervision``: on by default; errors name the field and the range; the lease TTL default
    exceeds Dynamo's etcd keep-alive detection (15 s interval + 10 s timeout)."""
    from dynamo_ext.config import ConfigError, parse_config

    c = parse_config({"workers": {"agg": {}}})
    assert c.supervision.model_dump() == {"restart": True, "max_restarts": 5, "window_s": 300.0,
                                          "backoff_initial_s": 0.5, "backoff_max_s": 30.0}
    assert c.discovery.etcd.lease_ttl_s > 15 + 10
    for bad, line in [({"max_restarts": -1}, "supervision.max_restarts: -1 is out of range (allowed range: >= 0)"),
                      ({"window_s": 0}, "supervision.window_s: 0 is out of range (allowed range: > 0"),
                      ({"backoff_initial_s": 5, "backoff_max_s": 1},
                       "supervision: backoff_initial_s (5) must be <= backoff_max_s (1)"),
                      ({"restrat": False}, "supervision.restrat: unknown key (did you mean 'restart'?")]:
        with pytest.raises(ConfigError) as e:
            parse_config({"workers": {"agg": {}}, "supervision": bad})
        assert any(x.startswith(line) for x in e.value.lines), e.value.lines
