"""KvLayout: chunk addressing, compatibility, validation, wire form."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_ext.transport.errors import InvalidBlocks, LayoutMismatch
from dynamo_ext.transport.layout import PRESETS, KvLayout, MemoryOrder, preset


@st.composite
def layouts(draw):
    return KvLayout(
        num_layers=draw(st.integers(1, 5)),
        num_kv_heads=draw(st.integers(1, 3)),
        head_dim=draw(st.integers(1, 4)),
        block_size=draw(st.integers(1, 4)),
        dtype=draw(st.sampled_from(["uint8", "float16", "bfloat16", "float32", "float8_e4m3fn"])),
        num_blocks=draw(st.integers(1, 9)),
        order=draw(st.sampled_from(list(MemoryOrder))),
    )


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_chunks_tile_the_pool_exactly(lay):
    """Every (block, layer, kv) chunk is chunk_bytes long, aligned, and together they cover the pool
    once: no gaps, no overlap."""
    offs = sorted(
        lay.chunk_offset(b, layer, kv)
        for b in range(lay.num_blocks)
        for layer in range(lay.num_layers)
        for kv in (0, 1)
    )
    assert offs == list(range(0, lay.pool_bytes, lay.chunk_bytes))
    assert lay.pool_bytes == lay.num_blocks * lay.block_bytes == lay.num_blocks * lay.chunks_per_block * lay.chunk_bytes


def test_offsets_follow_the_documented_formulas():
    lm = KvLayout(3, 2, 4, 2, "float16", 5, MemoryOrder.LAYER_MAJOR)
    bm = msgspec.structs.replace(lm, order=MemoryOrder.BLOCK_MAJOR)
    cb = 2 * 2 * 4 * 2
    assert lm.chunk_bytes == cb and lm.block_bytes == cb * 6
    assert lm.chunk_offset(4, 2, 1) == ((2 * 2 + 1) * 5 + 4) * cb
    assert bm.chunk_offset(4, 2, 1) == ((4 * 3 + 2) * 2 + 1) * cb
    # block-major: a whole block is contiguous
    assert {bm.chunk_offset(1, layer, kv) // bm.block_bytes for layer in range(3) for kv in (0, 1)} == {1}


def test_order_given_as_string_is_normalised():
    """Regression: a str order was kept as str and chunk_offset's `is` test fell to block-major."""
    lay = KvLayout(2, 2, 16, 16, "float32", 4, order="layer_major")
    assert lay.order is MemoryOrder.LAYER_MAJOR
    assert lay.chunk_offset(1, 0, 0) == lay.chunk_bytes
    assert KvLayout(2, 2, 16, 16, "float32", 4, order="block_major").order is MemoryOrder.BLOCK_MAJOR
    assert lay == KvLayout(2, 2, 16, 16, "float32", 4) and hash(lay) == hash(KvLayout(2, 2, 16, 16, "float32", 4))
    with pytest.raises(ValueError, match="order"):
        KvLayout(2, 2, 16, 16, "float32", 4, order="row_major")


@pytest.mark.parametrize("field,value", [("num_layers", 0), ("head_dim", -1), ("num_blocks", 0), ("block_size", 1.5), ("dtype", "int4")])
def test_invalid_fields_rejected(field, value):
    kw = dict(num_layers=2, num_kv_heads=2, head_dim=16, block_size=16, dtype="float32", num_blocks=4)
    kw[field] = value
    with pytest.raises(ValueError, match=field):
        KvLayout(**kw)


def test_compatibility_ignores_order_and_pool_size_and_names_every_difference():
    a = preset("llama3-8b", 10, "layer_major")
    b = preset("llama3-8b", 99, "block_major")
    a.check_compatible(b)
    c = msgspec.structs.replace(b, num_layers=31, dtype="float16")
    with pytest.raises(LayoutMismatch) as e:
        a.check_compatible(c)
    assert "num_layers" in str(e.value) and "dtype" in str(e.value)
    assert issubclass(LayoutMismatch, Exception)


def test_validate_blocks_and_chunk_offset_errors():
    lay = preset("tiny", 4)
    lay.validate_blocks([0, 3, np.int64(2)])
    for bad in ([4], [-1], [True], [1.0], ["1"]):
        with pytest.raises(InvalidBlocks):
            lay.validate_blocks(bad)
    with pytest.raises(InvalidBlocks):
        lay.chunk_offset(4, 0, 0)
    with pytest.raises(IndexError):
        lay.chunk_offset(0, 2, 0)
    with pytest.raises(IndexError):
        lay.chunk_offset(0, 0, 2)


@settings(max_examples=100, deadline=None)
@given(layouts())
def test_wire_round_trip(lay):
    d = lay.to_dict()
    assert d["order"] in ("layer_major", "block_major")
    assert KvLayout.from_dict(d) == lay
    assert KvLayout.from_dict(msgspec.json.decode(msgspec.json.encode(d))) == lay
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(lay), type=KvLayout) == lay


def test_from_dict_rejects_unknown_and_bad_fields():
    d = preset("tiny", 4).to_dict()
    with pytest.raises(msgspec.ValidationError):
        KvLayout.from_dict({**d, "extra": 1})
    with pytest.raises((msgspec.ValidationError, ValueError)):
        KvLayout.from_dict({**d, "order": "diagonal"})
    with pytest.raises((msgspec.ValidationError, ValueError)):
        KvLayout.from_dict({**d, "num_layers": 0})


def test_presets():
    lay = preset("llama3-70b", 10, "block_major")
    assert lay.chunk_bytes == 32 * 1024 and lay.chunks_per_block == 160 and lay.num_blocks == 10
    assert lay.order is MemoryOrder.BLOCK_MAJOR
    assert set(PRESETS) >= {"llama3-70b", "llama3-8b", "tiny"}
    with pytest.raises(ValueError):
        preset("gpt5")
