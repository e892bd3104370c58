"""`dynamo-ext bench aiperf`: one tiny run (tiny preset, agg graph started by launch_graph: real etcd, NATS,
workers, router, Dynamo frontend; aiperf in its own venv, created on first use: ~1-2 min once per machine, then
reused from ``~/.cache/dynamo_ext``), concurrency 1 and 2, 4 requests per point and client. The export of each
aiperf run is parsed into rows with positive TTFT / throughput and the request counts aiperf sent; our client
sent the same prompts (same server-side prompt token counts); markdown / JSON / PNG go to a temp dir. Also: the
aiperf pin is in one place (AIPERF_VERSION == requirements/aiperf.txt), a half-created venv is removed and a
failed install leaves nothing behind, and bad arguments are refused naming the option."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dynamo_ext.bench import aiperf as A
from dynamo_ext.bench import results_dir


@pytest.mark.timeout(900)  # the first run on a machine creates aiperf's venv: 61-111 s here, more on a slow index
def test_bench_aiperf_tiny_agg(tmp_path):
    venv = A.venv_dir()  # the shared one (not under the test's model cache): created once per machine
    env = dict(os.environ, DYNAMO_EXT_CACHE=str(tmp_path / "cache"), DYNAMO_EXT_AIPERF_VENV=str(venv))
    r = subprocess.run(
        [sys.executable, "-m", "dynamo_ext.cli", "bench", "aiperf", "--graphs", "agg", "--concurrency", "1,2",
         "--requests", "4", "--warmup", "1", "--isl", "48", "--isl-stddev", "4", "--osl", "6", "--out", str(tmp_path),
         "--tag", "smoke", "--no-progress"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    assert A.venv_ok(venv, A.install_spec()[1])  # complete, marker written
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert data["aiperf"]["version"] == A.AIPERF_VERSION and data["aiperf"]["how"] in ("created", "cached")
    assert data["errors"] == [] and data["params"]["graphs"] == ["agg"] and data["machine"]["cores"] > 0
    rows = data["results"]
    assert [(x["graph"], x["client"], x["concurrency"]) for x in rows] == [
        ("agg", "aiperf", 1), ("agg", "bench-serve", 1), ("agg", "aiperf", 2), ("agg", "bench-serve", 2)]
    for row in rows:
        assert row["requests"] == 4 and row["completed"] == 4 and not row["errors"], row
        assert len(row["samples"]) == 4 and all(s["tokens"] == 6 and s["error"] is None for s in row["samples"])
        for k in ("ttft_p50_ms", "ttft_p99_ms", "output_tok_s", "req_s", "prompt_tokens_mean"):
            assert row[k] is not None and row[k] > 0, (k, row)
        assert row["ttft_p99_ms"] >= row["ttft_p50_ms"] and row["load"] == f"c={row['concurrency']}"
        assert row["load_avg_1m"] >= 0 and "client_cpu_cores" in row  # None when aiperf measured < 1 s
    for aip, ours in ((rows[0], rows[1]), (rows[2], rows[3])):
        assert aip["aiperf"]["request_count"] == 4 and aip["aiperf"]["completed_request_count"] == 4
        assert aip["output_tokens_mean"] == 6 and "--concurrency" in aip["aiperf"]["argv"]
        # the same prompts (aiperf's inputs.json, first character changed): the same token counts per request
        assert sorted(s["prompt_tokens"] for s in aip["samples"]) == sorted(s["prompt_tokens"] for s in ours["samples"])
    md = (tmp_path / "smoke.md").read_text()
    assert "| agg | aiperf |" in md and "| agg | bench-serve |" in md and f"aiperf {A.AIPERF_VERSION}" in md
    assert (tmp_path / "smoke.png").stat().st_size > 1000
    assert not (results_dir() / "smoke.json").exists()
    assert r.stdout.rstrip().endswith(md.rstrip().splitlines()[-1])  # the table is printed last
    # an existing result is not overwritten without --force (refused before anything starts)
    again = subprocess.run([sys.executable, "-m", "dynamo_ext.cli", "bench", "aiperf", "--graphs", "agg", "--out",
                            str(tmp_path), "--tag", "smoke", "--no-progress"], capture_output=True, text=True,
                           timeout=120, env=env)  # fmt: skip
    assert again.returncode == 2 and "--force" in again.stderr
    assert json.loads((tmp_path / "smoke.json").read_text()) == data


def test_aiperf_pinned_in_one_place():
    req = A.requirements_file()
    assert req is not None and A.pinned_version(req.read_text()) == A.AIPERF_VERSION
    pins = [line for line in req.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert pins and all("==" in line for line in pins), [x for x in pins if "==" not in x]
    args, digest = A.install_spec()
    assert args == ["-r", str(req)] and len(digest) == 64


def test_venv_half_created_is_removed_and_failed_install_leaves_nothing(tmp_path):
    d = tmp_path / "aiperf-venv"
    (d / "bin").mkdir(parents=True)
    (d / "bin" / "python").write_text("")  # an interrupted earlier creation: no marker
    assert not A.venv_ok(d, "x")
    logs: list[str] = []
    bogus = (["--no-index", "--find-links", str(tmp_path), "aiperf==0.0.0"], "digest-of-nothing")
    with pytest.raises(A.AiperfError) as e:
        A.ensure_venv(d, install=bogus, log=logs.append, heartbeat_s=5)
    assert "pip install failed" in str(e.value) and "aiperf==0.0.0" in str(e.value)
    assert any("incomplete" in x for x in logs) and any("creating" in x for x in logs)
    assert not d.exists()  # nothing half-created left for the next run
    (d).mkdir()
    (d / A.MARKER).write_text(json.dumps({"aiperf": "0.0.1", "requirements_sha256": "digest-of-nothing"}))
    assert not A.venv_ok(d, "digest-of-nothing")  # another version: recreated


def test_fresh_prompt_keeps_bytes_and_changes_the_first_block():
    for p in ("hello world", "#tag", "élan vital", "x"):
        q = A.fresh_prompt(p)
        assert q != p and len(q.encode()) == len(p.encode()) and q.endswith(p[1:]) and q[0] != p[0]


@pytest.mark.parametrize("args, needle", [
    (["--concurrency", "0"], "--concurrency"),
    (["--concurrency", "1,x"], "--concurrency"),
    (["--requests", "0"], "--requests"),
    (["--graphs", "agg,foo"], "--graphs"),
    (["--url", "http://127.0.0.1:8000"], "--tokenizer"),
    (["--url", "localhost:8000", "--tokenizer", "/tmp"], "--url"),
    (["--graph", "graphs/agg.py"], "-f CONFIG"),
    (["--tokenizer", "/tmp"], "--tokenizer"),
    (["--aiperf-connections", "sometimes"], "--aiperf-connections"),
])
def test_bad_arguments_name_the_option(args, needle, capsys):
    with pytest.raises(SystemExit):
        A.parse_args(args)
    assert needle in capsys.readouterr().err


def test_aiperf_argv_synthetic_and_trace(tmp_path):
    base = dict(url="http://127.0.0.1:1", model="m", tokenizer=tmp_path, concurrency=3, requests=5,
                artifact_dir=tmp_path / "a", seed=7, timeout=30)
    argv = A.aiperf_argv("py", **base, isl=100, isl_stddev=5, osl=20)
    assert argv[:4] == ["py", "-m", "aiperf", "profile"]
    flags = dict(zip(argv, argv[1:]))
    assert flags["--concurrency"] == "3" and flags["--request-count"] == "5" and flags["--isl"] == "100"
    assert flags["--num-dataset-entries"] == "5" and flags["--connection-reuse-strategy"] == "never"
    assert "--streaming" in argv and "--use-server-token-count" in argv and "--input-file" not in argv
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"input_length": 300, "output_length": 40}\n{"text_input": "hello", "output_length": 4}\n')
    assert A.trace_lengths(str(trace)) == (300, 40)
    targv = A.aiperf_argv("py", **base, trace=str(trace), extra=["--foo"])
    assert "--isl" not in targv and targv[-1] == "--foo" and dict(zip(targv, targv[1:]))["--input-file"] == str(trace)
    assert "HF_HUB_OFFLINE" not in A.aiperf_env()


def test_results_table_client_column():
    from dynamo_ext.bench.serve import results_table

    row = {"graph": "agg", "client": "aiperf", "prompt_tokens_mean": 10, "load": "c=1", "completed": 1,
           "requests": 1, "ttft_p50_ms": 1.0, "ttft_p99_ms": 2.0, "tpot_p50_ms": 0.5, "tpot_p99_ms": 0.6,
           "output_tok_s": 3.0, "req_s": 1.0}
    with_client, plain = results_table([row], client=True), results_table([row])
    assert with_client[2].startswith("| agg | aiperf | 10 | c=1 | 1/1 |") and plain[2].startswith("| agg | 10 | c=1 |")
    assert with_client[0].count("|") == plain[0].count("|") + 1 == with_client[2].count("|")

