"""The aggregated worker as a real process: ready line, leased record, tokens, bad input, metrics,
health, SIGTERM (exit 0, record gone at once)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

from conftest import PY, REPO, Graph, tokens_of

from dynamo_ext.discovery import EtcdStore, decode_record
from dynamo_ext.discovery.records import worker_key
from dynamo_ext.engine.core import EngineConfig, LlmEngine
from dynamo_ext.engine.protocol import SamplingParams
from dynamo_ext.engine.weights import load_model


def _record(etcd_url: str, key: str):
    async def go():
        s = await EtcdStore.connect(etcd_url)
        try:
            blob = await s.get(key)
            if blob is None:
                return None, -1
            rec = decode_record(key, blob)
            return rec, await s.lease_ttl(rec.instance_id)
        finally:
            await s.close()

    return asyncio.run(go())


def test_agg_worker_serves_and_stops(servers, model_dir, tmp_path):
    etcd, nats = servers
    g = Graph(etcd.url, nats.url, tmp_path, model_dir, namespace="aggt")
    try:
        w = g.start("agg")
        out = (tmp_path / "aggt-agg0.out").read_text().splitlines()
        assert len(out) == 1 and out[0].startswith("DYNAMO_EXT_READY role=agg instance_id=")
        key = worker_key("aggt", "backend", w.instance_id)
        rec, ttl = _record(etcd.url, key)
        assert rec is not None and rec.role == "agg" and rec.model == "dx/tiny" and ttl > 0
        assert rec.kv_layout["block_size"] == 16 and rec.topology

        prompts = [list(range(1, 40)), [5, 6, 7], list(range(100, 150))]
        reqs = [{"token_ids": p, "stop_conditions": {"max_tokens": 8}, "sampling_options": {"temperature": 0}}
                for p in prompts]
        bad = [{"token_ids": [], "stop_conditions": {"max_tokens": 4}},
               {"token_ids": [1, 2], "stop_conditions": {"max_tokens": -3}},
               {"token_ids": [1, 2], "stop_conditions": {"max_tokens": 10**9}},
               {"token_ids": [1] * 5000, "stop_conditions": {"max_tokens": 4}},
               {"token_ids": [1, 99999], "stop_conditions": {"max_tokens": 4}}]
        res = g.call("aggt.backend.generate", reqs + bad)
        # reference: the engine in this process, greedy
        eng = LlmEngine(load_model(model_dir), EngineConfig(num_blocks=1024))
        ref = eng.generate(prompts, SamplingParams(max_tokens=8))
        assert [tokens_of(r) for r in res[:3]] == ref
        assert all(r[-1]["finish_reason"] in ("length", "stop") and r[-1]["completion_usage"]["completion_tokens"]
                   == len(tokens_of(r)) for r in res[:3])
        # a request the client got wrong is refused with Dynamo's InvalidArgument (HTTP 400 at the frontend)
        for r in res[3:]:
            assert len(r) == 1 and r[0].get("type") == "InvalidArgument", r
        assert "empty prompt" in res[3][0]["exception"] and "max_tokens" in res[4][0]["exception"]
        assert "max_tokens" in res[5][0]["exception"] and "context" in res[6][0]["exception"]
        # still serving after bad input
        again = g.call("aggt.backend.generate", reqs[:1])
        assert tokens_of(again[0]) == ref[0]

        h = w.health()
        assert h["status"] == "ok" and h["role"] == "agg" and h["running"] == 0
        time.sleep(0.6)  # one load tick
        m = w.metrics()
        assert 'dynamo_ext_worker_requests_total{outcome="ok"} 4.0' in m
        assert 'dynamo_ext_worker_requests_total{outcome="bad_request"} 5.0' in m
        assert "dynamo_ext_worker_ttft_seconds_count 4.0" in m and "dynamo_ext_kv_cache_usage_perc" in m
        assert "dynamo_ext_worker_tpot_seconds_count" in m and "dynamo_ext_worker_queue_length" in m

        # SIGTERM with a request in flight: our record gone at once, the stream drains, exit 0
        client = subprocess.Popen([PY, str(Path(__file__).parent / "dyn_client.py"), "aggt.backend.generate"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, env=g.env, cwd=REPO)
        client.stdin.write(json.dumps([{"token_ids": [1, 2, 3],
                                        "stop_conditions": {"max_tokens": 1000, "ignore_eos": True}}]))
        client.stdin.close()
        t_end = time.monotonic() + 30
        while w.health()["running"] == 0:
            assert time.monotonic() < t_end
            time.sleep(0.02)
        t0 = time.monotonic()
        w.popen.terminate()
        while (rec := _record(etcd.url, key)[0]) is not None and time.monotonic() - t0 < 20:
            time.sleep(0.05)
        gone = time.monotonic() - t0
        assert rec is None, "record must vanish with the lease on SIGTERM"
        assert w.popen.poll() is None, "still draining"
        assert w.popen.wait(40) == 0
        exited = time.monotonic() - t0
        out = json.loads([ln for ln in client.stdout.read().splitlines() if ln.startswith("[")][-1])[0]
        client.wait(10)
        assert len(tokens_of(out)) == 1000 and out[-1]["finish_reason"] == "length", out[-1]
        print(f"SIGTERM: record gone after {gone:.2f} s, in-flight request drained, exit 0 after {exited:.2f} s")
        assert exited < 30
    finally:
        g.stop()
