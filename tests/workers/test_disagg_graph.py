"""Integration on CPU: etcd + NATS + Dynamo's frontend + router + 1 prefill + 2 decode workers (KV moved
between processes, host memory, over the backend select_transport picks: cma), against the aggregated
graph: 50 concurrent requests through the HTTP frontend, greedy outputs equal token for token, KV bytes
moved visible in metrics.
Then the dynamo-ext policy (a second router replica on the same workers), called directly."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from conftest import Graph, tokens_of

from dynamo_ext.transport.fallbacks.cma import cma_available
from dynamo_ext.transport.fallbacks.hostcopy import native_available
from dynamo_ext.transport.fallbacks.shm import shm_available

N_REQ = 50
WORDS = "the quick brown fox jumps over a lazy dog while seven tired cats watch from the old red barn".split()


def _prompt(i: int) -> str:
    n = 6 + (i * 7) % 40  # 6..45 words, ~30..250 bytes (tokens)
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n)) + f" #{i}"


def _complete(base: str, prompt: str, max_tokens: int = 12) -> str:
    body = json.dumps({"model": "dx/tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=90) as r:
        d = json.loads(r.read())
    return d["choices"][0]["text"]


def _run_all(base: str) -> tuple[list[str], float]:
    t0 = time.monotonic()
    with ThreadPoolExecutor(N_REQ) as ex:
        texts = list(ex.map(lambda i: _complete(base, _prompt(i)), range(N_REQ)))
    return texts, time.monotonic() - t0


def _counter(metrics: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", metrics, re.M))


def test_disagg_equals_agg_through_frontend(servers, model_dir, tmp_path):
    etcd, nats = servers
    agg = Graph(etcd.url, nats.url, tmp_path, model_dir, namespace="gagg")
    dis = Graph(etcd.url, nats.url, tmp_path, model_dir, namespace="gdis")
    try:
        # start both graphs' workers in parallel (2 cores: start-up dominates)
        a = agg.start("agg", wait=False)
        ar = agg.start("router", wait=False)  # the aggregated graph's only entry (agg workers register nothing)
        p = dis.start("prefill", wait=False)
        d0, d1 = dis.start("decode", wait=False), dis.start("decode", wait=False)
        r = dis.start("router", wait=False)
        agg.wait_ready([a, ar])
        dis.wait_ready([p, d0, d1, r])
        base_a = agg.frontend("round-robin")
        base_d = dis.frontend("round-robin")

        ref, t_agg = _run_all(base_a)
        got, t_dis = _run_all(base_d)
        print(f"agg {N_REQ} requests in {t_agg:.2f} s; disagg in {t_dis:.2f} s")
        assert all(ref), "empty outputs from the aggregated graph"
        assert got == ref

        # every request went prefill -> pull (the backend select_transport picks for two processes' host
        # memory on one host: shm, the engine pools being in shared memory; else cma) -> decode
        logs = d0.log() + "\n" + d1.log()
        lines = [ln for ln in logs.splitlines() if "kv transfer received" in ln]
        assert len(lines) == N_REQ, logs[-2000:]
        want = ("shm" if shm_available() and (native_available() or not cma_available())
                else "cma" if cma_available() else "nixl")
        assert all(f"kind=host-shm backend={want} path=host->host" in ln for ln in lines), lines[:3]
        moved = [_counter(d.metrics(), "dynamo_ext_kv_transfer_bytes_total") for d in (d0, d1)]
        assert all(m > 0 for m in moved), moved
        assert "fallback" not in logs and "prefilling locally" not in logs
        time.sleep(0.6)
        ph = p.health()
        assert ph["held_handles"] == 0 and ph["released"] == N_REQ and ph["expired"] == 0

        # policy dynamo-ext: a second router replica on the same workers, called directly
        cfg2 = dis.write_config("ext", router={"policy": "dynamo-ext", "disagg_min_prompt_tokens": 32})
        r2 = dis.start("router", config=cfg2)
        prompts = [list(range(1, 1 + n)) for n in (8, 40, 90, 90)]  # short (local), long, long twice (overlap)
        reqs = [{"token_ids": t, "stop_conditions": {"max_tokens": 6}, "sampling_options": {"temperature": 0}}
                for t in prompts]
        via_ext = dis.call("gdis.router.generate", reqs, instance=r2.instance_id)
        via_agg = agg.call("gagg.backend.generate", reqs)
        assert [tokens_of(x) for x in via_ext] == [tokens_of(x) for x in via_agg]
        h2 = r2.health()
        assert sum(h2["decisions"].values()) == len(reqs) and h2["decisions"].get("short_prompt", 0) >= 1, h2
        print("dynamo-ext router:", h2["decisions"], h2["links"])
        # links come from the workers' topologies in their records (same host, two processes: host-shm)
        assert h2["links"] and all(v.startswith("host-shm") for v in h2["links"].values()), h2
        # link feedback: every disaggregated request's pull was reported back to the router (measured GB/s)
        n_disagg = sum(v for k, v in h2["decisions"].items() if k.startswith("disagg"))
        fb = h2["link_feedback"]
        assert n_disagg >= 1 and (fb["transfers"], fb["failures"]) == (n_disagg, 0), h2
        assert set(fb["backends"].values()) == {want}, fb  # the backend each pair's pulls went through
    finally:
        dis.stop()
        agg.stop()
