"""`dynamo-ext bench transfer` runs the real two-process benchmark end to end and writes JSON/MD/PNG."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_transfer_small(tmp_path):
    out = tmp_path / "t.json"
    r = subprocess.run(
        [sys.executable, "-m", "dynamo_ext.cli", "bench", "transfer", "--size", "8MiB", "--paths", "host->host",
         "--reps", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data) >= {"machine", "size_bytes", "layout", "results"}
    assert data["layout"] == "llama3-70b" and data["size_bytes"] > 0
    methods = {row["method"] for row in data["results"]}
    assert {"naive", "planned", "raw-single"} <= methods
    for row in data["results"]:
        assert set(row) >= {"path", "method", "gbps", "descriptors", "verified"}
        assert row["path"] == "host->host" and row["verified"] is True and row["gbps"] > 0
    assert out.with_suffix(".md").exists() and out.with_suffix(".png").stat().st_size > 1000


def test_bench_unknown_name_exit_2():
    r = subprocess.run([sys.executable, "-m", "dynamo_ext.cli", "bench", "nope"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "invalid choice" in r.stderr
