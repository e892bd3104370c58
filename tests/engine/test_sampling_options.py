"""Sampling options of the engine (what the OpenAI parameters become): log probabilities against a dense
reference forward, penalties against their formulas applied to the dense logits, min_tokens, top_k / min_p,
and the first token's log probabilities carried from a prefill engine to a decode engine."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dynamo_ext.engine.attention import DenseCausalAttention
from dynamo_ext.engine.model import LlamaModel
from dynamo_ext.engine.protocol import Request, SamplingParams


@pytest.fixture(scope="module")
def dense(tiny):
    model = LlamaModel(tiny.config, tiny.weights)

    def logits(tokens: list[int]) -> torch.Tensor:  # [len(tokens), V]: row j predicts token j + 1
        return model.forward(torch.tensor(tokens), torch.arange(len(tokens)), DenseCausalAttention()).double()

    return logits


def _run(eng, prompt, sp):
    """(tokens, logprobs per token) of one request run alone."""
    eng.add_request(Request("r", list(prompt), sp))
    toks: list[int] = []
    lps: list = []
    while eng.has_unfinished():
        for o in eng.step():
            toks += o.new_token_ids
            lps += o.logprobs or []
    return toks, lps


@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "sampled"])
def test_logprobs_are_the_models_and_greedy_takes_the_top(make_engine, prompt, dense, temperature):
    p = prompt(11, 9)
    sp = SamplingParams(max_tokens=6, temperature=temperature, seed=5, ignore_eos=True, logprobs=3)
    toks, lps = _run(make_engine(), p, sp)
    assert len(toks) == len(lps) == 6
    ref = torch.log_softmax(dense(p + toks), dim=-1)
    for i, (t, (lp, top)) in enumerate(zip(toks, lps)):
        row = ref[len(p) - 1 + i]
        assert lp == pytest.approx(float(row[t]), abs=1e-4)
        assert len(top) == 3 and [x for _, x in top] == sorted((x for _, x in top), reverse=True)
        assert [i for i, _ in top] == row.topk(3).indices.tolist()
        if temperature == 0.0:
            assert top[0][0] == t and top[0][1] == lp  # greedy: the chosen token is the most likely
    # without logprobs the tokens are the same (log probabilities are reported, never change the draw)
    assert _run(make_engine(), p, dataclasses.replace(sp, logprobs=None))[0] == toks


def test_penalties_follow_their_formulas(make_engine, prompt, dense):
    p = prompt(12, 7)
    base = SamplingParams(max_tokens=16, ignore_eos=True)
    plain, _ = _run(make_engine(), p, base)
    assert len(set(plain)) < len(plain)  # greedy repeats itself here: penalties have something to change
    for kw, fewer_repeats in (({"frequency_penalty": 1.5}, True), ({"presence_penalty": 2.0}, True),
                              ({"repetition_penalty": 1.8}, True),
                              ({"frequency_penalty": -0.5, "presence_penalty": 0.7, "repetition_penalty": 0.8}, False)):
        toks, _ = _run(make_engine(), p, dataclasses.replace(base, **kw))
        for i, t in enumerate(toks):  # each greedy choice is the argmax of the penalised dense logits
            row = dense(p + toks[:i])[-1]
            seen = sorted(set(p) | set(toks[:i]))
            if "repetition_penalty" in kw and seen:
                rp, x = kw["repetition_penalty"], row[seen]
                row[seen] = torch.where(x > 0, x / rp, x * rp)
            counts = torch.bincount(torch.tensor(toks[:i], dtype=torch.long), minlength=row.shape[0]).double()
            row = row - kw.get("frequency_penalty", 0.0) * counts - kw.get("presence_penalty", 0.0) * (counts > 0)
            assert int(row.argmax()) == t, (kw, i)
        if fewer_repeats:
            assert len(set(toks)) > len(set(plain)), kw


def test_min_tokens_holds_back_stop_ids(make_engine, prompt):
    p = prompt(13, 6)
    first = _run(make_engine(), p, SamplingParams(max_tokens=5, ignore_eos=True))[0][0]
    sp = SamplingParams(max_tokens=5, ignore_eos=True, stop_token_ids=(first,))
    assert _run(make_engine(), p, sp)[0] == [first]  # stops at once
    toks, _ = _run(make_engine(), p, dataclasses.replace(sp, min_tokens=3))
    assert first not in toks[:3] and len(toks) >= 3


def test_top_k_1_and_min_p_1_are_greedy(make_engine, prompt):
    p = prompt(14, 8)
    greedy = _run(make_engine(), p, SamplingParams(max_tokens=8, ignore_eos=True))[0]
    hot = SamplingParams(max_tokens=8, temperature=1.5, seed=3, ignore_eos=True)
    assert _run(make_engine(), p, hot)[0] != greedy  # the draw does sample
    assert _run(make_engine(), p, dataclasses.replace(hot, top_k=1))[0] == greedy
    assert _run(make_engine(), p, dataclasses.replace(hot, min_p=1.0))[0] == greedy


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_prefill_engine_first_token_logprobs_equal_aggregated(make_engine, prompt, temperature):
    """The prefill engine reports the first token's log probabilities (the decode engine never samples it); with
    penalties, disaggregated == aggregated for tokens and log probabilities."""
    sp = SamplingParams(max_tokens=7, temperature=temperature, seed=9, ignore_eos=True, logprobs=2,
                        frequency_penalty=0.8, repetition_penalty=1.3)
    p = prompt(15, 10)
    ref_toks, ref_lps = _run(make_engine(), p, sp)
    P, D = make_engine(num_blocks=32), make_engine(num_blocks=32)
    res = P.prefill_only(Request("r", list(p), sp))
    dst = D.allocator.allocate(len(res.block_ids))
    D.pool.copy_blocks_from(P.pool, res.block_ids, dst)
    P.release(res.block_ids)
    D.add_prefilled_request(Request("r", list(p), sp), dst, res.first_token)
    toks, lps = [res.first_token], [res.first_logprobs]
    while D.has_unfinished():
        for o in D.step():
            toks += o.new_token_ids
            lps += o.logprobs or []
    assert toks == ref_toks and lps == ref_lps


def test_bad_options_are_refused():
    for kw in ({"top_k": -2}, {"min_p": 1.5}, {"presence_penalty": 2.5}, {"frequency_penalty": -3},
               {"repetition_penalty": 0}, {"min_tokens": -1}, {"logprobs": 21}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            SamplingParams(**kw)


@pytest.mark.parametrize("k", [1, 5])
def test_a_continued_stream_goes_on_exactly_with_seed_and_penalties(make_engine, prompt, k):
    """A stream moved after k tokens (migration: prompt + streamed output, num_earlier_output = k) draws the same
    next tokens as the uninterrupted run: the seeded step continues at k and the penalties count the earlier
    output as output. Without num_earlier_output the step restarts at 0 and the earlier tokens are prompt."""
    p = prompt(13, 10)
    sp = SamplingParams(max_tokens=12, temperature=0.8, seed=11, ignore_eos=True, presence_penalty=1.5,
                        frequency_penalty=0.7, min_tokens=3)
    whole, _ = _run(make_engine(), p, sp)
    rest = dataclasses.replace(sp, max_tokens=12 - k)
    eng = make_engine()
    eng.add_request(Request("r", p + whole[:k], rest, num_earlier_output=k))
    cont: list[int] = []
    while eng.has_unfinished():
        for o in eng.step():
            cont += o.new_token_ids
    assert cont == whole[k:]
    # the same through the decode side of a hand-over (the last streamed token is the handle's first token)
    pre = make_engine()
    res = pre.prefill_only(Request("r", p + whole[: k - 1], rest, num_earlier_output=k - 1))
    assert res.first_token == whole[k - 1]
    dec2 = make_engine()  # the same pool layout: the KV copied wholesale, the same block ids held
    dec2.kv_buffer().copy_(pre.kv_buffer())
    ids = dec2.allocator.allocate(max(res.block_ids) + 1)
    keep = set(res.block_ids)
    dec2.allocator.free([b for b in ids if b not in keep])
    dec2.add_prefilled_request(Request("r", p + whole[: k - 1], dataclasses.replace(sp, max_tokens=12 - k + 1),
                                       num_earlier_output=k - 1), res.block_ids, res.first_token)
    out: list[int] = []
    while dec2.has_unfinished():
        for o in dec2.step():
            out += o.new_token_ids
    assert out == whole[k:]
    # the old behaviour (the step restarts, earlier output is prompt) gives other tokens
    eng = make_engine()
    eng.add_request(Request("r", p + whole[:k], rest))
    old: list[int] = []
    while eng.has_unfinished():
        for o in eng.step():
            old += o.new_token_ids
    assert old != whole[k:]
