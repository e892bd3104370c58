"""Paged attention over the KvLayout pool equals dense attention on contiguous K/V (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch

from dynamo_ext.engine.attention import DenseCausalAttention, PagedAttention, PlainCausalAttention, SeqSlice
from dynamo_ext.engine.kv_pool import FreeListAllocator, PagedKvPool
from dynamo_ext.engine.model import LlamaModel
from dynamo_ext.transport.layout import KvLayout

ORDERS = ["layer_major", "block_major"]


def _layout(cfg, order, num_blocks=40, block_size=4):
    return KvLayout(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                    block_size=block_size, dtype="float32", num_blocks=num_blocks, order=order)


@pytest.mark.parametrize("order", ORDERS)
def test_pool_views_are_the_layout(tiny, order):
    lay = _layout(tiny.config, order, num_blocks=5)
    pool = PagedKvPool(lay)
    assert pool.buffer.numel() == lay.pool_bytes and pool.buffer.dtype == torch.uint8
    base = pool.buffer.data_ptr()
    for layer in range(lay.num_layers):
        for b in range(lay.num_blocks):
            for kv, views in ((0, pool.k), (1, pool.v)):
                chunk = views[layer][b]
                assert chunk.is_contiguous()  # [block_size][num_kv_heads][head_dim]
                assert chunk.data_ptr() - base == lay.chunk_offset(b, layer, kv)
                assert chunk.numel() * chunk.element_size() == lay.chunk_bytes
    # writing through a view lands in the chunk's bytes
    pool.k[1][3][2, 1, 5] = 1.5
    raw = pool.chunk(3, 1, 0).view(torch.float32).view(lay.block_size, lay.num_kv_heads, lay.head_dim)
    assert raw[2, 1, 5] == 1.5


def _dense_logits(model, tokens, backend):
    return model.forward(torch.tensor(tokens), torch.arange(len(tokens)), backend)


@pytest.mark.parametrize("order", ORDERS)
def test_paged_equals_dense_batched_mixed_steps(tiny, order, prompt):
    """Three sequences, scattered block ids: prefill (one with a prefix already in the pool), then
    decode steps in which prefill and decode rows share a batch; every logit row vs dense references."""
    cfg = tiny.config
    model = LlamaModel(cfg, tiny.weights)
    lay = _layout(cfg, order)
    pool = PagedKvPool(lay)
    perm = torch.randperm(lay.num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
    alloc = iter(perm)  # non-contiguous, out-of-order block ids
    full = [prompt(1, 23), prompt(2, 9), prompt(3, 14)]  # prompts + the tokens "decoded" after them
    plen = [13, 6, 9]
    blocks = [[next(alloc) for _ in range(-(-len(s) // lay.block_size))] for s in full]
    dense = [_dense_logits(model, s, DenseCausalAttention()) for s in full]
    plain = [_dense_logits(model, s, PlainCausalAttention()) for s in full]
    for d, p in zip(dense, plain):
        assert torch.allclose(d, p, atol=1e-5, rtol=0)

    # seq 2 first computes 8 tokens alone, so its later prefill is a prefix hit (ctx 9, q_len 1 -> decode path)
    # and seq 0 first computes 8 tokens, then its remaining 5 prompt tokens attend to them (prefill path, cached)
    done = [0, 0, 0]
    def run(step_seqs):
        slices, ids, pos, rows = [], [], [], []
        for i, upto in step_seqs:
            new = full[i][done[i]:upto]
            slices.append(SeqSlice(len(ids), len(new), upto, blocks[i]))
            ids += new
            pos += range(done[i], upto)
            rows.append(len(ids) - 1)
            done[i] = upto
        out = model.forward(torch.tensor(ids), torch.tensor(pos), PagedAttention(pool, slices), torch.tensor(rows))
        for (i, upto), row in zip(step_seqs, out):
            assert torch.allclose(row, dense[i][upto - 1], atol=1e-5, rtol=0), (i, upto, (row - dense[i][upto - 1]).abs().max())

    run([(0, 8), (2, 8)])
    run([(0, 13), (1, 6), (2, 9)])
    for t in range(1, 11):
        step = [(i, plen[i] + t) for i in range(3) if plen[i] + t <= len(full[i])]
        run(step)
    assert done == [len(s) for s in full]


def test_free_list_allocator_refcounts():
    a = FreeListAllocator(4)
    x = a.allocate(3)
    assert x == [0, 1, 2] and a.num_free == 1
    a.share(x[:1])
    a.free(x)
    assert a.num_free == 3 and a.refcount(0) == 1
    a.free([0])
    assert a.num_free == 4
    with pytest.raises(ValueError):
        a.free([0])
    from dynamo_ext.engine.protocol import BlockAllocator, OutOfBlocks

    assert isinstance(a, BlockAllocator)
    with pytest.raises(OutOfBlocks):
        a.allocate(5)
