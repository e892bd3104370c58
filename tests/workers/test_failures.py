"""Failure and bad input with real processes (router + 1 prefill + 1 decode, NIXL between them).

- a KV handle nobody pulls is freed at its deadline (held blocks back to idle);
- bad requests (empty prompt, negative or huge max_tokens, prompt longer than the context, ids outside
  the vocabulary) get one clear error chunk through the router, and the graph keeps serving;
- the prefill worker is SIGKILLed after it handed out the KV handle and before the decode worker's pull
  (the decode worker waits DXTEST_PULL_DELAY_S before reading, injected by tests/workers/hooks, never by
  production code; the handle is held kv_transfer.hold_s): the request completes by
  a local prefill on the decode worker, with the same greedy tokens, within kv_transfer.timeout_ms +
  one prefill; later requests (prefill worker gone) complete too.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from conftest import PY, REPO, Graph, hooks_env, tokens_of

from dynamo_ext.engine.core import EngineConfig, LlmEngine
from dynamo_ext.engine.protocol import SamplingParams
from dynamo_ext.engine.weights import load_model

HOLD_S = 1.5
PULL_DELAY_S = 1.0


def _req(tokens, max_tokens=6):
    return {"token_ids": tokens, "stop_conditions": {"max_tokens": max_tokens}, "sampling_options": {"temperature": 0}}


def test_handles_bad_input_and_prefill_killed(servers, model_dir, tmp_path):
    etcd, nats = servers
    g = Graph(etcd.url, nats.url, tmp_path, model_dir, namespace="fail")
    env = hooks_env(DXTEST_PULL_DELAY_S=str(PULL_DELAY_S))
    cfg = g.write_config("hold", kv_transfer={"backend": "nixl", "timeout_ms": 2000, "hold_s": HOLD_S})
    try:
        p = g.start("prefill", extra_env=env, wait=False, config=cfg)
        d = g.start("decode", extra_env=env, wait=False, config=cfg)
        r = g.start("router", wait=False)
        g.wait_ready([p, d, r])
        eng = LlmEngine(load_model(model_dir), EngineConfig(num_blocks=256))

        # 1. a handle nobody pulls: held, then freed at its deadline
        idle = p.health()["kv_cache_usage_perc"]
        res = g.call("fail.prefill.prefill", [_req(list(range(1, 70)))])
        h = res[0][0]["kv_handle"]
        assert len(h["block_ids"]) == 5 and h["num_tokens"] == 69 and h["deadline"] > time.time()
        held = p.health()
        assert held["held_handles"] == 1 and held["kv_cache_usage_perc"] > idle
        time.sleep(HOLD_S + 0.5)
        after = p.health()
        assert after["held_handles"] == 0 and after["expired"] == 1 and after["kv_cache_usage_perc"] == idle

        # 2. bad input through the router: refused with InvalidArgument (HTTP 400 at the frontend) naming the
        # field; a prompt over the context is refused by the router itself; the graph keeps serving
        bad = [_req([]), _req([1, 2], -1), _req([1, 2], 10**9), _req([1] * 5000), _req([1, 2, 99999])]
        out = g.call("fail.router.generate", bad)
        for chunks, what in zip(out, ("empty prompt", "max_tokens", "max_tokens", "context", "token_ids")):
            assert len(chunks) == 1 and chunks[0].get("type") == "InvalidArgument", chunks
            assert what in chunks[0]["exception"], (what, chunks)
        good = [list(range(3, 60)), list(range(10, 45))]
        ref = eng.generate(good, SamplingParams(max_tokens=6))
        assert [tokens_of(c) for c in g.call("fail.router.generate", [_req(t) for t in good])] == ref
        assert d.health()["status"] == "ok" and p.health()["status"] == "ok"

        # 3. prefill worker SIGKILLed between hand-off and READ
        cmd = [PY, str(Path(__file__).parent / "dyn_client.py"), "fail.router.generate"]
        t0 = time.monotonic()
        client = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, env=g.env, cwd=REPO)
        client.stdin.write(json.dumps([_req(good[0])]))
        client.stdin.close()
        # wait until the prefill worker answered (its handle is held), then kill it
        t_end = time.monotonic() + 30
        while p.health()["held_handles"] == 0:
            assert time.monotonic() < t_end, "prefill never handed out the KV"
            time.sleep(0.02)
        t_kill = time.monotonic()
        p.popen.kill()
        p.popen.wait()
        stdout = client.stdout.read()
        client.wait(60)
        done = time.monotonic()
        chunks = json.loads([ln for ln in stdout.splitlines() if ln.startswith("[")][-1])[0]
        assert tokens_of(chunks) == ref[0], chunks
        # the READ starts PULL_DELAY_S after the hand-off; then at most the transfer deadline + a local prefill
        assert done - t_kill < PULL_DELAY_S + 2.0 + 3.0, done - t_kill
        log = d.log()
        assert "prefilling locally" in log, log[-2000:]
        print(f"killed-prefill request: {done - t0:.2f} s total, {done - t_kill:.2f} s after the kill")

        # 4. with the prefill worker gone, requests still complete (local prefill on the decode worker)
        assert [tokens_of(c) for c in g.call("fail.router.generate", [_req(t) for t in good])] == ref
    finally:
        g.stop()
