"""Model shapes: ``ModelConfig``, the named presets, and HF ``config.json`` in both directions.

    preset(name, vocab_size, num_layers=None) -> ModelConfig     tiny | llama3-8b-shape | llama3-70b-shape
    ModelConfig.to_hf() -> dict / ModelConfig.from_hf(dict)      Llama-style config.json (model_type llama)

The 8B/70B presets carry the real per-layer shapes of Llama 3 (hidden, heads, KV heads, head dim,
intermediate size); the layer count is a parameter so that a few layers fit one GPU, and the
vocabulary is the tokenizer's (random weights, byte-level tokenizer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

TORCH_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int | None = None
    dtype: str = "float32"
    extra_eos_token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not in {TORCH_DTYPES}")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even (RoPE)")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id, *self.extra_eos_token_ids)

    @property
    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h

    def to_hf(self) -> dict[str, Any]:
        eos: int | list[int] = [self.eos_token_id, *self.extra_eos_token_ids] if self.extra_eos_token_ids else self.eos_token_id
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.dtype,
        }

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        arch = d.get("architectures") or ["LlamaForCausalLM"]
        if d.get("model_type", "llama") not in ("llama", "mistral") and "LlamaForCausalLM" not in arch:
            raise ValueError(f"not a Llama-style config: model_type={d.get('model_type')!r} architectures={arch}")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ValueError("attention/mlp biases are not supported")
        heads = int(d["num_attention_heads"])
        eos = d.get("eos_token_id", 1)
        eos_list = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            rope_scaling=d.get("rope_scaling"),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=int(d.get("bos_token_id") if d.get("bos_token_id") is not None else 0),
            eos_token_id=int(eos_list[0]),
            extra_eos_token_ids=tuple(int(x) for x in eos_list[1:]),
            pad_token_id=d.get("pad_token_id"),
            dtype=str(dtype),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SHAPES: dict[str, dict[str, Any]] = {
    # fast on 2 CPU cores; head_dim 16 / 2 KV heads = transport.layout's "tiny" preset
    "tiny": dict(hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 rope_theta=10000.0, max_position_embeddings=2048, dtype="float32"),
    "llama3-8b-shape": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                            head_dim=128, rope_theta=500000.0, max_position_embeddings=8192, dtype="bfloat16"),
    "llama3-70b-shape": dict(hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8,
                             head_dim=128, rope_theta=500000.0, max_position_embeddings=8192, dtype="bfloat16"),
}
PRESETS = tuple(_SHAPES)


def preset(name: str, *, vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int | None = None,
           num_layers: int | None = None, dtype: str | None = None) -> ModelConfig:
    if name not in _SHAPES:
        raise ValueError(f"unknown model preset {name!r}; allowed: {list(_SHAPES)}")
    cfg = ModelConfig(vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                      pad_token_id=pad_token_id, **_SHAPES[name])
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        cfg = replace(cfg, num_layers=num_layers)
    if dtype is not None:
        cfg = replace(cfg, dtype=dtype)
    return cfg
