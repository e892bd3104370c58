"""End to end: ``dynamo-ext serve GRAPH -f CONFIG --once PROMPT`` with the real workers and Dynamo's
frontend, etcd and NATS started by serve on free loopback ports; afterwards no process and no etcd
record is left (the etcd serve started is gone too)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_ext.launch import infra

ROOT = Path(__file__).resolve().parents[2]


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


def serve_once(tmp_path: Path, graph: str, workers: str, policy: str, timeout: float = 240) -> subprocess.CompletedProcess:
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
    logs = "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted((tmp_path / "logs").glob("*.log")))
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{logs}"
    assert "answer: " in r.stdout and "8 completion tokens" in r.stdout, r.stdout
    assert "etcd: no records left under" in r.stderr, r.stderr
    assert live_procs_with_env(str(tmp_path / "cache")) == []
    return r


def test_serve_once_agg_graph_dynamo_kv(tmp_path):
    r = serve_once(tmp_path, "graphs/agg.py", "{agg: {count: 2}}", "dynamo-kv")
    assert "agg-0: exit 0" in r.stderr and "agg-1: exit 0" in r.stderr  # graceful: leases revoked by the workers


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.skipif(not _has("dynamo_ext.workers.prefill"), reason="prefill worker not written yet")
@pytest.mark.xfail(reason="workers: under dynamo-kv, register_model(worker_type=Prefill|Decode) raises "
                   "'requires a non-empty `needs`' (the launcher reports it and cleans up)", strict=False)
def test_serve_once_disagg_graph_dynamo_kv(tmp_path):
    r = serve_once(tmp_path, "graphs/disagg.py", "{prefill: {count: 1}, decode: {count: 1}}", "dynamo-kv")
    assert "prefill-0: exit 0" in r.stderr and "decode-0: exit 0" in r.stderr


@pytest.mark.skipif(not _has("dynamo_ext.workers.router"), reason="router component not written yet")
def test_serve_once_disagg_graph_dynamo_ext_router(tmp_path):
    r = serve_once(tmp_path, "graphs.disagg", "{prefill: {count: 1}, decode: {count: 1}}", "dynamo-ext")
    assert "router-0: exit 0" in r.stderr
