"""Prefix-aware KV pull on CPU: etcd + NATS + router (round-robin, always disaggregated) + 1 prefill + 1 decode
worker, KV moved by NIXL between the processes. The decode worker keeps the leading full blocks its own prefix
cache holds and pulls only the rest (the block with the last prompt token always moves), and the outputs do not
change: the same prompt twice gives the same greedy tokens, the second time from 1 pulled block.

Bytes pulled per request come from the decode worker's "kv transfer received ... bytes=N" log line, and the bytes
of one block from the first (full) pull, so the test does not depend on the KV layout's constants. The router's
estimate of the same hand-off (``routing.ttft_model.pair_kv_bytes`` for a decode snapshot whose device overlap is
the blocks that worker had cached) must equal what was pulled.
"""

from __future__ import annotations

import re
import time

from conftest import Graph, tokens_of

from dynamo_ext.routing import RequestShape, WorkerSnapshot
from dynamo_ext.routing.ttft_model import pair_kv_bytes

BS = 16  # block size of the Graph's config


def _req(tokens: list[int]) -> dict:
    return {"token_ids": tokens, "stop_conditions": {"max_tokens": 6, "ignore_eos": True},
            "sampling_options": {"temperature": 0}}


def _pulled_bytes(log: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"kv transfer received:.* bytes=(\d+)", log)]


def _router_estimate(prompt: int, cached_blocks: int, per_block: int) -> int:
    """Bytes decide() charges for a hand-off to a decode worker holding ``cached_blocks`` of the prompt on device."""
    req = RequestShape(prompt_tokens=prompt, block_size=BS, kv_bytes_per_token=per_block // BS)
    d = WorkerSnapshot(worker_id=7, role="decode", prefill_tokens_per_s=1.0, overlap_blocks=cached_blocks)
    return pair_kv_bytes(d, req)


def _wait_lines(proc, n: int, timeout: float = 10.0) -> list[int]:
    t_end = time.monotonic() + timeout
    while True:
        got = _pulled_bytes(proc.log())
        if len(got) >= n or time.monotonic() > t_end:
            return got
        time.sleep(0.1)


def test_decode_worker_pulls_only_the_blocks_its_prefix_cache_lacks(servers, model_dir, tmp_path):
    etcd, nats = servers
    g = Graph(etcd.url, nats.url, tmp_path, model_dir, namespace="gpfx",
              workers={"decode": {"count": 1, "num_kv_blocks": 1024}})
    try:
        p, d = g.start("prefill", wait=False), g.start("decode", wait=False)
        r = g.start("router", wait=False)
        g.wait_ready([p, d, r])
        ep = "gpfx.router.generate"
        idle = d.health()["kv_cache_usage_perc"]
        q = [(7 * i) % 251 + 1 for i in range(240)]  # 15 full blocks
        first = g.call(ep, [_req(q)], instance=r.instance_id)[0]
        got = _wait_lines(d, 1)
        assert len(got) == 1, d.log()[-2000:]
        per_block = got[0] // (len(q) // BS)
        assert per_block * (len(q) // BS) == got[0] and per_block > 0, got

        # the same prompt again: 14 blocks kept (all full blocks but the one with the last token), 1 pulled
        again = g.call(ep, [_req(q)], instance=r.instance_id)[0]
        assert tokens_of(again) == tokens_of(first) and len(tokens_of(first)) == 6, (first, again)
        got = _wait_lines(d, 2)
        assert got[1] == 1 * per_block == _router_estimate(len(q), 15, per_block), (got, per_block)

        # shares the first 200 tokens: 12 full blocks cached (block 12 differs after token 200), 16 - 12 pulled
        other = q[:200] + [(11 * i) % 241 + 3 for i in range(50)]
        out = g.call(ep, [_req(other)], instance=r.instance_id)[0]
        assert len(tokens_of(out)) == 6 and not any("exception" in c or "error" in str(c.get("finish_reason"))
                                                    for c in out), out
        got = _wait_lines(d, 3)
        assert got[2] == (16 - 12) * per_block == _router_estimate(len(other), 12, per_block), (got, per_block)
        assert got[0] == _router_estimate(len(q), 0, per_block)
        logs = d.log()
        assert "prefilling locally" not in logs, logs[-2000:]
        # the references taken on the reused blocks are dropped when the requests end: usage back to idle
        t_end = time.monotonic() + 10
        while d.health()["kv_cache_usage_perc"] != idle and time.monotonic() < t_end:
            time.sleep(0.2)
        assert d.health()["kv_cache_usage_perc"] == idle, (d.health(), idle)
    finally:
        g.stop()
