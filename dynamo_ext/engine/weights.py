"""Weights and model directories.

    random_weights(cfg, seed, device="cpu") -> {HF name: tensor}   deterministic per (seed, name, device type)
    init_model_dir(dir, preset, seed, num_layers, dtype, device)   writes a directory Dynamo's frontend loads
                                                                   (streamed; on CPU the same tensors)
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
import math
import os
import struct
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
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


def _seed_of(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _fill_random(name: str, shape: tuple[int, ...], seed: int, device: torch.device, dtype: torch.dtype,
                 scratch: torch.Tensor | None = None) -> torch.Tensor:
    """One weight of ``random_weights``. With ``scratch`` (a reused float32 CPU buffer of at least ``numel``
    elements: no fresh pages per tensor) on CPU, the float32 values are generated there and returned uncast:
    the caller casts them with ``copy_`` into its own buffer (the same rounding as ``.to(dtype)``)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    g = torch.Generator(device=device)
    g.manual_seed(_seed_of(seed, name))
    std = 1.0 if name.endswith("embed_tokens.weight") else shape[1] ** -0.5
    gen_dtype = torch.float32 if device.type == "cpu" else dtype
    if scratch is not None and device.type == "cpu":
        t = scratch[: math.prod(shape)].view(shape)
        torch.randn(shape, generator=g, dtype=gen_dtype, out=t)
        return t.mul_(std)
    t = torch.randn(shape, generator=g, dtype=gen_dtype, device=device)
    return t.mul_(std).to(dtype)


def random_weights(cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    device = torch.device(device)
    dtype = torch_dtype(cfg.dtype)
    return {name: _fill_random(name, shape, seed, device, dtype) for name, shape in weight_shapes(cfg).items()}


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


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def init_model_dir(path: str | Path, preset: str, seed: int = 0, num_layers: int | None = None,
                   dtype: str | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Write a preset's model directory with ``random_weights``' tensors, streamed: each tensor is generated
    (on ``device``; a CPU float32 scratch buffer is reused), written into ``model.safetensors`` and dropped, so
    memory stays at one tensor and no serialised copy of the whole file is built (llama3-8b-shape, 8 layers,
    bfloat16: 3.5 GB). On CPU the file holds exactly ``random_weights(cfg, seed)``; on CUDA the values come
    from CUDA's generator (also deterministic per (seed, name), but other numbers). The returned model has the
    config and tokenizer, not the weights (load the directory for those)."""
    device = torch.device(device)
    tok = TextTokenizer.byte_level()
    cfg = cfgmod.preset(preset, vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, num_layers=num_layers,
                        dtype=dtype)  # fmt: skip
    m = LoadedModel(cfg, tok, {})
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps(generation_config(cfg), indent=2) + "\n")
    tok.save(path)
    tdtype = torch_dtype(cfg.dtype)
    if tdtype not in _ST_DTYPES:
        raise ValueError(f"dtype {cfg.dtype!r}: model directories are written in {sorted(_ST_DTYPES.values())}")
    shapes = weight_shapes(cfg)
    esize = torch.empty((), dtype=tdtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in shapes.items():
        n = math.prod(shape) * esize
        header[name] = {"dtype": _ST_DTYPES[tdtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    biggest = max(math.prod(s) for s in shapes.values())
    # tensors are generated by `workers` threads (torch releases the GIL; one generator per tensor, so the
    # values do not depend on the threads) while this thread writes them in order; each in-flight tensor owns
    # one buffer set (float32 scratch + the cast copy), so memory stays at (workers + 1) x the largest tensor
    workers = max(1, min(4, (os.cpu_count() or 1) // 2)) if device.type == "cpu" else 1
    free = [(torch.empty(biggest, dtype=torch.float32) if device.type == "cpu" else None,
             torch.empty(biggest, dtype=tdtype)) for _ in range(workers + 1)]  # fmt: skip

    def make(name: str, shape: tuple[int, ...], bufs: tuple) -> tuple[torch.Tensor, tuple]:
        scratch, staging = bufs
        t = _fill_random(name, shape, seed, device, tdtype, scratch)
        out = staging[: t.numel()]
        out.copy_(t.reshape(-1))
        return out, bufs

    todo = list(shapes.items())
    pending: deque = deque()
    with open(path / "model.safetensors", "wb") as f, ThreadPoolExecutor(workers) as ex:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        while todo or pending:
            while todo and free:
                name, shape = todo.pop(0)
                pending.append(ex.submit(make, name, shape, free.pop()))
            out, bufs = pending.popleft().result()
            f.write(out.view(torch.uint8).numpy().data)
            free.append(bufs)
    m.path = path
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
