"""`dynamo-ext bench serve` smoke run: both graphs (started by launch_graph: real etcd, NATS, workers, router,
Dynamo frontend), two request classes (prompt lengths), one rate, 4 streaming requests per cell; the JSON has
the documented shape, every request completed, and the disagg cells' pulls (count, bytes, GB/s, backend, path)
come from the decode workers' /metrics. The closed loop (--concurrency) keeps at most N requests in flight and
sends both graphs the same prompts. ``_kv`` is checked on metrics text written by the transport's own metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from prometheus_client import CollectorRegistry, generate_latest

from dynamo_ext.bench._kv import kv_delta, kv_summary, kv_totals
from dynamo_ext.transport.metrics import make_metrics


def test_bench_serve_smoke(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "dynamo_ext.cli", "bench", "serve", "--rates", "4", "--requests", "4", "--warmup", "1",
         "--prompt-lens", "48,96", "--output-len", "8", "--out", str(tmp_path), "--tag", "smoke", "--no-progress"],
        capture_output=True, text=True, timeout=240, env=dict(os.environ, DYNAMO_EXT_CACHE=str(tmp_path / "cache")),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert set(data) >= {"runtime", "machine", "params", "startup_s", "results", "wall_s"}
    assert data["runtime"] == "dynamo" and data["machine"]["cpu"] is not None and data["machine"]["cores"] > 0
    assert data["params"]["graphs"] == ["agg", "disagg"] and set(data["startup_s"]) == {"agg", "disagg"}
    assert data["machine"]["device"] == "cpu" and "gpus" not in data["machine"] and data["machine"]["python"]
    assert data["model"]["preset"] == "tiny" and data["model"]["how"] in ("generated", "cached")
    assert data["params"]["kv_blocks"] >= 1024 and data["params"]["concurrency"] == [] and "env" in data
    assert data["stem"] == "smoke" and data["errors"] == [] and data["skipped"] == []
    rows = data["results"]
    assert [(x["graph"], x["prompt_len"], x["rate"]) for x in rows] == [
        ("agg", 48, 4.0), ("agg", 96, 4.0), ("disagg", 48, 4.0), ("disagg", 96, 4.0)]
    for row in rows:
        assert row["requests"] == 4 and row["completed"] == 4 and not row["errors"], row
        for k in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "output_tok_s", "req_s"):
            assert row[k] is not None and row[k] > 0, (k, row)
        assert row["ttft_p99_ms"] >= row["ttft_p50_ms"] and row["tpot_p99_ms"] >= row["tpot_p50_ms"]
        assert len(row["samples"]) == 4
        assert all(s["tokens"] == 8 and s["error"] is None and s["prompt_tokens"] > 0 for s in row["samples"])
    for dis in rows[2:]:
        assert dis["kv_transfers"] == 4 and dis["kv_bytes_per_request"] > 0  # warm-up excluded: one READ per request
        assert 0 < dis["kv_share_of_ttft"] < 1 and dis["kv_pull_gbps"] > 0 and dis["kv_pull_s_mean"] > 0
        assert dis["kv_share_of_ttft"] == round(dis["kv_pull_s_mean"] / (dis["ttft_mean_ms"] / 1e3), 4) or \
            abs(dis["kv_share_of_ttft"] - dis["kv_pull_s_mean"] / (dis["ttft_mean_ms"] / 1e3)) < 2e-3
        assert dis["kv_backends"] and dis["kv_bytes"] == sum(x["kv_bytes"] for x in dis["kv_by_path"])
        assert dis["kv_paths"] == ["host->host"] and dis["kv_transfer_errors"] == 0 and dis["local_prefills"] == 0
        assert dis["ttft_p50_vs_agg"] > 0 and dis["load"] == "4 req/s" and dis["concurrency"] is None
        assert sum(x["kv_transfers"] for x in dis["kv_by_path"]) == 4
        assert all({"backend", "path", "direction", "kv_pull_gbps"} <= set(x) for x in dis["kv_by_path"])
    assert rows[3]["kv_bytes_per_request"] > rows[2]["kv_bytes_per_request"]  # longer prompts, more KV
    assert "kv_share_of_ttft" not in rows[0] and "kv_backends" not in rows[1] and "ttft_p50_vs_agg" not in rows[0]
    md = (tmp_path / "smoke.md").read_text()
    assert "| 4 req/s | 4/4 |" in md and "Not run here" in md and "Runtime: dynamo" in md
    assert (tmp_path / "smoke.png").stat().st_size > 1000
    assert r.stdout.rstrip().endswith(md.rstrip().splitlines()[-1])  # the table is printed last


def test_bench_serve_closed_loop(tmp_path, capsys):
    """--concurrency: at most N requests in flight (the next one is sent when one ends), the same prompts for
    both graphs, default stem with the load (never the committed serve-cpu-tiny), --summary prints the rows."""
    env = dict(os.environ, DYNAMO_EXT_CACHE=str(tmp_path / "cache"))
    r = subprocess.run(
        [sys.executable, "-m", "dynamo_ext.cli", "bench", "serve", "--concurrency", "1,2", "--requests", "4",
         "--warmup", "1", "--prompt-lens", "200", "--output-len", "6", "--out", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert {p.name for p in tmp_path.glob("serve-*")} == {f"serve-cpu-tiny-c1-2.{x}" for x in ("json", "md", "png")}
    data = json.loads((tmp_path / "serve-cpu-tiny-c1-2.json").read_text())
    assert data["runtime"] == "dynamo" and data["params"]["concurrency"] == [1, 2] and data["params"]["rates"] == []
    rows = data["results"]
    assert [(x["graph"], x["load"], x["concurrency"], x["rate"]) for x in rows] == [
        ("agg", "c=1", 1, None), ("agg", "c=2", 2, None), ("disagg", "c=1", 1, None), ("disagg", "c=2", 2, None)]
    for row in rows:
        assert row["completed"] == 4 and row["req_s"] > 0 and row["ttft_p50_ms"] > 0, row
        spans = [(s["at_s"], s["end_s"]) for s in row["samples"]]
        in_flight = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
        assert in_flight <= row["concurrency"], spans
        if row["concurrency"] == 1:
            assert all(spans[i + 1][0] >= spans[i][1] for i in range(len(spans) - 1)), spans  # one at a time
    for a, d in ((rows[0], rows[2]), (rows[1], rows[3])):  # the same prompts (lengths jittered per request)
        assert [s["prompt_tokens"] for s in a["samples"]] == [s["prompt_tokens"] for s in d["samples"]]
        assert d["kv_transfers"] == 4 and 0 < d["kv_share_of_ttft"] < 1 and d["kv_paths"] == ["host->host"]
        assert d["ttft_p50_vs_agg"] == round(d["ttft_p50_ms"] / a["ttft_p50_ms"], 3)
    md = (tmp_path / "serve-cpu-tiny-c1-2.md").read_text()
    assert "closed loop, 1, 2 request(s) in flight" in md and "| c=1 | 4/4 |" in md
    from dynamo_ext.bench.serve import main

    assert main(["--summary", str(tmp_path / "serve-cpu-tiny-c1-2.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["run", "graph", "prompt", "load"] and out[-1].startswith("machine: ")
    assert sum(line.startswith("serve-cpu-tiny-c1-2 ") for line in out) == 4
    with pytest.raises(SystemExit):  # a request must fit the KV blocks of a worker
        main(["--prompt-lens", "1000", "--kv-blocks", "16"])
    with pytest.raises(SystemExit):
        main(["--rates", "1", "--concurrency", "1"])


def test_kv_stats_from_metrics_text():
    """Two scrapes of two workers' transport metrics -> the cell's pulls per backend / path, GB/s, mean s."""
    regs = [CollectorRegistry(), CollectorRegistry()]
    ms = [make_metrics(r) for r in regs]
    ms[0].observe(path="host->host", direction="read", backend="nixl", nbytes=1000, seconds=0.5, descriptors=3)
    before = kv_totals({f"decode-{i}": generate_latest(r).decode() for i, r in enumerate(regs)})
    ms[0].observe(path="host->host", direction="read", backend="nixl", nbytes=4_000_000, seconds=0.002, descriptors=2)
    ms[1].observe(path="host->host", direction="read", backend="nixl", nbytes=2_000_000, seconds=0.001, descriptors=4)
    ms[1].observe(path="host->host", direction="read", backend="cma", nbytes=3_000_000, seconds=0.003, descriptors=1)
    after = kv_totals({f"decode-{i}": generate_latest(r).decode() for i, r in enumerate(regs)})
    s = kv_summary(kv_delta(after, before))
    assert s["kv_transfers"] == 3 and s["kv_bytes"] == 9_000_000 and s["kv_backends"] == ["cma", "nixl"]
    assert abs(s["kv_pull_s_mean"] - 0.002) < 1e-9 and abs(s["kv_pull_gbps"] - 1.5) < 1e-9
    by = {x["backend"]: x for x in s["kv_by_path"]}
    assert by["nixl"]["kv_transfers"] == 2 and by["nixl"]["kv_bytes"] == 6_000_000 and by["nixl"]["kv_pull_gbps"] == 2.0
    assert by["nixl"]["kv_descriptors_mean"] == 3.0 and by["cma"]["path"] == "host->host"
    assert kv_summary(kv_delta(after, after))["kv_transfers"] == 0
