"""Shared fixtures of the engine tests: the tiny preset's weights, built once per session (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

from dynamo_ext.engine.core import EngineConfig, LlmEngine
from dynamo_ext.engine.weights import LoadedModel, load_model


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    torch.set_num_threads(1)  # the test machine is shared; tiny shapes gain nothing from threads


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    return load_model("tiny", seed=7)


@pytest.fixture
def make_engine(tiny):
    def make(num_blocks: int = 64, block_size: int = 4, order: str = "layer_major", **kw) -> LlmEngine:
        return LlmEngine(tiny, EngineConfig(num_blocks=num_blocks, block_size=block_size, kv_order=order, **kw))

    return make


def _prompt(seed: int, n: int, vocab: int = 256) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [256] + torch.randint(0, vocab, (n - 1,), generator=g).tolist()


@pytest.fixture(scope="session")
def prompt():
    """prompt(seed, n) -> n token ids: BOS then random bytes."""
    return _prompt
