"""``dynamo-ext serve GRAPH -f CONFIG --print-commands``: the printed lines, run by hand (here: as subprocesses,
loopback only), serve a completion through Dynamo's frontend and stop cleanly."""

from __future__ import annotations

import io
import os
import shlex
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from dynamo_ext.launch import infra
from dynamo_ext.launch.client import complete, list_models
from dynamo_ext.launch.commands import print_commands

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, etcd: int, nats: int, http: int, extra: str = "") -> Path:
    cfg = tmp_path / "dynamo.yaml"
    cfg.write_text("model: {preset: tiny}\nworkers:\n  agg: {count: 1}\nrouter: {policy: dynamo-ext}\n"
                   f"discovery:\n  etcd: {{endpoints: ['http://127.0.0.1:{etcd}']}}\n"
                   f"  nats: {{url: 'nats://127.0.0.1:{nats}'}}\n"
                   f"frontend: {{http_host: 127.0.0.1, http_port: {http}}}\n" + extra)
    return cfg


def printed(graph: str, cfg: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = print_commands(graph, str(cfg), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def wait_for(check, what: str, timeout: float, procs: list[subprocess.Popen], logs: list[Path]) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        for p, log in zip(procs, logs):
            if p.poll() is not None:
                raise AssertionError(f"{log.name} exited {p.returncode} while waiting for {what}:\n"
                                     + log.read_text()[-3000:])
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_printed_lines_start_a_graph_that_answers_and_stops_cleanly(tmp_path):
    etcd, nats, http = infra.free_port(), infra.free_port(), infra.free_port()
    cfg = write_config(tmp_path, etcd, nats, http)
    code, out, err = printed("graphs/agg.py", cfg)
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if ln and not ln.startswith("#")]
    # etcd, nats, then the worker, the router, the frontend: the order they must start in
    words = [shlex.split(ln.removesuffix(" &")) for ln in lines]
    assert Path(words[0][0]).name == "etcd" and Path(words[1][0]).name == "nats-server", lines
    roles = [w[w.index("--role") + 1] if "--role" in w else w[w.index("-m") + 1] for w in words[2:]]
    assert roles == ["agg", "router", "dynamo.frontend"], lines
    assert all(ln.endswith(" &") for ln in lines)
    for ln in lines[2:]:  # loopback only, the same variables serve gives its children
        words = shlex.split(ln)
        assert "DYN_TCP_RPC_HOST=127.0.0.1" in words and "UCX_NET_DEVICES=lo" in words
        assert f"ETCD_ENDPOINTS=http://127.0.0.1:{etcd}" in words and f"NATS_SERVER=nats://127.0.0.1:{nats}" in words
    data_dir = Path(shlex.split(lines[0])[shlex.split(lines[0]).index("--data-dir") + 1]).parent

    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    model = "dynamo-ext/tiny"
    base = f"http://127.0.0.1:{http}"
    try:
        for i, ln in enumerate(lines):
            argv = shlex.split(ln.removesuffix(" &"))
            log = tmp_path / f"p{i}.log"
            logs.append(log)
            with open(log, "wb") as f:
                procs.append(subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              cwd=tmp_path, start_new_session=True))
            if i == 0:
                wait_for(lambda: infra.etcd_healthy(f"http://127.0.0.1:{etcd}"), "etcd", 20, procs, logs)
            elif i == 1:
                wait_for(lambda: infra.nats_answers(f"nats://127.0.0.1:{nats}"), "nats", 20, procs, logs)
            elif i < len(lines) - 1:
                wait_for(lambda log=log: b"DYNAMO_EXT_READY" in log.read_bytes(), log.name, 120, procs, logs)
        wait_for(lambda: model in list_models(base, timeout=0.5), "the frontend to list the model", 120, procs, logs)
        resp = complete(base, model, "Hello there", 8)
        assert resp["choices"][0]["finish_reason"] in ("length", "stop")
        assert 0 < resp["usage"]["completion_tokens"] <= 8
        assert resp["usage"]["prompt_tokens"] > 0
        for path in ("/live", "/health"):  # what the rendered frontend pods probe (launch/deploy.py)
            with urllib.request.urlopen(base + path, timeout=5) as r:
                assert r.status == 200, path
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        shutil.rmtree(data_dir, ignore_errors=True)
    codes = {log.name: p.returncode for p, log in zip(procs, logs)}
    # SIGTERM: the worker and the router drain, revoke their lease and exit 0
    assert codes["p2.log"] == 0 and codes["p3.log"] == 0, codes
    assert all(c is not None for c in codes.values())


def test_refused_configs_name_the_problem(tmp_path, monkeypatch):
    cfg = write_config(tmp_path, 2379, 4222, 8000, "planner: {enabled: false}\n")
    code, out, err = printed("graphs/disagg.py", cfg)
    assert code == 2 and out == ""
    assert "workers.decode: required by graph 'disagg'" in err
    tls = tmp_path / "tls.yaml"
    tls.write_text(cfg.read_text().replace("etcd: {endpoints: ['http://127.0.0.1:2379']}",
                                           "etcd: {endpoints: ['http://127.0.0.1:2379'], username: u, "
                                           "password_env: DX_TEST_PW}"))
    monkeypatch.setenv("DX_TEST_PW", "pw-7f3c9a")
    code, out, err = printed("graphs/agg.py", tls)
    assert code == 2 and out == "" and "pw-7f3c9a" not in err
    assert "discovery: --print-commands prints plain commands" in err and "TLS or credentials" in err


def test_options_that_need_a_running_serve_are_refused(tmp_path, capsys):
    from dynamo_ext.cli import main

    cfg = write_config(tmp_path, 2379, 4222, 8000)
    assert main(["serve", "graphs/agg.py", "-f", str(cfg), "--print-commands", "--once", "hi", "--no-planner"]) == 2
    err = capsys.readouterr().err
    assert "--print-commands starts nothing, so --once, --planner/--no-planner cannot apply" in err
