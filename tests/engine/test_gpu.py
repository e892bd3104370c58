"""The same anchors on CUDA (skipped without it): paged == dense, batch independence, disaggregation."""

from __future__ import annotations

import pytest
import torch

from dynamo_ext.engine.attention import DenseCausalAttention
from dynamo_ext.engine.core import EngineConfig, LlmEngine
from dynamo_ext.engine.protocol import Request, SamplingParams
from dynamo_ext.engine.weights import load_model

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def cuda_tiny():
    return load_model("tiny", device="cuda", seed=3)


def _engine(m, order="layer_major", num_blocks=64):
    return LlmEngine(m, EngineConfig(block_size=16, num_blocks=num_blocks, kv_order=order, device="cuda"))


def test_cuda_paged_decode_matches_dense(cuda_tiny, prompt):
    eng = _engine(cuda_tiny)
    ps = [prompt(1, 37), prompt(2, 5), prompt(3, 16)]
    out = eng.generate(ps, GREEDY)
    for p, o in zip(ps, out):
        full = p + o
        lg = eng.model.forward(torch.tensor(full, device="cuda"), torch.arange(len(full), device="cuda"),
                               DenseCausalAttention())
        assert lg[len(p) - 1 : -1].argmax(-1).tolist() == o


def test_cuda_alone_equals_batched_and_disagg(cuda_tiny, prompt):
    reqs = [Request(f"r{i}", prompt(10 + i, n), SamplingParams(max_tokens=12, temperature=0.7, seed=i, ignore_eos=True))
            for i, n in enumerate([16, 31, 7, 48])]
    alone = [_engine(cuda_tiny).generate([r.prompt_token_ids], r.sampling)[0] for r in reqs]
    batched = _engine(cuda_tiny).generate([r.prompt_token_ids for r in reqs], [r.sampling for r in reqs])
    assert batched == alone
    P, D = _engine(cuda_tiny), _engine(cuda_tiny, order="block_major")
    D.allocator.allocate(5)
    got = {}
    for r in reqs:
        res = P.prefill_only(r)
        dst = D.allocator.allocate(len(res.block_ids))
        D.pool.copy_blocks_from(P.pool, res.block_ids, dst)
        P.release(res.block_ids)
        got[r.request_id] = [res.first_token]
        D.add_prefilled_request(r, dst, res.first_token)
    while D.has_unfinished():
        for o in D.step():
            got[o.request_id] += o.new_token_ids
    assert [got[r.request_id] for r in reqs] == alone


def test_cuda_llama3_70b_shape_one_layer_bf16(prompt):
    m = load_model("llama3-70b-shape", device="cuda", num_layers=1)
    eng = LlmEngine(m, EngineConfig(block_size=16, num_blocks=64, device="cuda"))
    assert eng.kv_layout.dtype == "bfloat16" and eng.kv_layout.block_bytes == 16 * 8 * 128 * 2 * 2
    ps = [prompt(1, 40), prompt(2, 9), prompt(3, 17)]
    out = eng.generate(ps, SamplingParams(max_tokens=8, ignore_eos=True))
    assert [len(o) for o in out] == [8, 8, 8]
    # bf16: teacher-force the engine's tokens through the dense reference; each must be (near) its argmax
    for p, o in zip(ps, out):
        full = p + o
        lg = eng.model.forward(torch.tensor(full, device="cuda"), torch.arange(len(full), device="cuda"),
                               DenseCausalAttention())[len(p) - 1 : -1]
        chosen = lg.gather(1, torch.tensor(o, device="cuda")[:, None])[:, 0]
        gap = lg.max(-1).values - chosen
        assert (gap <= 0.05 * lg.std()).all(), gap
