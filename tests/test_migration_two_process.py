"""Migration of a running decode request between two worker processes, through the serving core and the
transport layer.

Two decode workers (``dynamo_ext.bench.direct_worker``: ``serving.ServingWorker`` over JSON lines, the same core
the Dynamo workers run). Worker A decodes a greedy request; mid-stream it is exported (``ServingWorker.export``
-> ``engine.detach``: the KV blocks stay, A's stream ends with a ``migrate`` chunk: a KvHandle over the
blocks, A's transports, the tokens); worker B continues it with ``serving.migration_request`` (B pulls the
blocks from A's pool over the backend select_transport picks: cma here, cuda_ipc between GPUs, and computes
from there). Asserted: the client's token sequence (A's part + B's part) equals an uninterrupted run token for
token, exactly the handle's blocks moved, and A frees them at the handle's deadline."""

from __future__ import annotations

import asyncio
import importlib
import time


def _harness():
    return importlib.import_module("dynamo_ext.bench.serve_direct")


def test_running_request_migrates_between_processes_with_the_same_tokens(tmp_path):
    from dynamo_ext.serving import migration_request
    from dynamo_ext.transport import KvLayout

    m = _harness()
    args = m.parse_args(["--no-progress", "--transfer-timeout-s", "1"])
    n_out = 1500

    async def scenario():
        g = m.Graph(m.GraphSpec("disagg", 0, 2), args, tmp_path)  # two decode workers, no prefill worker
        a, b = g.decode
        try:
            await g.start(256, 120)
            prompt = m.make_prompts(1, 64, int(a.ready["vocab"]), 5)[0]
            req = {"token_ids": prompt, "stop_conditions": {"max_tokens": n_out, "ignore_eos": True},
                   "sampling_options": {"temperature": 0.0}}
            ref = [t for c in [x async for x in b.stream("generate", 120, request=req)] for t in c.get("token_ids", [])]
            free_a = (await a.call("stats", 10))["free_blocks"]

            chunks_a: list[dict] = []

            async def run_a() -> None:
                async for c in a.stream("generate", 120, request={**req, "router_rid": "m1"}):
                    chunks_a.append(c)

            ta = asyncio.create_task(run_a())
            while not chunks_a:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            exported = await a.call("export", 10, router_rids=["m1"])
            await ta
            mig = chunks_a[-1]["migrate"]
            cont = {**migration_request(req, mig), "report_kv_transfer": True}
            chunks_b = [x async for x in b.stream("generate", 120, request=cont)]
            t_deadline = mig["kv_handle"]["deadline"]
            await asyncio.sleep(max(0.0, t_deadline - time.time()) + 0.3)
            stats_a = await a.call("stats", 10)
            return ref, exported, chunks_a, mig, chunks_b, free_a, stats_a, a.ready["layout"]
        finally:
            await g.stop()

    ref, exported, chunks_a, mig, chunks_b, free_a, stats_a, layout = asyncio.run(scenario())
    toks_a = [t for c in chunks_a for t in c.get("token_ids", [])]
    toks_b = [t for c in chunks_b for t in c.get("token_ids", [])]
    assert exported == ["m1"] and "migrate" in chunks_a[-1] and 1 < len(toks_a) < n_out  # stopped mid-stream on A
    assert mig["output_len"] == len(toks_a) and mig["tokens"][-1] == toks_a[-1]
    assert toks_b[0] == toks_a[-1]  # B starts from the last token A streamed
    assert toks_a + toks_b[1:] == ref  # the client's sequence = an uninterrupted run
    rep = chunks_b[0]["kv_transfer"]
    # prefix-aware pull: B's cache holds the prompt's 4 full blocks (from the reference run): only the rest moves
    assert rep["bytes"] == (len(mig["kv_handle"]["block_ids"]) - 64 // 16) * KvLayout.from_dict(layout).block_bytes, rep
    assert rep["kind"] == "host-shm" and rep["backend"] in ("shm", "cma", "nixl", "tcp"), rep
    assert stats_a["running"] == 0 and stats_a["free_blocks"] == free_a  # A freed the blocks at the deadline
