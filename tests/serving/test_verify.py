"""kv_transfer.verify's pieces: block digests equal for equal bytes in any memory order and pool size, a
flipped byte changes its block's digest only; which blocks each mode checks; digests ride in the KV handle."""

from __future__ import annotations

import pytest

from dynamo_ext.serving.protocol import KvHandle
from dynamo_ext.serving.worker import verify_indices
from dynamo_ext.transport import KvPool
from dynamo_ext.transport.layout import KvLayout
from dynamo_ext.transport.verify import block_digests, pattern


@pytest.mark.parametrize("order", ["layer_major", "block_major"])
def test_block_digests_follow_the_bytes_not_the_place(order):
    a = KvLayout(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32", num_blocks=10, order=order)
    b = KvLayout(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32", num_blocks=7)
    pa, pb = KvPool.allocate_host("a", a, pin=False), KvPool.allocate_host("b", b, pin=False)
    pattern(pa.buffer, 5)
    for layer in range(3):
        for kv in (0, 1):
            so, do, n = a.chunk_offset(7, layer, kv), b.chunk_offset(2, layer, kv), a.chunk_bytes
            pb.buffer[do:do + n] = pa.buffer[so:so + n]
    for kind in ("xxh3", "wsum"):
        d7, d3 = block_digests(pa, a, [7, 3], kind)
        assert block_digests(pb, b, [2], kind) == [d7] and d7 != d3
    pb.buffer[b.chunk_offset(2, 2, 1) + 5] ^= 0xFF
    for kind in ("xxh3", "wsum"):
        d7, d3 = block_digests(pa, a, [7, 3], kind)
        assert block_digests(pb, b, [2], kind) != [d7] and block_digests(pa, a, [3], kind) == [d3]
    assert block_digests(pa, a, []) == [] and block_digests(pa, a, [1]) == block_digests(pa, a, [1], "xxh3")
    with pytest.raises(ValueError, match="allowed"):
        block_digests(pa, a, [1], "md5")


def test_verify_indices_and_the_handle_field():
    assert verify_indices(10, "off") == [] and verify_indices(10, "all") == list(range(10))
    assert verify_indices(10, "sample") == [0, 2, 5, 7, 9] and verify_indices(1, "sample") == [0]
    h = KvHandle(handle_id="h", worker_id=1, component="prefill", agent="a", pool="kv", block_ids=[4, 5],
                 num_tokens=20, first_token=3, layout={}, deadline=1.0, digests=[(0, 2**64 - 1), (1, 7)])
    back = KvHandle.from_dict(h.to_dict())
    assert back.digests == [(0, 2**64 - 1), (1, 7)]
    old = {k: v for k, v in h.to_dict().items() if k != "digests"}  # a handle from a worker without verify
    assert KvHandle.from_dict(old).digests == []
