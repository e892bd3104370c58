"""Token sampling: greedy, temperature, top-p; output token i of a request is drawn with (seed, i).

    sample(logits [R, V] fp32, params: list[SamplingParams], seeds: list[int], steps: list[int]) -> list[int]

Greedy rows take one argmax on the logits' device. Sampled rows go to the CPU in fp32: softmax of
logits / temperature, keep the smallest set of most likely tokens whose mass reaches top_p, and
invert the CDF at one uniform draw from a generator seeded by (seed, step). The draw does not depend
on the batch, on the device, or on whether a prefill or a decode engine makes it.
"""

from __future__ import annotations

import torch

from .protocol import SamplingParams

_MASK = (1 << 63) - 1


def step_seed(seed: int, step: int) -> int:
    return (seed * 6364136223846793005 + step * 1442695040888963407 + 1) & _MASK


def sample_row(logits: torch.Tensor, p: SamplingParams, seed: int, step: int, gen: torch.Generator) -> int:
    probs = torch.softmax(logits.double() / p.temperature, dim=-1)
    sp, idx = probs.sort(descending=True, stable=True)
    cdf = sp.cumsum(0)
    if p.top_p < 1.0:
        keep = int((cdf < p.top_p).sum().item()) + 1
        sp, idx, cdf = sp[:keep], idx[:keep], cdf[:keep]
    gen.manual_seed(step_seed(seed, step))
    u = torch.rand((), generator=gen, dtype=torch.float64) * cdf[-1]
    j = min(int(torch.searchsorted(cdf, u, right=True).item()), sp.shape[0] - 1)
    return int(idx[j].item())


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int]) -> list[int]:
    out = logits.argmax(dim=-1).tolist()
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if rows:
        cpu = logits[rows].float().cpu()
        gen = torch.Generator()
        for j, i in enumerate(rows):
            out[i] = sample_row(cpu[j], params[i], seeds[i], steps[i], gen)
    return out
