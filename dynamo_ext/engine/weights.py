"""Weights and model directories.

    random_weights(cfg, seed, device="cpu") -> {HF name: tensor}   deterministic per (seed, name, device type)
    init_model_dir(dir, preset, seed, num_layers) -> LoadedModel    writes a directory Dynamo's frontend loads
    load_model(dir | preset name, device, seed) -> LoadedModel      config + tokenizer + weights
    LoadedModel(config, tokenizer, weights, path)

A model directory holds ``config.json`` (Llama-style), ``tokenizer.json``, ``tokenizer_config.json``
(chat_template, bos/eos/pad, tokenizer_class), ``generation_config.json`` and ``model.safetensors``
(or the shards of an HF checkpoint: every ``*.safetensors`` file is read). Names are HF's
(``model.layers.N.self_attn.q_proj.weight``...). A directory without ``tokenizer.json`` gets the
built-in byte-level tokenizer.

Random init: N(0, 1/fan_in) for projections (so logits of a tiny model are decisive, not flat),
N(0, 1) embeddings, ones for norms. Each tensor has its own generator seeded from (seed, name), so a
subset of layers is the same tensors as the full model's first layers.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import config as cfgmod
from .config import ModelConfig
from .model import torch_dtype, weight_names, weight_shapes
from .tokenizer import TextTokenizer


@dataclass
class LoadedModel:
    config: ModelConfig
    tokenizer: TextTokenizer
    weights: dict[str, torch.Tensor]
    path: Path | None = None


def random_weights(cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    device = torch.device(device)
    dtype = torch_dtype(cfg.dtype)
    out: dict[str, torch.Tensor] = {}
    for name, shape in weight_shapes(cfg).items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape, dtype=dtype, device=device)
            continue
        g = torch.Generator(device=device)
        g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        std = 1.0 if name.endswith("embed_tokens.weight") else shape[1] ** -0.5
        gen_dtype = torch.float32 if device.type == "cpu" else dtype
        t = torch.randn(shape, generator=g, dtype=gen_dtype, device=device)
        out[name] = t.mul_(std).to(dtype)
    return out


def generation_config(cfg: ModelConfig) -> dict:
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids) if cfg.extra_eos_token_ids else cfg.eos_token_id,
            "pad_token_id": cfg.pad_token_id, "do_sample": False, "max_new_tokens": 256}


def preset_model(name: str, seed: int = 0, num_layers: int | None = None, device: str | torch.device = "cpu",
                 dtype: str | None = None) -> LoadedModel:
    tok = TextTokenizer.byte_level()
    cfg = cfgmod.preset(name, vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, num_layers=num_layers, dtype=dtype)
    return LoadedModel(cfg, tok, random_weights(cfg, seed, device))


def save_model_dir(m: LoadedModel, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(m.config.to_hf(), indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps(generation_config(m.config), indent=2) + "\n")
    m.tokenizer.save(path)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in m.weights.items()}
    save_file(cpu, str(path / "model.safetensors"), metadata={"format": "pt"})
    m.path = path
    return path


def init_model_dir(path: str | Path, preset: str, seed: int = 0, num_layers: int | None = None,
                   dtype: str | None = None) -> LoadedModel:
    m = preset_model(preset, seed=seed, num_layers=num_layers, dtype=dtype)
    save_model_dir(m, path)
    return m


def load_model(path_or_preset: str | Path, device: str | torch.device = "cpu", seed: int = 0,
               num_layers: int | None = None, dtype: str | None = None) -> LoadedModel:
    """A model directory, or a preset name (random weights from ``seed``, built on ``device``)."""
    p = Path(path_or_preset)
    if not p.is_dir():
        if str(path_or_preset) in cfgmod.PRESETS:
            return preset_model(str(path_or_preset), seed=seed, num_layers=num_layers, device=device, dtype=dtype)
        raise FileNotFoundError(f"{path_or_preset}: neither a model directory nor a preset {list(cfgmod.PRESETS)}")
    from safetensors import safe_open

    cfg = ModelConfig.from_hf(json.loads((p / "config.json").read_text()))
    if (p / "tokenizer.json").exists():
        tok = TextTokenizer.from_dir(p, cfg.bos_token_id, cfg.eos_token_id)
    else:
        tok = TextTokenizer.byte_level()
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{p}: tokenizer has {tok.vocab_size} tokens, model vocab_size is {cfg.vocab_size}")
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{p}: no *.safetensors files")
    wanted = set(weight_names(cfg if num_layers is None else replace(cfg, num_layers=num_layers)))
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device=str(device)) as sf:
            for k in sf.keys():
                if k in wanted:
                    weights[k] = sf.get_tensor(k)
    if num_layers is not None:
        cfg = replace(cfg, num_layers=num_layers)
    if dtype is not None:
        cfg = replace(cfg, dtype=dtype)
        weights = {k: v.to(torch_dtype(dtype)) for k, v in weights.items()}
    if cfg.tie_word_embeddings is False and "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights:
        cfg = replace(cfg, tie_word_embeddings=True)  # some checkpoints tie without saying so
    return LoadedModel(cfg, tok, weights, p)
