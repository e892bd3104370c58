"""LlmEngine: determinism, batch independence, continuous batching, preemption, prefix cache, stops."""

from __future__ import annotations

import pytest

from dynamo_ext.engine.core import LlmEngine
from dynamo_ext.engine.protocol import Engine, Request, SamplingParams

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True)


def _alone(make_engine, p, sp, **kw):
    return make_engine(**kw).generate([p], sp)[0]


def _drain(eng: LlmEngine, out: dict[str, list[int]], steps: int | None = None) -> None:
    n = 0
    while eng.has_unfinished() and (steps is None or n < steps):
        for o in eng.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        n += 1


def test_engine_satisfies_protocol(make_engine):
    assert isinstance(make_engine(), Engine)


def test_greedy_is_deterministic(make_engine, prompt):
    ps = [prompt(1, 10), prompt(2, 17)]
    a = make_engine().generate(ps, GREEDY)
    b = make_engine().generate(ps, GREEDY)
    assert a == b and all(len(x) == 12 for x in a)
    assert a[0] != a[1]


@pytest.mark.parametrize("sp", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_same_output_alone_and_in_batch_with_joiners(make_engine, prompt, sp):
    x = prompt(5, 11)
    ref = _alone(make_engine, x, sp)
    eng = make_engine()
    out: dict[str, list[int]] = {}
    eng.add_request(Request("a", prompt(6, 7), GREEDY))
    eng.add_request(Request("b", prompt(7, 21), SamplingParams(max_tokens=3, ignore_eos=True)))
    _drain(eng, out, steps=2)
    eng.add_request(Request("x", x, sp))  # joins while a and b decode; b leaves soon after
    _drain(eng, out, steps=3)
    eng.add_request(Request("c", prompt(8, 5), SAMPLED))  # joins while x decodes
    _drain(eng, out)
    assert out["x"] == ref
    assert len(out["b"]) == 3 and len(out["c"]) == 12
    assert eng.allocator.num_free == eng.allocator.num_blocks


def test_sampling_seed_matters_and_repeats(make_engine, prompt):
    p = prompt(3, 9)
    s1 = _alone(make_engine, p, SAMPLED)
    s2 = _alone(make_engine, p, SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=99, ignore_eos=True))
    assert s1 == _alone(make_engine, p, SAMPLED)
    assert s1 != s2


def test_preemption_by_recompute_keeps_outputs(make_engine, prompt):
    ps = [prompt(10 + i, 9 + i) for i in range(4)]
    ref = [_alone(make_engine, p, GREEDY) for p in ps]
    eng = make_engine(num_blocks=16)  # 4 sequences x 6 blocks at the end: must preempt
    assert eng.generate(ps, GREEDY) == ref
    assert eng.allocator.num_free == 16


def test_prefix_cache_hit_does_not_change_output(make_engine, prompt):
    shared = prompt(20, 12)  # 3 full blocks of 4
    a = shared + [1, 2, 3]
    b = shared + [9, 8, 7, 6, 5]
    ref_b = _alone(make_engine, b, GREEDY)

    eng = make_engine()
    res = eng.prefill_only(Request("a", a, GREEDY))  # KV of a in res.block_ids, held for us
    prefix = res.block_ids[:3]
    eng.allocator.share(prefix)  # one reference for request b (the kv layer's pool does this on a hit)
    eng.release(res.block_ids)
    computed: list[int] = []
    fwd = eng.model.forward
    eng.model.forward = lambda ids, pos, attn, rows=None: (computed.append(len(ids)), fwd(ids, pos, attn, rows))[1]
    out: dict[str, list[int]] = {}
    eng.add_request(Request("b", b, GREEDY, prefix_blocks=prefix))
    _drain(eng, out)
    assert out["b"] == ref_b
    assert computed[0] == len(b) - 12  # only the suffix was prefilled
    assert eng.allocator.num_free == eng.allocator.num_blocks


def test_stop_token_and_max_tokens_and_abort(make_engine, prompt):
    p = prompt(30, 8)
    ref = _alone(make_engine, p, GREEDY)
    eng = make_engine()
    eng.add_request(Request("s", p, SamplingParams(max_tokens=12, stop_token_ids=(ref[4],), ignore_eos=True)))
    eng.add_request(Request("k", prompt(31, 6), GREEDY))
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
        if len(outs) == 4:
            eng.abort("k")
    s = [o for o in outs if o.request_id == "s"]
    toks = [t for o in s for t in o.new_token_ids]
    assert toks == ref[: ref.index(ref[4]) + 1] and s[-1].finish_reason == "stop"
    k = [o for o in outs if o.request_id == "k"]
    assert k[-1].finished and k[-1].finish_reason == "abort"
    assert eng.allocator.num_free == eng.allocator.num_blocks
    one = make_engine().generate([p], SamplingParams(max_tokens=1, ignore_eos=True))
    assert one == [ref[:1]]


def test_eos_stops_unless_ignored(make_engine, tiny, prompt):
    p = prompt(40, 8)
    ref = _alone(make_engine, p, GREEDY)
    # make the 3rd greedy token the model's EOS by declaring it one
    from dataclasses import replace

    from dynamo_ext.engine.core import EngineConfig
    from dynamo_ext.engine.weights import LoadedModel

    m = LoadedModel(replace(tiny.config, extra_eos_token_ids=(ref[2],)), tiny.tokenizer, tiny.weights)
    eng = LlmEngine(m, EngineConfig(num_blocks=64, block_size=4))
    assert eng.generate([p], SamplingParams(max_tokens=12)) == [ref[: ref.index(ref[2]) + 1]]
    assert eng.generate([p], GREEDY) == [ref]


def test_bad_requests_are_refused(make_engine):
    eng = make_engine(num_blocks=4)
    with pytest.raises(ValueError):
        eng.add_request(Request("e", [], GREEDY))
    with pytest.raises(ValueError):
        eng.add_request(Request("v", [10_000], GREEDY))
    with pytest.raises(ValueError):
        eng.add_request(Request("l", [1] * 40, GREEDY))  # needs more blocks than the pool has


def test_token_budget_defers_admission(make_engine, prompt):
    ps = [prompt(70, 15), prompt(71, 15), prompt(72, 3)]
    ref = [_alone(make_engine, p, GREEDY) for p in ps]
    eng = make_engine(max_num_batched_tokens=20, max_num_seqs=2)
    for i, p in enumerate(ps):
        eng.add_request(Request(str(i), p, GREEDY))
    first = eng.step()
    assert [o.request_id for o in first] == ["0"]  # 15 + 15 > 20: the second prompt waits a step
    out = {o.request_id: list(o.new_token_ids) for o in first}
    _drain(eng, out)
    assert [out[str(i)] for i in range(3)] == ref
