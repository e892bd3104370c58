"""``LlmEngine``: the reference implementation of ``protocol.Engine`` (continuous batching over the paged pool).

    LlmEngine(model: LoadedModel, config: EngineConfig, allocator: BlockAllocator | None = None)
      add_request / step / has_unfinished / abort            aggregated serving
      prefill_only / add_prefilled_request / release         disaggregated serving (KV moved by the caller)
      generate(prompts, sampling) -> list[list[int]]         convenience: run until all finish
      kv_layout, kv_buffer(), allocator, pool, model

One ``step()``:
  1. running sequences (one new token each) get a block when their next position starts one; when
     the allocator is short, the most recently admitted running sequence is preempted (its blocks
     freed, it goes back to the head of the queue and is recomputed later: same tokens, because
     sampling is seeded per (seed, token index));
  2. waiting sequences are admitted in FIFO order while max_num_seqs, max_num_batched_tokens and
     free blocks allow (a prefix-cache hit only computes the suffix);
  3. one forward over all their new tokens packed together (decode and prefill rows in one batch);
  4. one token sampled per sequence; finished sequences (EOS / stop id, max_tokens, max length) free
     their blocks and leave. Requests added between steps join at the next one.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch

from dynamo_ext.transport.layout import KvLayout, MemoryOrder

from .attention import PagedAttention, SeqSlice
from .kv_pool import FreeListAllocator, PagedKvPool
from .model import LlamaModel
from .protocol import (BlockAllocator, DetachedRequest, FinishReason, OutOfBlocks, PrefillResult, Request, RequestOutput,
                       SamplingParams)
from .sampling import RowContext, sample
from .weights import LoadedModel


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int = 256
    kv_order: str = "layer_major"
    kv_dtype: str | None = None  # default: the model's dtype
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    device: str = "cpu"
    seed: int = 0  # seeds of requests that bring none


@dataclass
class _Seq:
    req: Request
    tokens: list[int]
    num_prompt: int
    seed: int
    stop_ids: frozenset[int]
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    earlier: int = 0  # Request.num_earlier_output: output tokens inside the prompt (a migrated stream)

    @property
    def step(self) -> int:
        """The index of the next output token (its seeded draw's step)."""
        return self.earlier + len(self.output)

    @property
    def rid(self) -> str:
        return self.req.request_id


class LlmEngine:
    def __init__(self, model: LoadedModel, config: EngineConfig | None = None, allocator: BlockAllocator | None = None):
        self.config = config or EngineConfig()
        c = self.config
        self.model_config = model.config
        self.tokenizer = model.tokenizer
        self.model = LlamaModel(model.config, model.weights, device=c.device)
        mc = model.config
        self._layout = KvLayout(num_layers=mc.num_layers, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim,
                                block_size=c.block_size, dtype=c.kv_dtype or mc.dtype, num_blocks=c.num_blocks,
                                order=MemoryOrder(c.kv_order))
        self.pool = PagedKvPool(self._layout, device=c.device)
        self._allocator: BlockAllocator = allocator or FreeListAllocator(c.num_blocks)
        if self._allocator.num_blocks != c.num_blocks:
            raise ValueError(f"allocator has {self._allocator.num_blocks} blocks, pool {c.num_blocks}")
        self.waiting: deque[_Seq] = deque()
        self.running: list[_Seq] = []
        self._pending: list[RequestOutput] = []
        self._seed_rng = torch.Generator().manual_seed(c.seed)
        self._ids = itertools.count()

    # -- protocol: introspection ---------------------------------------------------------------
    @property
    def kv_layout(self) -> KvLayout:
        return self._layout

    @property
    def allocator(self) -> BlockAllocator:
        return self._allocator

    def kv_buffer(self) -> torch.Tensor:
        return self.pool.buffer

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._pending)

    # -- protocol: requests ----------------------------------------------------------------------
    def _new_seq(self, req: Request) -> _Seq:
        if not req.prompt_token_ids:
            raise ValueError(f"request {req.request_id}: empty prompt")
        n = len(req.prompt_token_ids)
        if n >= self.model_config.max_position_embeddings:
            raise ValueError(f"request {req.request_id}: prompt of {n} tokens >= max length "
                             f"{self.model_config.max_position_embeddings}")
        if -(-(n + 1) // self._layout.block_size) > self._layout.num_blocks:
            raise ValueError(f"request {req.request_id}: prompt needs more blocks than the pool has")
        bad = [t for t in req.prompt_token_ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(f"request {req.request_id}: token ids out of vocabulary: {bad[:5]}")
        p = req.sampling
        seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, (), generator=self._seed_rng))
        stop = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.model_config.eos_token_ids))
        if not 0 <= req.num_earlier_output < n:
            raise ValueError(f"request {req.request_id}: num_earlier_output {req.num_earlier_output} not in [0, {n})")
        seq = _Seq(req, list(req.prompt_token_ids), n, seed, frozenset(stop), earlier=req.num_earlier_output)
        if req.prefix_blocks:  # prefix-cache hit; keep full blocks only, and leave >= 1 token to compute
            usable = min(len(req.prefix_blocks), (n - 1) // self._layout.block_size)
            self._layout.validate_blocks(list(req.prefix_blocks), "prefix block")
            seq.blocks = list(req.prefix_blocks[:usable])
            self._allocator.free(req.prefix_blocks[usable:])
            seq.num_computed = usable * self._layout.block_size
        return seq

    def add_request(self, request: Request) -> None:
        self.waiting.append(self._new_seq(request))

    def abort(self, request_id: str) -> None:
        for q in (self.waiting, self.running):
            for s in list(q):
                if s.rid == request_id:
                    q.remove(s)
                    self._finish(s, "abort")

    def release(self, block_ids: Sequence[int]) -> None:
        self._allocator.free(list(block_ids))

    def detach(self, request_id: str) -> DetachedRequest | None:
        """Take a request out of the scheduler with its KV blocks kept (the caller owns them): migration.
        A waiting (preempted) request comes back with no blocks (its KV was dropped: recompute). None when
        the request is not here (finished or unknown)."""
        for q in (self.running, self.waiting):
            for s in list(q):
                if s.rid == request_id:
                    q.remove(s)
                    out = DetachedRequest(s.rid, list(s.tokens), s.num_prompt, list(s.output), list(s.blocks),
                                          s.num_computed, s.req.sampling)
                    s.blocks = []
                    return out
        return None

    def prefill_only(self, request: Request) -> PrefillResult:
        """Compute the prompt's KV into pool blocks now and sample the first token; the caller owns the blocks."""
        seq = self._new_seq(request)
        need = self._blocks_needed(seq, len(seq.tokens))
        try:
            seq.blocks += self._allocator.allocate(need)
        except OutOfBlocks:
            self._allocator.free(seq.blocks)
            raise
        logits = self._forward([seq])
        first, lps = sample(logits, [request.sampling], [seq.seed], [seq.step], [self._context(seq)])[0]
        return PrefillResult(first_token=first, block_ids=list(seq.blocks), num_tokens=len(seq.tokens),
                             first_logprobs=lps)

    def add_prefilled_request(self, request: Request, block_ids: Sequence[int], first_token: int) -> None:
        """Decode from KV already in this pool: ``block_ids`` hold the prompt's KV (one reference each is
        handed over); ``first_token`` was sampled by the prefill side. Outputs carry the tokens after it."""
        seq = self._new_seq(Request(request.request_id, request.prompt_token_ids, request.sampling,
                                    num_earlier_output=request.num_earlier_output))
        need = -(-seq.num_prompt // self._layout.block_size)
        if len(block_ids) < need:
            raise ValueError(f"request {request.request_id}: {seq.num_prompt} prompt tokens need {need} blocks, "
                             f"got {len(block_ids)}")
        self._layout.validate_blocks(list(block_ids))
        seq.blocks = list(block_ids)
        seq.num_computed = seq.num_prompt
        seq.tokens.append(first_token)
        seq.output.append(first_token)
        reason = self._finish_reason(seq)
        if reason:
            self._finish(seq, reason)
        else:
            self.running.append(seq)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        rids = [f"gen-{next(self._ids)}" for _ in prompts]
        for rid, p, sp in zip(rids, prompts, params):
            self.add_request(Request(rid, list(p), sp))
        out: dict[str, list[int]] = {r: [] for r in rids}
        while self.has_unfinished():
            for o in self.step():
                if o.request_id in out:
                    out[o.request_id] += o.new_token_ids
        return [out[r] for r in rids]

    # -- the scheduler -------------------------------------------------------------------------------
    def _blocks_needed(self, seq: _Seq, ntokens: int) -> int:
        return max(0, -(-ntokens // self._layout.block_size) - len(seq.blocks))

    def _preempt(self, seq: _Seq) -> None:
        self.running.remove(seq)
        self._allocator.free(seq.blocks)
        seq.blocks = []
        seq.num_computed = 0
        self.waiting.appendleft(seq)

    def step(self) -> list[RequestOutput]:
        c = self.config
        outputs, self._pending = self._pending, []
        # 1. running sequences: one token each, maybe one new block each
        while self.running:
            need = sum(self._blocks_needed(s, len(s.tokens)) for s in self.running)
            if need <= self._allocator.num_free:
                break
            self._preempt(self.running[-1])
        for s in self.running:
            s.blocks += self._allocator.allocate(self._blocks_needed(s, len(s.tokens)))
        batch = list(self.running)
        budget = c.max_num_batched_tokens - len(batch)
        # 2. admit waiting sequences
        while self.waiting and len(batch) < c.max_num_seqs:
            s = self.waiting[0]
            q_len = len(s.tokens) - s.num_computed
            need = self._blocks_needed(s, len(s.tokens))
            if (q_len > budget and batch) or need > self._allocator.num_free:
                break
            self.waiting.popleft()
            s.blocks += self._allocator.allocate(need)
            budget -= q_len
            batch.append(s)
            self.running.append(s)
        if not batch:
            return outputs
        # 3. one forward; 4. sample, stop, free
        logits = self._forward(batch)
        toks = sample(logits, [s.req.sampling for s in batch], [s.seed for s in batch], [s.step for s in batch],
                      [self._context(s) for s in batch])
        for s, (t, lps) in zip(batch, toks):
            s.num_computed = len(s.tokens)
            s.tokens.append(t)
            s.output.append(t)
            reason = self._finish_reason(s)
            if reason:
                self.running.remove(s)
                self._allocator.free(s.blocks)
                s.blocks = []
            outputs.append(RequestOutput(s.rid, [t], reason is not None, reason, s.num_prompt, len(s.output),
                                         None if lps is None else [lps]))
        return outputs

    @staticmethod
    def _context(s: _Seq) -> RowContext | None:
        """What the sampler's logits processing reads of a sequence (None when its parameters need none)."""
        if s.req.sampling.plain:
            return None
        if s.earlier:
            cut = s.num_prompt - s.earlier
            return RowContext(s.tokens[:cut], s.tokens[cut : s.num_prompt] + s.output, s.stop_ids)
        return RowContext(s.tokens[: s.num_prompt], s.output, s.stop_ids)

    def _finish_reason(self, s: _Seq) -> FinishReason | None:
        if s.output and s.output[-1] in s.stop_ids:
            return "stop"
        if len(s.output) >= s.req.sampling.max_tokens or len(s.tokens) >= self.model_config.max_position_embeddings:
            return "length"
        return None

    def _finish(self, s: _Seq, reason: FinishReason) -> None:
        self._allocator.free(s.blocks)
        s.blocks = []
        self._pending.append(RequestOutput(s.rid, [], True, reason, s.num_prompt, len(s.output)))

    def _forward(self, seqs: list[_Seq]) -> torch.Tensor:
        ids: list[int] = []
        pos: list[int] = []
        slices: list[SeqSlice] = []
        rows: list[int] = []
        for s in seqs:
            new = s.tokens[s.num_computed :]
            slices.append(SeqSlice(len(ids), len(new), len(s.tokens), s.blocks))
            ids += new
            pos += range(s.num_computed, len(s.tokens))
            rows.append(len(ids) - 1)
        dev = self.model.device
        attn = PagedAttention(self.pool, slices)
        return self.model.forward(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), attn,
                                  None if len(rows) == len(ids) else torch.tensor(rows, device=dev))

