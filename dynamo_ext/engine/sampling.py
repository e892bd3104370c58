"""Token sampling: logits processing, log probabilities, greedy / temperature / top-k / min-p / top-p;
output token i of a request is drawn with (seed, i).

    sample(logits [R, V], params: list[SamplingParams], seeds: list[int], steps: list[int],
           contexts: list[RowContext] | None) -> list[Sampled]        Sampled = (token, TokenLogprobs | None)

Rows whose parameters need nothing but greedy (``SamplingParams.plain``, temperature <= 0) take one argmax
on the logits' device. Every other row goes to the CPU in fp64:

1. processing (``RowContext``: the row's prompt, its output so far, its stop ids): repetition_penalty over
   the prompt and output tokens (a positive logit is divided by it, a negative one multiplied), minus
   frequency_penalty x count and presence_penalty x [count > 0] over the output tokens, stop ids at -inf
   while step < min_tokens;
2. log probabilities of the processed logits (before temperature and filters) when ``logprobs`` is set:
   the chosen token's and the top k;
3. greedy: argmax of the processed logits; sampled: softmax(logits / temperature), sorted, cut to top_k,
   to the tokens with p >= min_p x p_max, to the smallest set whose mass reaches top_p (of what is left),
   and the CDF inverted at one uniform draw from a generator seeded by (seed, step).

The draw does not depend on the batch, on the device, or on whether a prefill or a decode engine makes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .protocol import SamplingParams, TokenLogprobs

_MASK = (1 << 63) - 1

Sampled = tuple[int, "TokenLogprobs | None"]


@dataclass(frozen=True)
class RowContext:
    """What logits processing needs of a sequence: its prompt, the tokens it produced, its stop ids."""

    prompt: Sequence[int] = ()
    output: Sequence[int] = ()
    stop_ids: frozenset[int] = frozenset()


_EMPTY = RowContext()


def step_seed(seed: int, step: int) -> int:
    return (seed * 6364136223846793005 + step * 1442695040888963407 + 1) & _MASK


def process_row(row: torch.Tensor, p: SamplingParams, step: int, ctx: RowContext) -> torch.Tensor:
    """Penalties and the min_tokens stop mask applied to one fp64 CPU logits row (returns a new tensor)."""
    row = row.clone()
    v = row.shape[0]
    if p.repetition_penalty != 1.0:
        seen = sorted({t for t in ctx.prompt if 0 <= t < v} | {t for t in ctx.output if 0 <= t < v})
        if seen:
            ids = torch.tensor(seen)
            x = row[ids]
            row[ids] = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and ctx.output:
        out = torch.tensor([t for t in ctx.output if 0 <= t < v], dtype=torch.long)
        counts = torch.bincount(out, minlength=v).double()
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).double()
    if step < p.min_tokens and ctx.stop_ids:
        stop = [t for t in ctx.stop_ids if 0 <= t < v]
        if stop:
            row[torch.tensor(stop)] = float("-inf")
    return row


def draw(logits: torch.Tensor, p: SamplingParams, seed: int, step: int, gen: torch.Generator) -> int:
    """One seeded draw from softmax(logits / temperature) under top_k, min_p and top_p (fp64 CPU row)."""
    probs = torch.softmax(logits / p.temperature, dim=-1)
    sp, idx = probs.sort(descending=True, stable=True)
    cut = False
    if p.top_k > 0 and p.top_k < sp.shape[0]:
        sp, idx, cut = sp[: p.top_k], idx[: p.top_k], True
    if p.min_p > 0.0:
        keep = max(int((sp >= p.min_p * sp[0]).sum().item()), 1)
        sp, idx, cut = sp[:keep], idx[:keep], True
    cdf = sp.cumsum(0)
    if p.top_p < 1.0:
        limit = p.top_p * cdf[-1] if cut else p.top_p
        keep = int((cdf < limit).sum().item()) + 1
        sp, idx, cdf = sp[:keep], idx[:keep], cdf[:keep]
    gen.manual_seed(step_seed(seed, step))
    u = torch.rand((), generator=gen, dtype=torch.float64) * cdf[-1]
    j = min(int(torch.searchsorted(cdf, u, right=True).item()), sp.shape[0] - 1)
    return int(idx[j].item())


def sample_row(logits: torch.Tensor, p: SamplingParams, seed: int, step: int, gen: torch.Generator) -> int:
    """A plain sampled row (no processing): the draw of ``draw`` (kept for callers of the old name)."""
    return draw(logits.double(), p, seed, step, gen)


def token_logprobs(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprobs:
    """(log p of ``token``, the k most likely (token id, log p), most likely first)."""
    top: list[tuple[int, float]] = []
    if k > 0:
        vals, ids = logprobs.topk(min(k, logprobs.shape[0]))
        top = [(int(i), float(x)) for i, x in zip(ids.tolist(), vals.tolist())]
    return float(logprobs[token].item()), top


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int],
           contexts: Sequence[RowContext] | None = None) -> list[Sampled]:
    fast = [i for i, p in enumerate(params) if p.plain and p.temperature <= 0]
    out: list[Sampled] = [(0, None)] * len(params)
    if fast:
        toks = logits[fast].argmax(dim=-1).tolist()
        for i, t in zip(fast, toks):
            out[i] = (int(t), None)
    fast_set = set(fast)
    rows = [i for i in range(len(params)) if i not in fast_set]
    if rows:
        cpu = logits[rows].float().cpu().double()
        gen = torch.Generator()
        for j, i in enumerate(rows):
            p = params[i]
            row = cpu[j]
            if not p.plain:
                row = process_row(row, p, steps[i], (contexts[i] if contexts is not None else None) or _EMPTY)
            tok = int(row.argmax().item()) if p.temperature <= 0 else draw(row, p, seeds[i], steps[i], gen)
            lp = None
            if p.logprobs is not None:
                lp = token_logprobs(torch.log_softmax(row, dim=-1), tok, p.logprobs)
            out[i] = (tok, lp)
    return out


__all__ = ["RowContext", "Sampled", "draw", "process_row", "sample", "sample_row", "step_seed", "token_logprobs"]
