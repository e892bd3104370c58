"""Llama-style decoder over packed tokens; attention is a pluggable backend (paged pool or dense).

    LlamaModel(cfg, weights: {HF name: tensor}, device)
      forward(input_ids [T], positions [T], attn: AttentionBackend, logit_rows [R]) -> logits [R, vocab] fp32

    AttentionBackend.__call__(layer, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> [T, Hq, D]
      (RoPE already applied; the backend stores k/v wherever its cache lives and attends)

Tokens of all sequences of a step are packed along one axis, so every projection is one GEMM for the
whole batch (prefill and decode rows alike); only attention knows about sequences. Math follows
HF ``LlamaForCausalLM`` (RMSNorm in fp32, rotate-half RoPE with optional llama3 scaling, GQA,
SwiGLU), so HF checkpoints load by name: ``model.layers.N.self_attn.q_proj.weight`` etc.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import ModelConfig


# cuDNN attention builds a plan per shape; context lengths change every step, so it recompiles every
# step. Flash / memory-efficient kernels (math as the fallback) have no such cost.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class AttentionBackend(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2, "uint8": torch.uint8}[name]


def weight_names(cfg: ModelConfig) -> list[str]:
    names = ["model.embed_tokens.weight"]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{n}_proj.weight" for n in ("q", "k", "v", "o")]
        names += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
    names.append("model.norm.weight")
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    for n in weight_names(cfg):
        if n.endswith("embed_tokens.weight") or n == "lm_head.weight":
            shapes[n] = (cfg.vocab_size, h)
        elif n.endswith("layernorm.weight") or n == "model.norm.weight":
            shapes[n] = (h,)
        elif n.endswith("q_proj.weight"):
            shapes[n] = (cfg.num_heads * d, h)
        elif n.endswith(("k_proj.weight", "v_proj.weight")):
            shapes[n] = (cfg.num_kv_heads * d, h)
        elif n.endswith("o_proj.weight"):
            shapes[n] = (h, cfg.num_heads * d)
        elif n.endswith(("gate_proj.weight", "up_proj.weight")):
            shapes[n] = (i, h)
        elif n.endswith("down_proj.weight"):
            shapes[n] = (h, i)
    return shapes


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type") or rs.get("type")
    if kind in (None, "default"):
        pass
    elif kind == "llama3":  # HF _compute_llama3_parameters
        factor, lo, hi = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old = rs["original_max_position_embeddings"]
        low_wl, high_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        scaled = torch.where(wl > low_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wl >= high_wl) & (wl <= low_wl)
        inv = torch.where(medium, smoothed, scaled)
    elif kind == "linear":
        inv = inv / rs["factor"]
    else:
        raise ValueError(f"rope_scaling type {kind!r} is not supported")
    return inv.float()


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None):
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype or torch_dtype(cfg.dtype)
        missing = [n for n in weight_names(cfg) if n not in weights]
        if missing:
            raise ValueError(f"missing weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        shapes = weight_shapes(cfg)
        for n, s in shapes.items():
            if tuple(weights[n].shape) != s:
                raise ValueError(f"weight {n} has shape {tuple(weights[n].shape)}, config says {s}")

        def w(name: str) -> torch.Tensor:
            return weights[name].to(device=self.device, dtype=self.dtype)

        self.embed = w("model.embed_tokens.weight")
        self.norm = w("model.norm.weight")
        self.lm_head = self.embed if cfg.tie_word_embeddings else w("lm_head.weight")
        self.layers: list[dict[str, torch.Tensor]] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            self.layers.append({
                "ln1": w(p + "input_layernorm.weight"),
                "ln2": w(p + "post_attention_layernorm.weight"),
                # fused: one GEMM for q|k|v and one for gate|up
                "qkv": torch.cat([w(p + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")]),
                "o": w(p + "self_attn.o_proj.weight"),
                "gate_up": torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")]),
                "down": w(p + "mlp.down_proj.weight"),
            })
        self.inv_freq = rope_inv_freq(cfg).to(self.device)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None, :], emb.sin().to(self.dtype)[:, None, :]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        t = input_ids.shape[0]
        cos, sin = self.rope(positions)
        x = self.embed[input_ids]
        with sdpa_kernel(SDPA_BACKENDS):
            x = self._layers(x, t, cos, sin, attn)
        if logit_rows is not None:
            x = x[logit_rows]
        x = rms_norm(x, self.norm, cfg.rms_norm_eps)
        return F.linear(x, self.lm_head).float()

    def _layers(self, x: torch.Tensor, t: int, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionBackend) -> torch.Tensor:
        cfg = self.cfg
        hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        for li, L in enumerate(self.layers):
            h = rms_norm(x, L["ln1"], cfg.rms_norm_eps)
            qkv = F.linear(h, L["qkv"])
            q = qkv[:, : hq * d].view(t, hq, d)
            k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
            v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            o = attn(li, q, k, v.contiguous())
            x = x + F.linear(o.reshape(t, hq * d), L["o"])
            h = rms_norm(x, L["ln2"], cfg.rms_norm_eps)
            gu = F.linear(h, L["gate_up"])
            g, u = gu.chunk(2, dim=-1)
            x = x + F.linear(F.silu(g) * u, L["down"])
        return x
