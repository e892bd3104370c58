"""End to end: ``dynamo-ext serve GRAPH -f CONFIG --once PROMPT`` with the real workers and Dynamo's
frontend, etcd and NATS started by serve on free loopback ports; afterwards no process and no etcd
record is left (the etcd serve started is gone too)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dynamo_ext.launch import infra
from dynamo_ext.transport.fallbacks.cma import cma_available
from dynamo_ext.transport.fallbacks.hostcopy import native_available
from dynamo_ext.transport.fallbacks.shm import shm_available

ROOT = Path(__file__).resolve().parents[2]
#: the backend a worker pulls with for two host-memory processes of one host (select_transport's order; the
#: engine pools are in shared memory; shm without its compiled copy loop goes after cma)
HOST_BACKEND = ("shm" if shm_available() and (native_available() or not cma_available())
                else "cma" if cma_available() else "nixl")


def live_procs_with_env(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in env and state != "Z":
            found.append(int(pid))
    return found


def serve_once(tmp_path: Path, graph: str, workers: str, policy: str,
               timeout: float = 240) -> subprocess.CompletedProcess:  # fmt: skip
    cfg = tmp_path / "dynamo.yaml"
    cfg.write_text(
        "model: {name: dynamo-ext/tiny, preset: tiny, block_size: 16}\n"
        f"workers: {workers}\nrouter: {{policy: {policy}, disagg_min_prompt_tokens: 16}}\n"
        f"discovery: {{etcd: {{endpoints: ['http://127.0.0.1:{infra.free_port()}']}}, "
        f"nats: {{url: 'nats://127.0.0.1:{infra.free_port()}'}}}}\n"
    )
    env = dict(os.environ, DYNAMO_EXT_CACHE=str(tmp_path / "cache"))  # also marks every process of this launch
    prompt = "The quick brown fox jumps over the lazy dog and keeps running through the forest until night falls"
    r = subprocess.run(
        [sys.executable, "-m", "dynamo_ext.cli", "serve", graph, "-f", str(cfg), "--port", str(infra.free_port()),
         "--log-dir", str(tmp_path / "logs"), "--once", prompt, "--max-tokens", "8"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    logs = "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted((tmp_path / "logs").glob("*.log")))
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{logs}"
    assert "answer: " in r.stdout and "8 completion tokens" in r.stdout, r.stdout
    assert "etcd: no records left under" in r.stderr, r.stderr
    assert live_procs_with_env(str(tmp_path / "cache")) == []
    return r


def test_serve_once_agg_graph_dynamo_kv(tmp_path):
    r = serve_once(tmp_path, "graphs/agg.py", "{agg: {count: 2}}", "dynamo-kv")
    assert "agg-0: exit 0" in r.stderr and "agg-1: exit 0" in r.stderr  # graceful: leases revoked by the workers
    assert "KV moved between workers: none" in r.stdout


def test_serve_once_disagg_graph_dynamo_kv(tmp_path):
    r = serve_once(tmp_path, "graphs/disagg.py", "{prefill: {count: 1}, decode: {count: 1}}", "dynamo-kv")
    assert "prefill-0: exit 0" in r.stderr and "decode-0: exit 0" in r.stderr
    assert "KV moved between workers: decode-0 " in r.stdout and f"({HOST_BACKEND} read host->host)" in r.stdout


def test_serve_once_disagg_graph_dynamo_ext_router(tmp_path):
    r = serve_once(tmp_path, "graphs.disagg", "{prefill: {count: 1}, decode: {count: 1}}", "dynamo-ext")
    assert "router-0: exit 0" in r.stderr
    assert "KV moved between workers: decode-0 " in r.stdout and f"({HOST_BACKEND} read host->host)" in r.stdout


def test_sigkilled_worker_restarted_its_lease_revoked_then_sigterm_stops_clean(tmp_path):
    """supervision (on by default): a SIGKILLed agg worker is reported, its instance's lease revoked at once (out
    of discovery before its TTL), and it is restarted and ready again while serve goes on; --tolerate-exits only
    prints its deprecation. SIGTERM then stops everything, exit 0, no record left."""
    import signal
    import time

    port, etcd = infra.free_port(), f"http://127.0.0.1:{infra.free_port()}"
    cfg = tmp_path / "dynamo.yaml"
    cfg.write_text(f"model: {{name: dynamo-ext/tiny, preset: tiny}}\nworkers: {{agg: {{count: 2}}}}\n"
                   f"router: {{policy: dynamo-kv}}\ndiscovery: {{etcd: {{endpoints: ['{etcd}']}}, "
                   f"nats: {{url: 'nats://127.0.0.1:{infra.free_port()}'}}}}\n")  # fmt: skip
    env = dict(os.environ, DYNAMO_EXT_CACHE=str(tmp_path / "cache"))
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "w") as o, open(err, "w") as e:
        p = subprocess.Popen([sys.executable, "-m", "dynamo_ext.cli", "serve", "graphs/agg.py", "-f", str(cfg),
                              "--port", str(port), "--tolerate-exits", "--log-dir", str(tmp_path / "logs")],
                             cwd=ROOT, env=env, stdout=o, stderr=e)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "Ctrl-C to stop" not in out.read_text() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert p.poll() is None, err.read_text()
        assert "--tolerate-exits is deprecated" in err.read_text()
        victim = next(pid for pid in live_procs_with_env(str(tmp_path / "cache"))
                      if b"--index\x001" in Path(f"/proc/{pid}/cmdline").read_bytes())
        os.kill(victim, signal.SIGKILL)
        while "agg-1 ready again" not in err.read_text() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        text = err.read_text()
        assert "agg-1 exited (killed by SIGKILL, after " in text and "restarting in 0.5s" in text, text
        assert "agg-1: restart 1 started" in text and "agg-1 ready again" in text, text
        assert "of the exited instance revoked" in text, text
        assert p.poll() is None  # still serving
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0, err.read_text()
    finally:
        p.kill()
    text = err.read_text()
    assert "agg-0: exit 0" in text and "agg-1: exit 0" in text and "etcd: no records left" in text, text
    assert live_procs_with_env(str(tmp_path / "cache")) == []
