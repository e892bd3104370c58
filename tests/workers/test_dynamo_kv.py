"""Policy dynamo-kv: the workers register the public model themselves (WorkerType.Prefill under
component ``prefill``, WorkerType.Decode under ``backend``) and Dynamo's frontend (--router-mode kv)
runs the disaggregated flow: the prefill worker's terminal chunk carries ``disaggregated_params``
(our KvHandle), the frontend forwards it as ``prefill_result`` and the decode worker pulls the KV with
NIXL. Greedy outputs equal the aggregated graph's."""

from __future__ import annotations

from conftest import Graph
from test_disagg_graph import _complete, _prompt

N = 12


def test_dynamo_kv_disagg_through_frontend(servers, model_dir, tmp_path):
    etcd, nats = servers
    agg = Graph(etcd.url, nats.url, tmp_path, model_dir, namespace="kvagg")
    dis = Graph(etcd.url, nats.url, tmp_path, model_dir, namespace="kvdis", router={"policy": "dynamo-kv"})
    try:
        a = agg.start("agg", wait=False)
        ar = agg.start("router", wait=False)  # the aggregated graph's only entry (agg workers register nothing)
        p = dis.start("prefill", wait=False)
        d0, d1 = dis.start("decode", wait=False), dis.start("decode", wait=False)
        agg.wait_ready([a, ar])
        dis.wait_ready([p, d0, d1])
        base_a = agg.frontend("round-robin")
        base_d = dis.frontend("kv")
        ref = [_complete(base_a, _prompt(i)) for i in range(N)]
        got = [_complete(base_d, _prompt(i)) for i in range(N)]
        assert all(ref)
        assert got == ref
        logs = d0.log() + d1.log()
        pulled = sum("kv transfer received" in ln for ln in logs.splitlines())
        assert pulled == N, logs[-3000:]

        # Dynamo's KV router sees our prefill worker's KV events: the same long prompt again overlaps
        long = " ".join(f"word{i}" for i in range(120))  # ~700 byte tokens: ~44 full blocks
        before = p.health()["engine"]
        _complete(base_d, long)
        _complete(base_d, long)
        after = p.health()["engine"]
        cached = after["prefill_cached_tokens"] - before["prefill_cached_tokens"]
        assert cached >= 16 * 30, (before, after)  # the second prefill found the first one's blocks
        import re

        fe = (dis.workdir / "kvdis-frontend.err").read_text(errors="replace")
        overlaps = [int(x) for x in re.findall(r"overlap_blocks[=:] ?(\d+)", re.sub(r"\x1b\[[0-9;]*m", "", fe))]
        print("overlap_blocks in the frontend's routing decisions:", overlaps[-6:])
        assert overlaps and max(overlaps) >= 30, fe[-3000:]
    finally:
        dis.stop()
        agg.stop()
