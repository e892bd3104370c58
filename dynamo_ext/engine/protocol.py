"""The engine protocol: what a worker may ask of an engine, and the plain types that cross it.

    Engine (typing.Protocol)                 implemented by engine.core.LlmEngine; a vLLM/SGLang adapter
      kv_layout: KvLayout                    the pool's memory (what NIXL registers and moves)
      kv_buffer() -> torch.Tensor            the pool itself: one contiguous uint8 tensor of kv_layout.pool_bytes
      allocator: BlockAllocator              where block ids come from (the kv layer's pool plugs in here)
      add_request(Request)                   aggregated path: prefill + decode inside this engine
      step() -> list[RequestOutput]          one scheduler iteration (requests join and leave between steps)
      has_unfinished() -> bool
      abort(request_id)
      prefill_only(Request) -> PrefillResult disaggregated, prefill side: KV into pool blocks, blocks held
      add_prefilled_request(Request, block_ids, first_token)
                                             disaggregated, decode side: decode from KV already in the pool
      release(block_ids)                     drop the references that prefill_only handed out

    BlockAllocator (typing.Protocol)         allocate(n) -> ids | OutOfBlocks, free(ids), num_free
    Request / SamplingParams / RequestOutput / PrefillResult   plain dataclasses

Ownership of blocks: every block id an engine holds carries one allocator reference. A finished or
aborted request frees its references. ``Request.prefix_blocks`` (a prefix-cache hit: full blocks that
already hold the KV of the prompt's first ``len(prefix_blocks) * block_size`` tokens) and the
``block_ids`` of ``add_prefilled_request`` hand one reference each to the engine. ``prefill_only``
hands its references to the caller, who gives them back with ``release``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, Sequence, runtime_checkable

from dynamo_ext.transport.layout import KvLayout

if TYPE_CHECKING:  # torch is only needed by implementations
    import torch

FinishReason = Literal["stop", "length", "abort", "migrated"]


class OutOfBlocks(RuntimeError):
    """The allocator has fewer free blocks than asked for (nothing was allocated)."""


@runtime_checkable
class BlockAllocator(Protocol):
    """Hands out block ids of one pool; each id carries a reference count (1 after ``allocate``)."""

    @property
    def num_blocks(self) -> int: ...

    @property
    def num_free(self) -> int: ...

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh block ids with one reference each, or raise OutOfBlocks."""
        ...

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference of each id; an id whose count reaches zero becomes free."""
        ...


#: the most top-logprob entries a request may ask for per token (OpenAI's chat ``top_logprobs`` limit)
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """temperature <= 0 means greedy. Sampling of output token i uses a generator seeded from
    (seed, i), so a request's tokens do not depend on its batch, on preemption, or on which engine
    (prefill or decode) sampled them.

    Logits processing, in this order (engine.sampling): repetition_penalty over prompt + output tokens
    (vLLM/HF: positive logits divided, negative multiplied), frequency_penalty x count and presence_penalty
    over the output tokens (OpenAI), stop ids masked while fewer than ``min_tokens`` were produced. Log
    probabilities (``logprobs`` = k: the chosen token's and the k most likely) are of these processed
    logits, before temperature and the top_k / min_p / top_p filters. Then greedy (argmax) or sampling
    from softmax(logits / temperature) restricted by top_k, min_p, top_p."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # stop ids cannot be produced before this many output tokens
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log probability and the top k

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or >= 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def plain(self) -> bool:
        """No logits processing and no log probabilities: the sampler's fast path."""
        return (self.top_k <= 0 and self.min_p == 0.0 and self.presence_penalty == 0.0
                and self.frequency_penalty == 0.0 and self.repetition_penalty == 1.0 and self.min_tokens == 0
                and self.logprobs is None)


#: one sampled token's log probability and the top k (token id, log probability), most likely first
TokenLogprobs = tuple[float, list[tuple[int, float]]]


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # prefix-cache hit: full blocks holding the KV of the first len(prefix_blocks)*block_size tokens
    prefix_blocks: list[int] = field(default_factory=list)
    # a stream continued after a migration: the last ``num_earlier_output`` prompt tokens are this request's
    # output from before it moved; they count as output for the penalties and min_tokens, and the seeded draw
    # of the next token uses their count as its step, so the stream goes on exactly as it would have
    num_earlier_output: int = 0


@dataclass
class RequestOutput:
    """Tokens produced by one step for one request (Dynamo's ``{"token_ids": [...]}`` chunk)."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    #: one entry per new token when the request asked for log probabilities (SamplingParams.logprobs)
    logprobs: list[TokenLogprobs] | None = None


@dataclass(frozen=True)
class DetachedRequest:
    """A running request taken out of the engine with its KV kept (migration): ``blocks`` hold the KV of
    ``tokens[:num_computed]`` (one reference each, handed to the caller); ``tokens`` = prompt + output.

    To continue it elsewhere: copy the blocks' KV, then ``add_prefilled_request(Request(id,
    tokens[:-1], sampling with max_tokens - len(output) + 1), blocks, first_token=tokens[-1])`` — the
    new engine computes the KV of the last token and samples the next one, exactly as the old one would
    have; with ``num_earlier_output`` = the output tokens inside that prompt, also seeded sampling and the
    penalties go on exactly)."""

    request_id: str
    tokens: list[int]
    num_prompt: int
    output: list[int]
    blocks: list[int]
    num_computed: int
    sampling: SamplingParams


@dataclass(frozen=True)
class PrefillResult:
    first_token: int
    block_ids: list[int]  # hold the KV of all prompt tokens, in order; caller owns one reference each
    num_tokens: int  # prompt tokens whose KV is in block_ids
    first_logprobs: TokenLogprobs | None = None  # when the request asked for log probabilities


@runtime_checkable
class Engine(Protocol):
    @property
    def kv_layout(self) -> KvLayout: ...

    @property
    def allocator(self) -> BlockAllocator: ...

    def kv_buffer(self) -> "torch.Tensor": ...

    def add_request(self, request: Request) -> None: ...

    def step(self) -> list[RequestOutput]: ...

    def has_unfinished(self) -> bool: ...

    def abort(self, request_id: str) -> None: ...

    def prefill_only(self, request: Request) -> PrefillResult: ...

    def add_prefilled_request(self, request: Request, block_ids: Sequence[int], first_token: int) -> None: ...

    def release(self, block_ids: Sequence[int]) -> None: ...

    def detach(self, request_id: str) -> DetachedRequest | None: ...
