"""kv_transfer.verify (issue 13, item 8), real processes (router + 1 prefill + 1 decode, tiny CPU model): the
prefill worker sends per-block digests with each KV handle; the decode worker checks the blocks it pulled.
A byte flipped in the prefill worker's pool after the handle was made (test hook) is caught: the pull counts as
failed (dynamo_ext_worker_kv_pulls_total{outcome="KvCorrupt"}), the request is recomputed on the decode worker
and completes with the tokens of an uninterrupted run. Without corruption every pull is used."""

from __future__ import annotations

import re

import pytest
from conftest import Graph, hooks_env, tokens_of

from dynamo_ext.engine.core import EngineConfig, LlmEngine
from dynamo_ext.engine.protocol import SamplingParams
from dynamo_ext.engine.weights import load_model

PROMPTS = [list(range(5, 5 + n)) for n in (70, 130)]


def _req(tokens):
    return {"token_ids": tokens, "stop_conditions": {"max_tokens": 6}, "sampling_options": {"temperature": 0}}


def _pulls(metrics: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^dynamo_ext_worker_kv_pulls_total\{outcome="([^"]+)"\} (\S+)$', metrics, re.M)}


@pytest.mark.parametrize("mode", ["sample", "all"])
def test_a_corrupted_block_is_caught_and_the_request_recomputed(servers, model_dir, tmp_path, mode):
    etcd, nats = servers
    g = Graph(etcd.url, nats.url, tmp_path, model_dir, namespace=f"kvv{mode}",
              kv_transfer={"backend": "nixl", "timeout_ms": 2000, "verify": mode})
    try:
        p = g.start("prefill", wait=False, extra_env=hooks_env(DXTEST_CORRUPT_KV="1"))
        d = g.start("decode", wait=False)
        r = g.start("router", wait=False)
        g.wait_ready([p, d, r])
        ref = LlmEngine(load_model(model_dir), EngineConfig(num_blocks=256)).generate(PROMPTS, SamplingParams(max_tokens=6))
        out = g.call(f"kvv{mode}.router.generate", [_req(t) for t in PROMPTS])
        assert [tokens_of(c) for c in out] == ref  # recomputed: the right tokens anyway
        pulls = _pulls(d.metrics())
        assert pulls.get("KvCorrupt") == len(PROMPTS) and not pulls.get("ok"), pulls
        assert "KvCorrupt" in d.log() and "differ from their digests" in d.log()
    finally:
        g.stop()


def test_without_corruption_every_verified_pull_is_used(servers, model_dir, tmp_path):
    etcd, nats = servers
    g = Graph(etcd.url, nats.url, tmp_path, model_dir, namespace="kvvok",
              kv_transfer={"backend": "nixl", "timeout_ms": 2000, "verify": "all"})
    try:
        p, d, r = g.start("prefill", wait=False), g.start("decode", wait=False), g.start("router", wait=False)
        g.wait_ready([p, d, r])
        ref = LlmEngine(load_model(model_dir), EngineConfig(num_blocks=256)).generate(PROMPTS, SamplingParams(max_tokens=6))
        out = g.call("kvvok.router.generate", [_req(t) for t in PROMPTS])
        assert [tokens_of(c) for c in out] == ref
        pulls = _pulls(d.metrics())
        assert pulls.get("ok") == len(PROMPTS) and not pulls.get("KvCorrupt"), pulls
    finally:
        g.stop()
