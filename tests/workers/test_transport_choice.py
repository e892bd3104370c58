"""The transport a disaggregated graph uses is chosen per pair from the topology, in the product path (real
processes: router + 1 prefill + 1 decode worker, etcd, NATS, the tiny model on CPU):

- ``kv_transfer.transport: tcp`` (forced): every pull goes over our TCP backend; the records advertise it;
- NIXL not importable in the worker processes (``kv_transfer.backend: nixl`` still): the workers start the
  backends they can (cma, tcp), say why NIXL is not there (``/health`` transports.skipped), and every pull
  goes over the backend select_transport puts first for host memory on one host (cma);
- in both, greedy outputs equal an in-process engine's (= the aggregated graph) token for token, and the
  decode worker's transfer metrics count the bytes under the backend that moved them.
The automatic choice with NIXL present is covered by test_disagg_graph.py; byte-for-byte checks of each
backend and of the fallback to the next backend by tests/serving/test_transports.py.
"""

from __future__ import annotations

import re

import pytest
from conftest import HOOKS, REPO, Graph, tokens_of

from dynamo_ext.engine.core import EngineConfig, LlmEngine
from dynamo_ext.engine.protocol import SamplingParams
from dynamo_ext.engine.weights import load_model
from dynamo_ext.transport.fallbacks.cma import cma_available
from dynamo_ext.transport.fallbacks.hostcopy import native_available
from dynamo_ext.transport.fallbacks.shm import shm_available

HIDE_NIXL = REPO / "tests" / "serving" / "hide_nixl"
PROMPTS = [list(range(3, 3 + n)) for n in (40, 75, 130, 33)]


def _req(tokens, max_tokens=8):
    return {"token_ids": tokens, "stop_conditions": {"max_tokens": max_tokens}, "sampling_options": {"temperature": 0}}


def _bytes_by_backend(metrics: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in re.finditer(r'^dynamo_ext_kv_transfer_bytes_total\{([^}]*)\} (\S+)$', metrics, re.M):
        labels = dict(kv.split("=", 1) for kv in m.group(1).split(","))
        be = labels["backend"].strip('"')
        out[be] = out.get(be, 0.0) + float(m.group(2))
    return out


def _run(g: Graph, env: dict[str, str] | None, ns: str) -> tuple[list[list[int]], str, dict, dict]:
    p = g.start("prefill", extra_env=env, wait=False)
    d = g.start("decode", extra_env=env, wait=False)
    r = g.start("router", wait=False)
    g.wait_ready([p, d, r])
    out = g.call(f"{ns}.router.generate", [_req(t) for t in PROMPTS])
    return [tokens_of(c) for c in out], d.log(), d.health(), _bytes_by_backend(d.metrics())


@pytest.fixture(scope="module")
def reference(model_dir):
    eng = LlmEngine(load_model(model_dir), EngineConfig(num_blocks=256))
    return eng.generate(PROMPTS, SamplingParams(max_tokens=8))


def test_forced_tcp(servers, model_dir, tmp_path, reference):
    etcd, nats = servers
    g = Graph(etcd.url, nats.url, tmp_path, model_dir, namespace="tcpf",
              kv_transfer={"backend": "nixl", "timeout_ms": 2000, "transport": "tcp"})
    try:
        toks, log, health, moved = _run(g, None, "tcpf")
        assert toks == reference
        lines = [ln for ln in log.splitlines() if "kv transfer received" in ln]
        assert len(lines) == len(PROMPTS) and all("kind=tcp backend=tcp" in ln for ln in lines), lines
        assert set(moved) == {"tcp"} and moved["tcp"] > 0, moved
        assert "tcp" in health["transports"]["backends"]
    finally:
        g.stop()


def test_without_nixl_the_fallback_backends_serve(servers, model_dir, tmp_path, reference):
    etcd, nats = servers
    g = Graph(etcd.url, nats.url, tmp_path, model_dir, namespace="nonixl")
    env = {"PYTHONPATH": f"{HIDE_NIXL}:{REPO}"}
    try:
        toks, log, health, moved = _run(g, env, "nonixl")
        assert toks == reference
        assert "nixl" not in health["transports"]["backends"], health["transports"]
        assert "does not import" in health["transports"]["skipped"]["nixl"], health["transports"]
        # engine pools are in shared memory: shm first (after cma when it has no compiled copy loop)
        want = ("shm" if shm_available() and (native_available() or not cma_available())
                else "cma" if cma_available() else "tcp")
        lines = [ln for ln in log.splitlines() if "kv transfer received" in ln]
        assert len(lines) == len(PROMPTS) and all(f"kind=host-shm backend={want}" in ln for ln in lines), lines
        assert set(moved) == {want}, moved
        assert "prefilling locally" not in log
    finally:
        g.stop()


def test_hooks_folder_exists():
    assert (HOOKS / "sitecustomize.py").is_file()
