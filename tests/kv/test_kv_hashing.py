"""Our pure block hash == Dynamo's ``compute_block_hash_for_seq`` (the proof ``kv/hashing.py`` cites)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_ext.kv import hashing
from dynamo_ext.kv.hashing import block_hash, block_hashes, xxh3_64_pure

dynamo_llm = pytest.importorskip("dynamo.llm")
dynamo_hash = dynamo_llm.compute_block_hash_for_seq


def _tokens(rng: random.Random, n: int) -> list[int]:
    # mix small ids, vocabulary-sized ids and the full u32 range (byte patterns of every kind)
    pick = rng.random()
    if pick < 0.3:
        return [rng.randrange(0, 256) for _ in range(n)]
    if pick < 0.7:
        return [rng.randrange(0, 200_000) for _ in range(n)]
    return [rng.randrange(0, 2**32) for _ in range(n)]


def test_equal_on_random_sequences_every_xxh3_length_path():
    """Block sizes 1..80 cover byte lengths 4..320 (the 1-3/4-8/9-16/17-128/129-240/long paths); the
    large ones cover several 1 KiB stripes blocks (scramble rounds)."""
    rng = random.Random(20261122)
    sizes = list(range(1, 81)) + [96, 128, 255, 256, 257, 512, 1024]
    checked = 0
    for bs in sizes:
        for _ in range(6):
            toks = _tokens(rng, rng.randrange(0, 3 * bs + 7))
            assert block_hashes(toks, bs) == dynamo_hash(toks, bs), (bs, len(toks))
            checked += len(toks) // bs
    assert checked > 500


@settings(max_examples=150, deadline=None)
@given(
    toks=st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=200),
    bs=st.integers(min_value=1, max_value=70),
)
def test_equal_property(toks, bs):
    assert block_hashes(toks, bs) == dynamo_hash(toks, bs)


def test_only_full_blocks_and_local():
    toks = list(range(100))
    h = block_hashes(toks, 16)
    assert len(h) == 6
    assert block_hashes(toks[:95], 16) == h[:5]
    # a block's hash depends only on its own tokens (the parent chain lives in the tree)
    assert h[2] == block_hash(toks[32:48]) == block_hashes([7] * 16 + toks[32:48], 16)[1]


def test_pure_xxh3_known_values():
    # reference values from the C xxhash library (xxhash 4.1.0, XXH3_64bits_withSeed)
    assert xxh3_64_pure(b"") == 0x2D06800538D394C2
    assert xxh3_64_pure(b"a") == 0xE6C632B61E964E1F
    assert xxh3_64_pure(b"abc", 1337) == 0x3F3720F174D252B0


def test_pure_equals_c_xxhash_on_every_length_path():
    """Where the C ``xxhash`` package is installed (the optional accelerator), the pure function
    equals it for every input-length path and for seeds of every size."""
    xxhash = pytest.importorskip("xxhash")
    rng = random.Random(1)
    for n in list(range(0, 260)) + [500, 1024, 1025, 2048, 3000]:
        data = rng.randbytes(n)
        for seed in (0, 1337, rng.randrange(2**32), 2**64 - 1):
            assert xxh3_64_pure(data, seed) == xxhash.xxh3_64_intdigest(data, seed=seed), (n, seed)
    assert hashing.xxh3_64 is not xxh3_64_pure


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        block_hashes([1, 2, 3], 0)
    with pytest.raises(ValueError):
        block_hashes([2**32] * 16, 16)
    with pytest.raises(ValueError):
        block_hashes([-1] * 16, 16)
