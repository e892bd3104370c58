"""Model directories: `model init` writes what Dynamo's frontend needs; load_model reads it back
bit-identically; HF transformers computes the same logits; `dynamo-ext generate --json` works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynamo_ext.cli import main as cli_main
from dynamo_ext.engine.attention import DenseCausalAttention
from dynamo_ext.engine.config import ModelConfig
from dynamo_ext.engine.model import LlamaModel
from dynamo_ext.engine.tokenizer import TextTokenizer, build_byte_tokenizer
from dynamo_ext.engine.weights import load_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("m") / "tiny"
    assert cli_main(["model", "init", "--preset", "tiny", str(d), "--seed", "7"]) == 0
    return d


def test_directory_has_what_the_frontend_needs(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "model.safetensors"} <= names
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    for k in ("vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert cfg[k] is not None
    tc = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tc["chat_template"] and tc["tokenizer_class"] and tc["bos_token"] and tc["eos_token"]
    tok = TextTokenizer.from_dir(model_dir)
    assert cfg["vocab_size"] == tok.vocab_size == 259
    assert (tok.bos_token_id, tok.eos_token_id) == (cfg["bos_token_id"], cfg["eos_token_id"])
    text = "Disaggregated serving, ünïcode 日本語 and\nnewlines"
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_json_is_deterministic(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    build_byte_tokenizer().save(str(a))
    build_byte_tokenizer().save(str(b))
    assert a.read_bytes() == b.read_bytes()


def test_round_trip_bit_identical(model_dir, tiny):
    m = load_model(model_dir)
    assert m.config == tiny.config  # the session fixture is the same preset and seed, in memory
    assert set(m.weights) == set(tiny.weights)
    for k, v in tiny.weights.items():
        assert m.weights[k].dtype == v.dtype and torch.equal(m.weights[k], v), k
    assert ModelConfig.from_hf(m.config.to_hf()) == m.config


def test_hf_transformers_computes_the_same_logits(model_dir, tiny):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = TextTokenizer.from_dir(model_dir).encode("The quick brown fox jumps over the lazy dog")
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = LlamaModel(tiny.config, tiny.weights).forward(torch.tensor(ids), torch.arange(len(ids)), DenseCausalAttention())
    assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (ours - ref).abs().max()


@pytest.mark.parametrize("variant", ["llama3-rope-scaling", "tied-embeddings"])
def test_hf_variants_load_and_match(tmp_path, tiny, variant):
    """Checkpoint features of real Llama 3.x directories: llama3 RoPE scaling, tied embeddings."""
    transformers = pytest.importorskip("transformers")
    from dataclasses import replace

    from dynamo_ext.engine.weights import LoadedModel, save_model_dir

    if variant == "llama3-rope-scaling":
        cfg = replace(tiny.config, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
        weights = dict(tiny.weights)
    else:
        cfg = replace(tiny.config, tie_word_embeddings=True)
        weights = {k: v for k, v in tiny.weights.items() if k != "lm_head.weight"}
    save_model_dir(LoadedModel(cfg, tiny.tokenizer, weights), tmp_path)
    m = load_model(tmp_path)
    assert m.config == cfg
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = list(range(1, 200, 3))  # 67 positions: past original_max_position_embeddings
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = LlamaModel(m.config, m.weights).forward(torch.tensor(ids), torch.arange(len(ids)), DenseCausalAttention())
    assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (ours - ref).abs().max()


def test_cli_generate_json(model_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dynamo_ext.cli", "generate", "--model", str(model_dir), "--prompt", "Hello",
           "--prompt", "A longer second prompt", "--max-tokens", "6", "--ignore-eos", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [o["prompt"] for o in out] == ["Hello", "A longer second prompt"]
    assert all(len(o["token_ids"]) == 6 and isinstance(o["text"], str) for o in out)
    # the same tokens as the library, and a preset name gives the same model as its directory
    m = load_model(model_dir)
    from dynamo_ext.engine.core import EngineConfig, LlmEngine
    from dynamo_ext.engine.protocol import SamplingParams

    eng = LlmEngine(m, EngineConfig(num_blocks=16))
    lib = eng.generate([m.tokenizer.encode("Hello")], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert out[0]["token_ids"] == lib
    r2 = subprocess.run(cmd[:5] + ["tiny", "--seed", "7"] + cmd[6:], capture_output=True, text=True, timeout=120, env=env)
    assert r2.returncode == 0 and json.loads(r2.stdout) == out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["model", "init", "--preset", "nope", str(tmp_path / "x")]) == 2
    assert cli_main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset" in err and "neither a model directory nor a preset" in err


@pytest.mark.parametrize("dtype,layers", [("bfloat16", 3), ("float16", 1)])
def test_init_model_dir_streams_random_weights(tmp_path, dtype, layers):
    """init_model_dir writes the file tensor by tensor (threads, reused buffers): the same tensors, in the
    file's dtype, as random_weights of the same preset, seed and layers (what a model held in memory gets)."""
    from safetensors.torch import load_file

    from dynamo_ext.engine.weights import init_model_dir, preset_model

    m = init_model_dir(tmp_path / "m", "tiny", seed=5, num_layers=layers, dtype=dtype)
    assert m.config.num_layers == layers and m.config.dtype == dtype
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    want = preset_model("tiny", seed=5, num_layers=layers, dtype=dtype).weights
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
