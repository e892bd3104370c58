"""What the model card tells Dynamo's frontend about the served model (``register_model(runtime_config=...)``).

``context_length``: the longest sequence every worker of the graph accepts (``model.max_model_len``, capped by
the model's ``max_position_embeddings``). With it in the card the frontend refuses a longer prompt itself,
with HTTP 400, before its tokens travel to the router and the workers. ``max_num_seqs`` /
``max_num_batched_tokens`` / ``total_kv_blocks`` describe the engine for Dynamo's planner and router.

``to_frontend`` turns the serving core's "invalid request" error chunk into the exception Dynamo's frontend
answers with HTTP 400 (measured with 1.6.1: a context-length check in the card alone does not make the
frontend refuse a long prompt; it forwards it and an error chunk comes back as a 500).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def context_length(cfg: Any, model_dir: str) -> int:
    mc = json.loads((Path(model_dir) / "config.json").read_text())
    return min(int(cfg.model.max_model_len), int(mc.get("max_position_embeddings") or cfg.model.max_model_len))


def runtime_config(cfg: Any, model_dir: str, *, total_kv_blocks: int | None = None) -> Any:
    from dynamo.llm import ModelRuntimeConfig  # noqa: PLC0415

    rc = ModelRuntimeConfig()
    rc.context_length = context_length(cfg, model_dir)
    if total_kv_blocks is not None:
        rc.total_kv_blocks = int(total_kv_blocks)
    return rc


async def to_frontend(chunks: Any) -> Any:
    """A stream for Dynamo's frontend: a first chunk that says the request itself is invalid
    (``serving.error_chunk(invalid=True)``) becomes ``dynamo.llm.exceptions.InvalidArgument``, which the
    frontend answers with HTTP 400 and the message (an error chunk would be a 500)."""
    from dynamo_ext.serving import is_invalid  # noqa: PLC0415

    first = True
    async for chunk in chunks:
        if first and is_invalid(chunk):
            from dynamo.llm.exceptions import InvalidArgument  # noqa: PLC0415

            raise InvalidArgument(str(chunk.get("error") or "invalid request"))
        first = False
        yield chunk
