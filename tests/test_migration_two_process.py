"""Migration of a running decode request between two worker processes, through the transport layer.

Worker A (``dynamo_ext/bench/direct_worker.py``: the product's EngineRunner + BlockPool + a pool registered once with
the transfer backend) decodes a greedy request; mid-stream it is exported (``EngineRunner.export`` ->
``engine.detach``: the KV blocks stay, A's stream ends ``migrated``); worker B pulls those blocks from A's pool
with ONE planned READ (``transport.pull``; cma here, cuda_ipc between GPUs), continues the request with
``add_prefilled_request`` and A releases the blocks. Asserted: the client's token sequence (A's part + B's
part) equals an uninterrupted run token for token, exactly the request's blocks moved, nothing left held."""

from __future__ import annotations

import asyncio
import importlib


def _harness():
    return importlib.import_module("dynamo_ext.bench.serve_direct")


def test_running_request_migrates_between_processes_with_the_same_tokens(tmp_path):
    m = _harness()
    a_args = m.parse_args(["--no-progress"])
    n_out = 1500

    async def scenario():
        a = m.WorkerProc("decode-a", "decode", "cpu", a_args, tmp_path)
        b = m.WorkerProc("decode-b", "decode", "cpu", a_args, tmp_path)
        try:
            await a.start(256)
            await b.start(256)
            a.ready = await a.wait_ready(120)
            b.ready = await b.wait_ready(120)
            b.send({"op": "add_peer", "info": a.ready["peer_info"]})
            prompt = m.make_prompts(1, 64, int(a.ready["vocab"]), 5)[0]

            q = b.expect("ref")
            b.send({"op": "decode", "rid": "ref", "prompt": prompt, "max_tokens": n_out, "handle": None})
            await m.wait_event(q, "first", 60, "ref")
            ref = (await m.wait_event(q, "done", 120, "ref"))["tokens"]

            qa, qe = a.expect("m1"), a.expect("m1#export")
            a.send({"op": "decode", "rid": "m1", "prompt": prompt, "max_tokens": n_out, "handle": None})
            await m.wait_event(qa, "first", 60, "m1 first")
            await asyncio.sleep(0.2)
            a.send({"op": "export", "rid": "m1"})
            done_a = await m.wait_event(qa, "done", 60, "m1 on A")
            exp = await m.wait_event(qe, "exported", 60, "m1 export")

            qb = b.expect("m1b")
            toks = exp["tokens"]
            b.send({"op": "decode", "rid": "m1b", "prompt": toks[:-1], "max_tokens": n_out - len(exp["output"]) + 1,
                    "handle": {"agent": exp["agent"], "pool": exp["pool"], "block_ids": exp["block_ids"],
                               "first_token": toks[-1]}})
            pulled = await m.wait_event(qb, "pulled", 60, "m1 pull")
            qr = a.expect("m1")
            a.send({"op": "release", "rid": "m1"})
            released = await m.wait_event(qr, "released", 30, "m1 release")
            await m.wait_event(qb, "first", 60, "m1 on B first")
            done_b = await m.wait_event(qb, "done", 120, "m1 on B")
            qs = a.expect("__stats__")
            a.send({"op": "stats"})
            stats_a = await m.wait_event(qs, "stats", 30, "stats")
            return ref, done_a, exp, pulled, released, done_b, stats_a, a.ready["layout"]
        finally:
            await a.stop()
            await b.stop()

    ref, done_a, exp, pulled, released, done_b, stats_a, layout = asyncio.run(scenario())
    from dynamo_ext.transport import KvLayout

    assert done_a["migrated"] is True and 1 < len(done_a["tokens"]) < n_out  # stopped mid-stream on A
    assert exp["output"] == done_a["tokens"] and exp["num_computed"] == len(exp["tokens"]) - 1
    assert done_b["tokens"][0] == exp["tokens"][-1]  # B starts from the last token A streamed
    assert done_a["tokens"] + done_b["tokens"][1:] == ref  # the client's sequence = an uninterrupted run
    assert pulled["bytes"] == len(exp["block_ids"]) * KvLayout.from_dict(layout).block_bytes
    assert released["held"] is True and stats_a["held"] == 0 and stats_a["running"] == 0
