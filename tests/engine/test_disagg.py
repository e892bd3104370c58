"""Disaggregation anchor: prefill_only on engine P, byte copy of its blocks into engine D's pool at
other block ids (what NIXL does), add_prefilled_request on D == aggregated output, token for token."""

from __future__ import annotations

import pytest

from dynamo_ext.engine.protocol import Request, SamplingParams

CASES = [
    ("layer_major", "layer_major"),
    ("layer_major", "block_major"),
    ("block_major", "layer_major"),
]


@pytest.mark.parametrize("src_order,dst_order", CASES)
@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_prefill_transfer_decode_equals_aggregated(make_engine, prompt, src_order, dst_order, temperature):
    reqs = [Request(f"r{i}", prompt(50 + i, n), SamplingParams(max_tokens=10, temperature=temperature, seed=i,
                                                               ignore_eos=True))
            for i, n in enumerate([8, 13, 5])]  # 8 = exactly 2 blocks: decode starts a fresh block
    agg = make_engine(order=src_order)
    for r in reqs:
        agg.add_request(r)
    ref: dict[str, list[int]] = {}
    while agg.has_unfinished():
        for o in agg.step():
            ref.setdefault(o.request_id, []).extend(o.new_token_ids)

    P = make_engine(order=src_order, num_blocks=32)
    D = make_engine(order=dst_order, num_blocks=48)
    D.allocator.allocate(7)  # D's free ids start elsewhere than P's
    got: dict[str, list[int]] = {}
    for r in reqs:
        res = P.prefill_only(r)
        assert res.num_tokens == len(r.prompt_token_ids)
        dst = D.allocator.allocate(len(res.block_ids))
        assert dst != res.block_ids
        D.pool.copy_blocks_from(P.pool, res.block_ids, dst)  # the transfer: bytes only
        P.release(res.block_ids)
        got[r.request_id] = [res.first_token]
        D.add_prefilled_request(r, dst, res.first_token)
    assert P.allocator.num_free == 32
    while D.has_unfinished():
        for o in D.step():
            got[o.request_id].extend(o.new_token_ids)
    assert got == ref
    assert D.allocator.num_free == 48 - 7


def test_prefilled_request_that_is_already_done(make_engine, prompt):
    P, D = make_engine(), make_engine()
    r = Request("one", prompt(60, 6), SamplingParams(max_tokens=1))
    res = P.prefill_only(r)
    dst = D.allocator.allocate(len(res.block_ids))
    D.add_prefilled_request(r, dst, res.first_token)
    outs = D.step()
    assert [(o.request_id, o.new_token_ids, o.finish_reason) for o in outs] == [("one", [], "length")]
    assert D.allocator.num_free == D.allocator.num_blocks and not D.has_unfinished()
    with pytest.raises(ValueError):
        D.add_prefilled_request(r, [], res.first_token)  # too few blocks for the prompt
