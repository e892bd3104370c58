"""`dynamo-ext bench route` smoke run: one workload (shared-prefix), 4 streaming requests, the four policies
(round-robin, Dynamo's KV router, dynamo-ext, dynamo-ext without local prefill) on real etcd, NATS, workers and Dynamo frontends; the JSON has
the documented shape, every request completed and KV moved, and the table is printed last; with --one-graph
and --quiet-load each run records its load and the dynamo-ext router reports measured throughput.
``wait_quiet`` waits for the load average with an injected clock (no graph)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dynamo_ext.bench.route import wait_quiet

KEYS = {"policy": str, "ttft_p50_s": float, "ttft_p99_s": float, "throughput_tok_s": float,
        "prefix_hit_rate": float, "kv_bytes_moved": int}


def test_bench_route_smoke(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "dynamo_ext.cli", "bench", "route", "--workloads", "shared-prefix", "--requests", "4",
         "--rate", "8", "--warmup", "1", "--system-len", "256", "--doc-len", "64", "--output-len", "4",
         "--prefill-workers", "1", "--decode-workers", "1", "--layers", "2", "--runs", "1", "--out", str(tmp_path), "--tag", "smoke",
         "--one-graph", "--quiet-load", "1000", "--quiet-timeout", "1"],
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    data = json.loads((tmp_path / "smoke-shared-prefix.json").read_text())
    assert set(data) == {"workload", "machine", "results"}
    assert data["workload"] == "shared-prefix" and isinstance(data["machine"], str) and data["machine"]
    assert [x["policy"] for x in data["results"]] == ["round-robin", "dynamo-kv", "dynamo-ext", "dynamo-ext-nolocal"]
    for row in data["results"]:
        assert set(row) == set(KEYS), row
        assert all(type(row[k]) is t for k, t in KEYS.items()), row
        assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"] and row["throughput_tok_s"] > 0
        assert 0.0 <= row["prefix_hit_rate"] <= 1.0 and row["kv_bytes_moved"] >= 0
        if row["policy"] == "round-robin":  # always disaggregates; dynamo-ext may prefill all 4 locally
            assert row["kv_bytes_moved"] > 0, row
    runs = json.loads((tmp_path / "smoke-shared-prefix.runs.json").read_text())["runs"]
    assert all(x["completed"] == x["requests"] == 4 and not x["errors"] for x in runs), runs
    assert all(x["quiet"] is True and x["quiet_wait_s"] == 0.0 and x["load_before"] >= 0 for x in runs), runs
    for x in runs:  # the hit rate comes from the engines' own counters; our router's index refused nothing
        assert x["engine"]["prompt_tokens"] > 0 and x["prefix_hit_rate"] == round(
            x["engine"]["cached_tokens"] / x["engine"]["prompt_tokens"], 4), x
        if x["policy"] != "dynamo-kv":  # our router: no refused KV event, a route trace of every request
            assert x["kv_index_refused"] == {}, x
            assert len(x["routes"]) == 4 and all(r["ttft_s"] > 0 for r in x["routes"]), x["routes"]
            assert x["tail"]["slowest"]["n"] == 2 and x["tail"]["rest"]["n"] == 2, x["tail"]
    nolocal = next(x for x in runs if x["policy"] == "dynamo-ext-nolocal")  # router.local_prefill: false
    assert nolocal["decode_local_prefills"] == 0 and nolocal["kv_transfers"] == 4, nolocal
    for x in runs:  # pulls from the decode workers' /metrics (transfer counters, local prefills)
        assert x["kv_blocks_reused_by_decode"] is None or x["kv_blocks_reused_by_decode"] >= 0, x
        assert x["kv_bytes_moved"] == sum(p["kv_bytes"] for p in x["kv_by_path"]), x
        if x["policy"] == "round-robin":  # every request pulled once: the split is exact
            assert x["decode_local_prefills"] == 0 and x["kv_transfers"] == 4, x
            assert isinstance(x["kv_blocks_reused_by_decode"], int), x
            assert 0 < x["blocks_prefilled_remotely"] <= x["prompt_blocks"], x
            assert x["kv_backends"] and x["kv_pull_gbps"] > 0 and x["kv_pull_s_mean"] > 0, x
    info = json.loads((tmp_path / "smoke-shared-prefix.runs.json").read_text())["info"]
    assert [len(info[p]["runs"]) for p in ("round-robin", "dynamo-kv", "dynamo-ext")] == [1, 1, 1]  # --one-graph
    thr = info["dynamo-ext"]["router_throughput"]  # the router measured its workers
    assert thr and any("prefill_tok_s" in w or "local_prefill_tok_s" in w for w in thr.values()), thr
    assert (tmp_path / "smoke-shared-prefix.png").stat().st_size > 1000
    md = (tmp_path / "smoke-shared-prefix.md").read_text()
    assert "| dynamo-ext |" in md
    assert r.stdout.rstrip().endswith(md.rstrip().splitlines()[-1])  # the table is printed last

    # --resume keeps the runs already measured: nothing missing here, so no graph starts and the outputs stay
    base = ["--workloads", "shared-prefix", "--rate", "8", "--warmup", "1", "--system-len", "256", "--doc-len", "64",
            "--output-len", "4", "--prefill-workers", "1", "--decode-workers", "1", "--layers", "2", "--runs", "1",
            "--out", str(tmp_path), "--tag", "smoke", "--one-graph", "--quiet-load", "1000", "--quiet-timeout", "1",
            "--resume", "--no-plot"]  # fmt: skip
    again = subprocess.run([sys.executable, "-m", "dynamo_ext.cli", "bench", "route", "--requests", "4", *base],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "--resume: 4 run(s) kept" in again.stderr and "[serve]" not in again.stderr, again.stderr[-2000:]
    assert json.loads((tmp_path / "smoke-shared-prefix.runs.json").read_text())["runs"] == runs
    other = subprocess.run([sys.executable, "-m", "dynamo_ext.cli", "bench", "route", "--requests", "5", *base],
                           capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and "other parameters" in other.stderr and "'requests': (4, 5)" in other.stderr, \
        other.stderr[-2000:]


def test_wait_quiet_waits_for_the_load_then_records_it():
    now = [0.0]
    loads = [3.0, 2.0, 0.5]
    r = wait_quiet(1.0, 60, poll_s=5, loadavg=lambda: (loads.pop(0), 0.0, 0.0),
                   sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0])
    assert r == {"load_before": 0.5, "quiet_wait_s": 10.0, "quiet": True}
    now[0] = 0.0
    r = wait_quiet(1.0, 12, poll_s=5, loadavg=lambda: (4.0, 0.0, 0.0),
                   sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0])
    assert r == {"load_before": 4.0, "quiet_wait_s": 12.0, "quiet": False}  # gave up at the timeout
    assert wait_quiet(0, 0, loadavg=lambda: (9.0, 0.0, 0.0))["quiet"] is None  # not asked: no wait
    with pytest.raises(ValueError, match="quiet-load"):
        wait_quiet(-1, 0)


def test_bench_route_agg_graph(tmp_path):
    """--graph agg: aggregated workers behind our router; the hit rate from the engines' counters."""
    r = subprocess.run(
        [sys.executable, "-m", "dynamo_ext.cli", "bench", "route", "--graph", "agg", "--agg-workers", "2",
         "--policies", "dynamo-ext", "--workloads", "shared-prefix", "--requests", "6", "--rate", "8", "--warmup", "1",
         "--system-len", "256", "--doc-len", "64", "--output-len", "4", "--layers", "2", "--runs", "1",
         "--out", str(tmp_path), "--tag", "agg", "--no-plot"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (x,) = json.loads((tmp_path / "agg-shared-prefix.runs.json").read_text())["runs"]
    assert x["completed"] == 6 and x["kv_bytes_moved"] == 0 and x["engine"]["prefills_agg"] == 6, x
    assert sum(x["router_decisions"].values()) == 6 and x["kv_index_refused"] == {}, x
    assert "2 aggregated workers" in (tmp_path / "agg-shared-prefix.md").read_text()


def test_gain_split_attributes_the_ttft_gain():
    from dynamo_ext.bench.route import gain_split

    rr = {"ttft_p50_s": 1.0, "ttft_p99_s": 2.0}
    text = gain_split(rr, {"ttft_p50_s": 0.7, "ttft_p99_s": 2.2}, {"ttft_p50_s": 0.4, "ttft_p99_s": 1.0})
    assert "50% of the gain from placement, 50% from local prefill" in text  # p50: 0.3 of 0.6
    assert "0% of the gain from placement, 100% from local prefill" in text  # p99: placement made it worse
    assert "no gain" in gain_split(rr, rr, {"ttft_p50_s": 1.1, "ttft_p99_s": 2.5})
