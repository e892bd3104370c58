"""`dynamo-ext bench engine --compare-transformers` on tiny shapes (seconds): the engine and transformers'
`generate` on the same model directory, rounds with medians and same-round ratios, the machine's limits, the
result files; and the argument errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")


def bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dynamo_ext.cli", "bench", "engine", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model") / "tiny"
    subprocess.run([sys.executable, "-m", "dynamo_ext.cli", "model", "init", "--preset", "tiny", str(d)], check=True,
                   stdout=subprocess.DEVNULL)
    return d


def test_compare_transformers_tiny(tiny_dir, tmp_path):
    r = bench("--model", str(tiny_dir), "--compare-transformers", "--threads", "1", "--batches", "1,2",
              "--prefill-batches", "1", "--prompt-len", "16", "--decode-len", "8", "--steps", "3", "--warmup", "1",
              "--reps", "1", "--rounds", "2", "--out", str(tmp_path), "--tag", "smoke")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "smoke.json").read_text())
    assert res["params"]["rounds"] == 2 and res["params"]["decode_len"] == 8 and res["params"]["prompt_len"] == 16
    m = res["machine"]
    assert m["transformers"] and m["torch_threads"] == 1 and "load_avg_1m_end" in m
    lim, costs = res["limits"], res["costs"]
    assert lim["gemm_gflops"] > 0 and lim["read_gb_s"] > 0
    # tiny: 2 layers, hidden 64, vocab 259 (tokenizer-sized), untied head
    assert costs["flops_per_token"] == 2 * costs["matmul_params"] and costs["weight_bytes"] == 4 * costs["params"]
    for row in res["decode"]:
        assert len(row["rounds"]["paged_ms"]) == len(row["rounds"]["hf_ms"]) == 2
        assert row["paged_ms"] > 0 and row["hf_ms"] > 0 and row["limit_ms"] > 0
        same_round = sorted(h / p for h, p in zip(row["rounds"]["hf_ms"], row["rounds"]["paged_ms"]))
        assert row["hf_over_paged"] == pytest.approx(sum(same_round) / 2)  # median of 2 same-round ratios
        assert row["agree_hf"] == 1.0  # float32, same weights: the same greedy tokens as transformers
        assert row["agree"] == 1.0  # and as the dense reference
    (pre,) = res["prefill"]
    assert pre["paged_tok_s"] > 0 and pre["hf_tok_s"] > 0 and pre["limit_tok_s"] > 0
    md = (tmp_path / "smoke.md").read_text()
    assert md.index("## Limits") < md.index("## Measured") and "transformers / paged" in md
    assert (tmp_path / "smoke.png").stat().st_size > 1000


def test_argument_errors(tiny_dir, tmp_path):
    r = bench("--compare-transformers", "--out", str(tmp_path), timeout=60)  # a random preset: no files to share
    assert r.returncode == 2 and "--compare-transformers needs --model" in r.stderr
    r = bench("--model", str(tiny_dir), "--compare-transformers", "--layers", "1", "--out", str(tmp_path), timeout=60)
    assert r.returncode == 2 and "no --layers" in r.stderr
    r = bench("--model", "nope", "--out", str(tmp_path), timeout=60)
    assert r.returncode == 2 and "--model 'nope': neither a model directory nor an imported preset" in r.stderr
    r = bench("--batches", "1,x", "--out", str(tmp_path), timeout=60)
    assert r.returncode == 2 and "--batches" in r.stderr
    assert not list(tmp_path.iterdir())
