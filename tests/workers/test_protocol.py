"""Unit tests of the wire protocol and the process interface's argument errors (no servers)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dynamo_ext.serving.protocol import BadRequest, KvHandle, error_chunk, handle_of, parse_request

H = KvHandle(handle_id="h1", worker_id=7, component="prefill", agent="prefill-7", pool="kv-prefill",
             block_ids=[3, 4], num_tokens=20, first_token=42,
             layout={"num_layers": 2, "block_size": 16}, deadline=1.5)


def test_handle_round_trips_both_ways():
    d = H.to_dict()
    assert KvHandle.from_dict(d) == H
    assert handle_of({"kv_handle": d}) == H
    assert handle_of({"prefill_result": {"disaggregated_params": {"kv_handle": d}}}) == H
    assert handle_of({"token_ids": [1]}) is None
    with pytest.raises(BadRequest):
        handle_of({"kv_handle": {**d, "block_ids": "x"}})
    with pytest.raises(BadRequest):
        handle_of({"kv_handle": {**d, "extra": 1}})


@pytest.mark.parametrize("req,field", [
    ({"token_ids": []}, "empty prompt"),
    ({"token_ids": "abc"}, "empty prompt"),
    ({"token_ids": [1, 300]}, "token_ids"),
    ({"token_ids": [1] * 100}, "context"),
    ({"token_ids": [1], "stop_conditions": {"max_tokens": 0}}, "max_tokens"),
    ({"token_ids": [1], "stop_conditions": {"max_tokens": 2**21}}, "max_tokens"),
    ({"token_ids": [1], "sampling_options": {"temperature": -1}}, "temperature"),
    ({"token_ids": [1], "sampling_options": {"top_p": 0}}, "top_p"),
    ([1, 2], "map"),
])
def test_bad_requests_name_the_field(req, field):
    with pytest.raises(BadRequest, match=field):
        parse_request(req, "r", vocab_size=259, max_model_len=64)


def test_good_request_and_clamping():
    r = parse_request({"token_ids": [1, 2, 3], "stop_conditions": {"max_tokens": 1000, "ignore_eos": True},
                       "sampling_options": {"temperature": 0.5, "seed": 3}}, "r", vocab_size=259, max_model_len=64)
    assert r.sampling.max_tokens == 61 and r.sampling.ignore_eos and r.sampling.seed == 3
    c = error_chunk("boom", 3)
    assert c["finish_reason"] == "error: boom" and c["token_ids"] == []


def test_process_interface_argument_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers: {agg: {count: 1}}\nrouter: {policy: nope}\n")
    r = subprocess.run([sys.executable, "-m", "dynamo_ext.workers", "--role", "agg", "--config", str(bad),
                        "--model-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "router.policy" in r.stderr and r.stdout == ""
    good = tmp_path / "good.yaml"
    good.write_text("workers: {agg: {count: 1}}\n")
    r = subprocess.run([sys.executable, "-m", "dynamo_ext.workers", "--role", "agg", "--config", str(good),
                        "--model-dir", str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a directory" in r.stderr
