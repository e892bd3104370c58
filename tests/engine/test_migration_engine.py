"""Migration at the engine level: detach a running request with its KV, copy the KV bytes into another
engine's pool, continue there: the whole greedy sequence equals an uninterrupted run (both memory orders,
several cut points, a batch running around it)."""

from __future__ import annotations

import pytest
import torch

from dynamo_ext.engine.protocol import Request, SamplingParams


def _copy_blocks(src, dst, src_ids, dst_ids):
    """Byte copy of whole blocks between two engines' pools, chunk by chunk through the layouts."""
    ls, ld = src.kv_layout, dst.kv_layout
    a, b = src.kv_buffer().view(-1).view(torch.uint8), dst.kv_buffer().view(-1).view(torch.uint8)
    n = ls.chunk_bytes
    for sb, db in zip(src_ids, dst_ids):
        for layer in range(ls.num_layers):
            for kv in (0, 1):
                so, do = ls.chunk_offset(sb, layer, kv), ld.chunk_offset(db, layer, kv)
                b[do:do + n] = a[so:so + n]


def _run(engine, rid):
    out = []
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == rid:
                out += o.new_token_ids
    return out


@pytest.mark.parametrize("order", ["layer_major", "block_major"])
@pytest.mark.parametrize("cut", [1, 5, 13])
def test_detached_request_continues_with_the_same_tokens(make_engine, prompt, order, cut):
    n_out = 24
    sp = SamplingParams(max_tokens=n_out, ignore_eos=True)
    p = prompt(11, 37)
    ref = make_engine(order=order).generate([p], sp)[0]
    assert len(ref) == n_out

    a = make_engine(order=order)
    a.add_request(Request("r", list(p), sp))
    a.add_request(Request("other", prompt(12, 20), SamplingParams(max_tokens=40, ignore_eos=True)))
    got: list[int] = []
    while len(got) < cut:
        for o in a.step():
            if o.request_id == "r":
                got += o.new_token_ids
    st = a.detach("r")
    assert st is not None and st.output == got and st.tokens == list(p) + got
    assert st.num_computed == len(st.tokens) - 1  # the last token's KV is computed by the next step
    assert len(st.blocks) * a.kv_layout.block_size >= st.num_computed
    assert a.detach("r") is None  # gone from the scheduler; its blocks are the caller's now
    _run(a, "other")  # the engine goes on without it and neither frees nor reuses its blocks
    assert a.allocator.num_free == a.allocator.num_blocks - len(st.blocks)

    b = make_engine(order="block_major" if order == "layer_major" else "layer_major")  # any order: bytes per chunk
    dst = b.allocator.allocate(len(st.blocks))
    _copy_blocks(a, b, st.blocks, dst)
    a.release(st.blocks)
    rest = SamplingParams(max_tokens=n_out - len(st.output) + 1, ignore_eos=True)
    b.add_prefilled_request(Request("r2", st.tokens[:-1], rest), dst, st.tokens[-1])
    tail = _run(b, "r2")
    assert got + tail == ref


def test_detach_unknown_and_preempted(make_engine, prompt):
    e = make_engine()
    assert e.detach("nope") is None
    e.add_request(Request("w", prompt(3, 9), SamplingParams(max_tokens=4)))
    st = e.detach("w")  # still waiting: no KV computed, nothing to move (recompute)
    assert st is not None and st.num_computed == 0 and st.output == [] and not e.has_unfinished()
