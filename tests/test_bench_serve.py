"""`dynamo-ext bench serve` smoke run: both graphs (real etcd, NATS, workers, router, Dynamo frontend), one
rate, 4 streaming requests each; the JSON has the documented shape and every request completed."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_serve_smoke(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "dynamo_ext.cli", "bench", "serve", "--rates", "4", "--requests", "4", "--warmup", "1",
         "--prompt-len", "64", "--output-len", "8", "--out", str(tmp_path), "--tag", "smoke", "--no-progress"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert set(data) >= {"machine", "params", "startup_s", "results", "wall_s"}
    assert data["params"]["graphs"] == ["agg", "disagg"] and set(data["startup_s"]) == {"agg", "disagg"}
    rows = data["results"]
    assert [(x["graph"], x["rate"]) for x in rows] == [("agg", 4.0), ("disagg", 4.0)]
    for row in rows:
        assert row["requests"] == 4 and row["completed"] == 4 and not row["errors"], row
        for k in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "output_tok_s", "req_s"):
            assert row[k] is not None and row[k] > 0, (k, row)
        assert row["ttft_p99_ms"] >= row["ttft_p50_ms"] and row["tpot_p99_ms"] >= row["tpot_p50_ms"]
        assert len(row["samples"]) == 4
        assert all(s["tokens"] == 8 and s["error"] is None and s["prompt_tokens"] > 0 for s in row["samples"])
    dis = rows[1]
    assert dis["kv_transfers"] == 4 and dis["kv_bytes_per_request"] > 0  # warm-up excluded: one READ per request
    assert 0 < dis["kv_share_of_ttft"] < 1
    assert "kv_share_of_ttft" not in rows[0]
    md = (tmp_path / "smoke.md").read_text()
    assert "| disagg | 4 | 4/4 |" in md and "Not run here" in md
    assert (tmp_path / "smoke.png").stat().st_size > 1000
    assert r.stdout.rstrip().endswith(md.rstrip().splitlines()[-1])  # the table is printed last
