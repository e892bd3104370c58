"""`dynamo-ext bench serve-direct` on CPU: real worker processes running the serving core (serving.ServingWorker)
over JSON lines, the coordinator's serving.RouterCore sessions, KV pulled between two processes over the backend
select_transport picks (cma here; cuda_ipc for GPU pools)."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _module():
    return importlib.import_module("dynamo_ext.bench.serve_direct")


def test_serve_direct_cpu_end_to_end(tmp_path):
    stem = tmp_path / "sd"
    r = subprocess.run(
        [sys.executable, "-m", "dynamo_ext.cli", "bench", "serve-direct", "--graphs", "agg:2,disagg:1p1d",
         "--prompt-lens", "40,100", "--requests", "6", "--concurrency", "3", "--rates", "closed,40", "--output-len", "6",
         "--out", str(stem), "--no-progress"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    data = json.loads(stem.with_suffix(".json").read_text())
    assert set(data) >= {"machine", "params", "startup_s", "results", "verify"} and data["runtime"] == "direct"
    rows = data["results"]
    # one row per (graph, prompt length, load): the closed loop, then Poisson arrivals at 40 req/s
    assert [(x["graph"], x["prompt_len"], x["rate"], x["concurrency"]) for x in rows] == [
        (g, pl, r, c) for g in ("agg-2", "disagg-1p1d") for pl in (40, 100) for r, c in ((None, 3), (40.0, None))]
    for row in rows:
        assert row["completed"] == 6 and not row["errors"], row
        assert row["held_handles_after"] == 0
        assert row["prefix_hit_rate"] == 0, row  # random prompts, fresh per load: no cache hits at any load
        assert row["ttft_p99_s"] >= row["ttft_p50_s"] > 0 and row["requests_per_s"] > 0
    # every disaggregated request was pulled, and the bytes are exactly its prompt blocks' KV
    layout_bytes_per_block = None
    for row in rows[4:]:
        assert row["kv_pulls"] == 6
        # bytes the transfers reported == the layout's block bytes x the blocks each prefill handed over
        assert row["kv_bytes_total"] == row["kv_bytes_expected_total"] > 0
        assert row["kv_bytes_total"] == 6 * row["kv_bytes_per_request"]
        nblocks = -(-(row["prompt_len"] + 1) // 16)  # prefill holds the prompt's blocks plus room for the first token
        per_block = row["kv_bytes_per_request"] / nblocks
        assert per_block == int(per_block) and per_block > 0
        layout_bytes_per_block = layout_bytes_per_block or per_block
        assert per_block == layout_bytes_per_block
        assert 0 < row["kv_share_of_ttft"] < 1
        (pair,) = row["pairs"].values()
        assert pair["kind"] == "host-shm" and pair["transfers"] == 6 and pair["measured_gbps_p50"] > 0
        assert pair["transfer_backend"] == pair["backends"][0] and pair["path"] == "host->host", pair
    v = data["verify"]["graphs"]["disagg-1p1d"]
    assert v["compared"] == 24 and v["equal"] == 24  # greedy: disagg == agg token for token (2 lengths x 2 loads x 6)
    md = stem.with_suffix(".md").read_text()
    assert "| disagg-1p1d | 100 | 6/6 |" in md and "24/24 equal" in md
    assert md.count("| Poisson 40 req/s |") == 4 and md.count("| closed, 3 in flight |") == 4
    assert stem.with_suffix(".png").stat().st_size > 1000
    assert r.stdout.rstrip().endswith(md.rstrip().splitlines()[-1])  # the table is printed last


def test_graph_spec_errors_name_the_allowed_forms():
    m = _module()
    assert m.GraphSpec.parse("agg:4").decode == 4 and m.GraphSpec.parse("disagg:2p2d").gpus == 4
    for bad in ("agg:0", "disagg:2p", "both:2", "disagg:xpyd"):
        with pytest.raises(m.GraphSpecError, match="agg:N or disagg:XpYd"):
            m.GraphSpec.parse(bad)


def test_load_options_are_checked():
    m = _module()
    a = m.parse_args(["--rates", "closed,2.5,8", "--quick", "--requests", "64", "--output-len", "64"])
    assert a.rate_list == [None, 2.5, 8.0] and a.requests == 16 and a.output_len == 16
    for bad in ("0", "fast", ","):
        with pytest.raises(SystemExit):
            m.parse_args(["--rates", bad])
    # default result names: benchmarks/results/serve-direct-<machine tag>-<preset>[-<layers>l]
    a = m.parse_args(["--preset", "llama3-70b-shape", "--layers", "8"])
    assert m.result_stem(a, {"gpus": ["NVIDIA H200"] * 4}).name == "serve-direct-4xH200-llama3-70b-shape-8l"
    assert m.result_stem(m.parse_args([]), {}).name == "serve-direct-cpu-tiny"


def test_killed_decode_worker_fails_its_requests_clearly(tmp_path):
    """A decode worker SIGKILLed mid-run: its requests end with an error naming it, within the bound; no hang."""
    m = _module()
    a = m.parse_args(["--graphs", "disagg:1p1d", "--prompt-lens", "64", "--output-len", "1900", "--no-progress"])

    async def scenario():
        g = m.Graph(m.GraphSpec.parse("disagg:1p1d"), a, tmp_path)
        try:
            await g.start(512, 120)
            prompts = m.make_prompts(3, 64, int(g.workers[0].ready["vocab"]), 1)
            tasks = [asyncio.create_task(g.serve(i, p, 1900, 0.0, 60)) for i, p in enumerate(prompts)]
            await asyncio.sleep(0.5)
            os.kill(g.decode[0].proc.pid, signal.SIGKILL)
            outs = await asyncio.wait_for(asyncio.gather(*tasks), 30)
            late = await asyncio.wait_for(g.serve(9, prompts[0], 4, 0.0, 60), 10)  # after the death: refused at once
            return outs, late
        finally:
            await g.stop()

    outs, late = asyncio.run(scenario())
    assert all(o.error and "decode-0" in o.error and "exited with code -9" in o.error for o in outs), outs
    assert late.error and "no decode worker is serving" in late.error  # the router core's answer, as over Dynamo


def test_sigterm_prints_the_partial_table_and_stops_the_workers(tmp_path):
    """A time limit's SIGTERM mid-run: exit 130 within the bound, partial table printed last, children gone."""
    stem = tmp_path / "sd"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynamo_ext.bench.serve_direct", "--graphs", "agg:1,disagg:1p1d",
         "--prompt-lens", "32,48", "--requests", "40", "--concurrency", "2", "--output-len", "40",
         "--out", str(stem), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not stem.with_suffix(".json").exists():  # written after the first cell
            assert proc.poll() is None and time.monotonic() < deadline, "no first cell"
            time.sleep(0.2)
        children = [int(x) for x in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert children, "the coordinator has worker processes"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (proc.returncode, out[-1500:], err[-2500:])
    assert out.rstrip().endswith("INTERRUPTED (signal): the rows above are the cells that completed.")
    assert "| agg-1 | 32 | 40/40 |" in out
    assert json.loads(stem.with_suffix(".json").read_text())["interrupted"] is True
    time.sleep(0.5)
    assert not [c for c in children if Path(f"/proc/{c}").exists()], "worker processes left behind"


def test_bench_serve_runtime_direct_dispatches_here():
    """`dynamo-ext bench serve --runtime direct` is this harness; an unknown runtime names the allowed ones."""
    r = subprocess.run([sys.executable, "-m", "dynamo_ext.cli", "bench", "serve", "--runtime", "direct", "--rates", "x"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "--rates: 'x' is neither a positive req/s nor 'closed'" in r.stderr, r.stderr[-1500:]
    r = subprocess.run([sys.executable, "-m", "dynamo_ext.cli", "bench", "serve", "--runtime=bogus"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode != 0 and "'bogus' is not one of dynamo, direct" in r.stderr, r.stderr[-1500:]


def test_deadline_skips_cells_instead_of_failing_them(tmp_path):
    """--deadline-s shorter than a graph's start-up: no cell starts, the skips are recorded, nothing fails."""
    stem = tmp_path / "sd"
    r = subprocess.run(
        [sys.executable, "-m", "dynamo_ext.bench.serve_direct", "--graphs", "agg:1,disagg:1p1d",
         "--prompt-lens", "32", "--requests", "2", "--output-len", "2", "--deadline-s", "0.5",
         "--out", str(stem), "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["results"] == [] and not data.get("failures")
    assert [(x["graph"], x["cell"]) for x in data["skipped"]] == [("agg-1", "prompt 32"), ("disagg-1p1d", "all")]
    assert "Skipped (deadline): agg-1 prompt 32, disagg-1p1d all." in r.stdout


def test_only_context_poisoning_cuda_errors_end_a_worker():
    w = importlib.import_module("dynamo_ext.bench.direct_worker")
    assert w.is_fatal_cuda(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert w.is_fatal_cuda(type("AcceleratorError", (RuntimeError,), {})("unspecified launch failure"))
    assert not w.is_fatal_cuda(type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate"))
    assert not w.is_fatal_cuda(ValueError("block 7 not held"))
    w.exit_if_fatal(ValueError("block 7 not held"), "test")  # returns: not fatal
