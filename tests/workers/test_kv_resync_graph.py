"""Issue 14.3 with real processes (router + 1 prefill + 1 decode, tiny CPU model, real NATS and Dynamo runtime):
the router's KV event index loses one message (test hook: as if NATS had dropped it), sees the gap in the
publisher's sequence at its next message, asks that worker's ``kv_blocks`` endpoint for its prefix cache and
rebuilds its part of the index: no refused event, and a prompt sent again is routed on its cached prefix."""

from __future__ import annotations

import json
import time
import urllib.request

from conftest import Graph, hooks_env

PROMPTS = [[(37 * i + 11 * k) % 250 + 3 for k in range(80)] for i in range(1, 6)]


def _req(tokens):
    return {"token_ids": list(tokens), "stop_conditions": {"max_tokens": 2}, "sampling_options": {"temperature": 0}}


def test_a_lost_kv_event_message_is_resynced_from_the_worker(servers, model_dir, tmp_path):
    etcd, nats = servers
    g = Graph(etcd.url, nats.url, tmp_path, model_dir, namespace="kvrs",
              router={"policy": "dynamo-ext", "disagg_min_prompt_tokens": 0, "local_prefill": False})
    try:
        p, d = g.start("prefill", wait=False), g.start("decode", wait=False)
        r = g.start("router", wait=False, extra_env=hooks_env(DXTEST_DROP_KV_MESSAGES="3"))
        g.wait_ready([p, d, r])
        snap = g.call("kvrs.prefill.kv_blocks", [{}])[0]  # the endpoint itself: an empty cache, one chunk
        assert snap == [{"events": [], "total": 0}], snap
        for t in PROMPTS[:4]:  # one at a time: each prefill and each pull commit is its own message
            out = g.call("kvrs.router.generate", [_req(t)])
            assert out[0][-1].get("finish_reason"), out
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            idx = r.health()["kv_index"]
            if idx["resyncs"] >= 1 and not idx.get("resyncing"):
                break
            time.sleep(0.2)
        assert idx["sequence_gaps"] >= 1 and idx["resyncs"] >= 1 and idx["resync_failures"] == 0, idx
        assert idx["refused"] == {}, idx
        assert "resynced" in r.log(), r.log()[-3000:]
        # the four prompts again: the index has each on both workers (the prefill worker computed it, the decode
        # worker pulled it), the one whose message was lost included
        g.call("kvrs.router.generate", [_req(t + [7, 8, 9]) for t in PROMPTS[:4]])
        with urllib.request.urlopen(r.metrics_url.rsplit("/", 1)[0] + "/routes", timeout=5) as f:
            routes = json.loads(f.read())
        for last in routes[-4:]:
            assert sorted(last["estimate"]["overlaps"].values()) == [80 // 16, 80 // 16], last
        snap = g.call("kvrs.prefill.kv_blocks", [{}])[0]
        blocks = [b for c in snap for e in c["events"] for b in e["data"]["stored"]["blocks"]]
        assert len(blocks) == 4 * (80 // 16) and snap[0]["events"][0]["data"]["stored"]["parent_hash"] is None, snap
    finally:
        g.stop()
