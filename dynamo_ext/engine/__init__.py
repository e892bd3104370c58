"""dynamo_ext.engine — reference paged-KV engine behind a small protocol (see README.md in this folder).

    protocol.py   Engine / BlockAllocator protocols; Request, SamplingParams, RequestOutput, PrefillResult
    core.py       LlmEngine (continuous batching over the paged pool), EngineConfig
    model.py      LlamaModel: RMSNorm, RoPE, GQA, SwiGLU over packed tokens; attention is a backend
    attention.py  PagedAttention (block tables over the pool) and dense references
    kv_pool.py    PagedKvPool (exactly transport.layout.KvLayout's memory), FreeListAllocator
    sampling.py   greedy / temperature / top-p, seeded per (request seed, token index)
    config.py     ModelConfig, presets tiny | llama3-8b-shape | llama3-70b-shape, HF config.json
    tokenizer.py  deterministic byte-level BPE tokenizer.json, TextTokenizer
    weights.py    random weights from a seed, safetensors model directories (init / load)

Importing this package imports torch lazily only through the submodules; nothing of Dynamo.
"""

from __future__ import annotations

from .protocol import (  # noqa: F401  (torch-free)
    BlockAllocator,
    Engine,
    OutOfBlocks,
    PrefillResult,
    Request,
    RequestOutput,
    SamplingParams,
)

__all__ = ["BlockAllocator", "Engine", "OutOfBlocks", "PrefillResult", "Request", "RequestOutput", "SamplingParams"]
