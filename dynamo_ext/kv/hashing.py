"""Block hashes exactly as Dynamo computes them, without needing Dynamo.

Protocol (Dynamo 1.6.1, ``dynamo.llm.compute_block_hash_for_seq(tokens, block_size)`` with no
multimodal info, no LoRA, no Eagle):

    for every FULL block of ``block_size`` tokens (a trailing partial block is dropped):
        data = tokens of the block, each as a little-endian u32 (4 * block_size bytes)
        hash = XXH3_64bits_withSeed(data, seed=1337)

A block's hash depends only on its own tokens (it is the *local* block hash, Dynamo's
``tokens_hash``); prefix identity comes from the parent chain in the radix tree and in our
``BlockPool`` (see ``pool.py``), not from the hash. This is the value the ``KvEventPublisher``
computes from ``token_ids`` and the value ``RadixTree.find_matches`` expects.

``xxh3_64`` below is a pure-Python XXH3-64 (all input-length paths: 0-16, 17-128, 129-240 and the
long striped path with a seed-derived secret). ``tests/kv/test_hashing.py`` proves
``block_hashes == dynamo.llm.compute_block_hash_for_seq`` on random sequences and block sizes.
When the C ``xxhash`` package is importable it is used instead (same function, faster); the test
checks that path too. Nothing here imports Dynamo.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

__all__ = ["DYNAMO_HASH_SEED", "xxh3_64", "token_bytes", "block_hashes", "block_hash"]

DYNAMO_HASH_SEED = 1337
_M64 = (1 << 64) - 1

_P32_1, _P32_2, _P32_3 = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D
_P64_1, _P64_2, _P64_3 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
_P64_4, _P64_5 = 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5
_PMX1, _PMX2 = 0x165667919E3779F9, 0x9FB21C651E98DF25

_SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e"
)
assert len(_SECRET) == 192


def _r64(b: bytes, i: int) -> int:
    return int.from_bytes(b[i : i + 8], "little")


def _r32(b: bytes, i: int) -> int:
    return int.from_bytes(b[i : i + 4], "little")


def _fold(a: int, b: int) -> int:
    p = a * b
    return (p ^ (p >> 64)) & _M64


def _avalanche(h: int) -> int:
    h ^= h >> 37
    h = (h * _PMX1) & _M64
    return h ^ (h >> 32)


def _xxh64_avalanche(h: int) -> int:
    h ^= h >> 33
    h = (h * _P64_2) & _M64
    h ^= h >> 29
    h = (h * _P64_3) & _M64
    return h ^ (h >> 32)


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M64


def _mix16(d: bytes, i: int, s: int, seed: int) -> int:
    return _fold(_r64(d, i) ^ ((_r64(_SECRET, s) + seed) & _M64), _r64(d, i + 8) ^ ((_r64(_SECRET, s + 8) - seed) & _M64))


def _len_0to16(d: bytes, n: int, seed: int) -> int:
    if n > 8:
        lo = _r64(d, 0) ^ (((_r64(_SECRET, 24) ^ _r64(_SECRET, 32)) + seed) & _M64)
        hi = _r64(d, n - 8) ^ (((_r64(_SECRET, 40) ^ _r64(_SECRET, 48)) - seed) & _M64)
        swapped = int.from_bytes(lo.to_bytes(8, "little"), "big")
        return _avalanche((n + swapped + hi + _fold(lo, hi)) & _M64)
    if n >= 4:
        s32 = seed & 0xFFFFFFFF
        seed = (seed ^ (int.from_bytes(s32.to_bytes(4, "little"), "big") << 32)) & _M64
        inp = (_r32(d, n - 4) + (_r32(d, 0) << 32)) & _M64
        h = inp ^ (((_r64(_SECRET, 8) ^ _r64(_SECRET, 16)) - seed) & _M64)
        h ^= _rotl(h, 49) ^ _rotl(h, 24)
        h = (h * _PMX2) & _M64
        h ^= (h >> 35) + n
        h = (h * _PMX2) & _M64
        return h ^ (h >> 28)
    if n > 0:
        combined = (d[0] << 16) | (d[n >> 1] << 24) | d[n - 1] | (n << 8)
        return _xxh64_avalanche(combined ^ (((_r32(_SECRET, 0) ^ _r32(_SECRET, 4)) + seed) & _M64))
    return _xxh64_avalanche(seed ^ _r64(_SECRET, 56) ^ _r64(_SECRET, 64))


def _len_17to128(d: bytes, n: int, seed: int) -> int:
    acc = (n * _P64_1) & _M64
    if n > 32:
        if n > 64:
            if n > 96:
                acc += _mix16(d, 48, 96, seed) + _mix16(d, n - 64, 112, seed)
            acc += _mix16(d, 32, 64, seed) + _mix16(d, n - 48, 80, seed)
        acc += _mix16(d, 16, 32, seed) + _mix16(d, n - 32, 48, seed)
    acc += _mix16(d, 0, 0, seed) + _mix16(d, n - 16, 16, seed)
    return _avalanche(acc & _M64)


def _len_129to240(d: bytes, n: int, seed: int) -> int:
    acc = (n * _P64_1) & _M64
    for i in range(8):
        acc += _mix16(d, 16 * i, 16 * i, seed)
    acc = _avalanche(acc & _M64)
    for i in range(8, n // 16):
        acc += _mix16(d, 16 * i, 16 * (i - 8) + 3, seed)
    acc += _mix16(d, n - 16, 136 - 17, seed)
    return _avalanche(acc & _M64)


def _custom_secret(seed: int) -> bytes:
    if seed == 0:
        return _SECRET
    w = struct.unpack("<24Q", _SECRET)
    return struct.pack("<24Q", *[(v + seed if k % 2 == 0 else v - seed) & _M64 for k, v in enumerate(w)])


def _acc512(acc: list[int], d: bytes, i: int, sec: bytes, s: int) -> None:
    dv = struct.unpack_from("<8Q", d, i)
    sv = struct.unpack_from("<8Q", sec, s)
    for k in range(8):
        key = dv[k] ^ sv[k]
        acc[k ^ 1] = (acc[k ^ 1] + dv[k]) & _M64
        acc[k] = (acc[k] + (key & 0xFFFFFFFF) * (key >> 32)) & _M64


def _long(d: bytes, n: int, seed: int) -> int:
    sec = _custom_secret(seed)
    acc = [_P32_3, _P64_1, _P64_2, _P64_3, _P64_4, _P32_2, _P64_5, _P32_1]
    stripes_per_block = (192 - 64) // 8
    block_len = 64 * stripes_per_block
    nb_blocks = (n - 1) // block_len
    scramble = struct.unpack_from("<8Q", sec, 192 - 64)
    for b in range(nb_blocks):
        for s in range(stripes_per_block):
            _acc512(acc, d, b * block_len + s * 64, sec, s * 8)
        for k in range(8):
            a = acc[k]
            a ^= a >> 47
            a ^= scramble[k]
            acc[k] = (a * _P32_1) & _M64
    for s in range(((n - 1) - block_len * nb_blocks) // 64):
        _acc512(acc, d, nb_blocks * block_len + s * 64, sec, s * 8)
    _acc512(acc, d, n - 64, sec, 192 - 64 - 7)
    result = (n * _P64_1) & _M64
    for k in range(4):
        result += _fold(acc[2 * k] ^ _r64(sec, 11 + 16 * k), acc[2 * k + 1] ^ _r64(sec, 11 + 16 * k + 8))
    return _avalanche(result & _M64)


def xxh3_64_pure(data: bytes, seed: int = 0) -> int:
    """XXH3_64bits_withSeed in pure Python (reference implementation)."""
    seed &= _M64
    n = len(data)
    if n <= 16:
        return _len_0to16(data, n, seed)
    if n <= 128:
        return _len_17to128(data, n, seed)
    if n <= 240:
        return _len_129to240(data, n, seed)
    return _long(data, n, seed)


try:  # optional C accelerator: the same function (checked by tests/kv/test_hashing.py)
    import xxhash as _xxhash

    def xxh3_64(data: bytes, seed: int = 0) -> int:
        return _xxhash.xxh3_64_intdigest(data, seed=seed & _M64)

except ImportError:  # pragma: no cover - depends on the environment
    _xxhash = None
    xxh3_64 = xxh3_64_pure


def token_bytes(tokens: Sequence[int]) -> bytes:
    """Tokens as little-endian u32 (raises ``ValueError`` for a token outside [0, 2**32))."""
    try:
        return struct.pack(f"<{len(tokens)}I", *tokens)
    except struct.error as e:
        raise ValueError(f"token ids must be integers in [0, 2**32): {e}") from None


def block_hash(block_tokens: Sequence[int]) -> int:
    """Dynamo's local hash of one block's tokens."""
    return xxh3_64(token_bytes(block_tokens), DYNAMO_HASH_SEED)


def block_hashes(tokens: Sequence[int], block_size: int) -> list[int]:
    """``dynamo.llm.compute_block_hash_for_seq(tokens, block_size)``: one hash per full block."""
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    data = token_bytes(tokens)
    step = 4 * block_size
    return [xxh3_64(data[i : i + step], DYNAMO_HASH_SEED) for i in range(0, (len(tokens) // block_size) * step, step)]
