"""Tiers: G1 -> G2 -> G3 and back, byte-exact, with NIXL's POSIX backend for the file tier."""

from __future__ import annotations

import numpy as np
import pytest

from dynamo_ext.kv.pool import DoubleFree, OutOfBlocks
from dynamo_ext.kv.tiers import SlotAllocator, Tier, TieredStore, TierHandle, block_major, local_copy
from dynamo_ext.transport.errors import InvalidBlocks, LayoutMismatch, UnregisteredMemory
from dynamo_ext.transport.layout import KvLayout
from dynamo_ext.transport.pool import KvPool

try:
    import nixl._api  # noqa: F401

    HAVE_NIXL = True
except ImportError:
    HAVE_NIXL = False
needs_nixl = pytest.mark.skipif(not HAVE_NIXL, reason="needs NIXL")

LAYOUT = KvLayout(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype="float16", num_blocks=12)


def _block_bytes(pool: KvPool, b: int) -> bytes:
    """Every chunk of block b, in canonical (layer, kv) order, wherever the layout puts it."""
    lay, v = pool.layout, pool.host_view()
    return b"".join(
        v[o : o + lay.chunk_bytes].tobytes()
        for o in (lay.chunk_offset(b, layer, kv) for layer in range(lay.num_layers) for kv in (0, 1))
    )


def _g1(name: str = "g1") -> KvPool:
    pool = KvPool.allocate_host(name, LAYOUT, pin=False)
    pool.host_view()[:] = np.random.default_rng(7).integers(0, 256, pool.nbytes, dtype=np.uint8)
    return pool


@pytest.fixture
def store(tmp_path):
    s = TieredStore.create(_g1(), g2_blocks=4, g3_path=str(tmp_path / "kv.bin"), g3_blocks=6, name="t")
    yield s
    s.close()


@needs_nixl
def test_round_trip_g1_g2_g3_g1_is_byte_exact(store):
    g1 = store.g1
    src = [3, 1, 7]
    want = [_block_bytes(g1, b) for b in src]
    h2 = store.offload(src, Tier.G2)
    assert [h.tier for h in h2] == [Tier.G2] * 3 and store.free_slots(Tier.G2) == 1
    h3 = store.move(h2, Tier.G3)
    assert [h.tier for h in h3] == [Tier.G3] * 3 and store.free_slots(Tier.G2) == 4
    store.g2.host_view()[:] = 0xEE  # G2 reused by others: the file still holds the bytes
    g1.host_view()[:] = 0  # G1 blocks gone
    dst = [0, 11, 5]
    store.onload(h3, dst)
    assert [_block_bytes(g1, b) for b in dst] == want
    # nothing else in G1 was written
    untouched = [b for b in range(LAYOUT.num_blocks) if b not in dst]
    assert all(_block_bytes(g1, b) == bytes(LAYOUT.block_bytes) for b in untouched)
    # and back up to G2, then G1 again, from a mix of tiers
    h_mix = store.move(h3[:1], Tier.G2) + h3[1:]
    g1.host_view()[:] = 0
    store.onload(h_mix, [2, 4, 6])
    assert [_block_bytes(g1, b) for b in (2, 4, 6)] == want
    store.release(h_mix)
    assert store.free_slots(Tier.G2) == 4 and store.free_slots(Tier.G3) == 6


@needs_nixl
def test_offload_straight_to_file_and_onload(store):
    g1 = store.g1
    want = [_block_bytes(g1, b) for b in range(6)]
    hs = store.offload(list(range(6)), Tier.G3)
    assert store.free_slots(Tier.G2) == 4  # staging slots returned
    g1.host_view()[:] = 1
    store.onload(hs[::-1], list(range(6, 12)))
    assert [_block_bytes(g1, b) for b in range(6, 12)] == want[::-1]


@needs_nixl
def test_slot_shortage_and_double_release(store):
    with pytest.raises(OutOfBlocks):
        store.offload([0, 1, 2, 3, 4], Tier.G2)
    assert store.free_slots(Tier.G2) == 4
    hs = store.offload([0, 1], Tier.G2)
    store.release(hs)
    with pytest.raises(DoubleFree):
        store.release(hs)
    with pytest.raises(DoubleFree):
        store.onload([TierHandle(Tier.G3, 0)], [0])
    h3 = store.offload(list(range(6)), Tier.G3)  # 6 blocks through 4 G2 slots: two rounds
    with pytest.raises(OutOfBlocks):  # G3 full
        store.offload([0], Tier.G3)
    h2 = store.offload([0, 1, 2, 3], Tier.G2)
    with pytest.raises(OutOfBlocks):  # no G2 slot left to stage file blocks through
        store.onload(h3[:1], [0])
    with pytest.raises(OutOfBlocks):
        store.move(h3[:1], Tier.G2)
    store.release(h2[:1])
    g1 = store.g1
    want = [_block_bytes(g1, b) for b in range(6)]
    g1.host_view()[:] = 3
    store.onload(h3, list(range(6)))  # one staging slot: six rounds
    assert [_block_bytes(g1, b) for b in range(6)] == want
    assert store.free_slots(Tier.G2) == 1 and store.free_slots(Tier.G3) == 0


def test_local_copy_between_orders_and_layout_check():
    g1 = _g1("a")
    other = KvPool.allocate_host("b", block_major(LAYOUT, 5), pin=False)
    local_copy(g1, [9, 2], other, [4, 0])
    assert _block_bytes(other, 4) == _block_bytes(g1, 9) and _block_bytes(other, 0) == _block_bytes(g1, 2)
    bad = KvPool.allocate_host("c", KvLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4,
                                             dtype="float16", num_blocks=4), pin=False)
    with pytest.raises(LayoutMismatch):
        local_copy(g1, [0], bad, [0])
    with pytest.raises(LayoutMismatch):
        TieredStore(g1, bad)


@needs_nixl
def test_file_io_checks(tmp_path):
    from dynamo_ext.transport.file_tier import NixlFileIO

    io = NixlFileIO("t-io-checks")
    host = KvPool.allocate_host("h", block_major(LAYOUT, 2), pin=False)
    f = KvPool.open_file("f", block_major(LAYOUT, 2), str(tmp_path / "f.bin"))
    try:
        with pytest.raises(UnregisteredMemory):
            io.write(host, f, [(0, 0, 16)])
        io.register(host)
        io.register(f)
        with pytest.raises(InvalidBlocks):
            io.write(host, f, [(0, f.nbytes - 8, 16)])
        host.host_view()[:16] = np.arange(16, dtype=np.uint8)
        assert io.write(host, f, [(0, 100, 16)]) == 16
        with open(tmp_path / "f.bin", "rb") as fh:
            fh.seek(100)
            assert fh.read(16) == bytes(range(16))
    finally:
        io.close()
        f.close()


def test_slot_allocator():
    a = SlotAllocator(3)
    s = a.allocate(2)
    with pytest.raises(OutOfBlocks):
        a.allocate(2)
    with pytest.raises(DoubleFree):
        a.free([s[0], s[0]])
    a.free(s)
    assert a.num_free == 3


def _torch_pool(name: str, device: str):
    """A G1 pool of kind DEVICE over a torch tensor (on CPU it exercises the torch copy path)."""
    import torch

    from dynamo_ext.transport.pool import MemoryKind

    g = torch.Generator().manual_seed(11)
    t = torch.randint(0, 256, (LAYOUT.pool_bytes,), dtype=torch.uint8, generator=g).to(device)
    return KvPool(name, LAYOUT, MemoryKind.DEVICE, t, addr=t.data_ptr(), nbytes=t.numel())


def _torch_block(pool: KvPool, b: int) -> bytes:
    lay, t = pool.layout, pool.tensor_u8().cpu().numpy()
    return b"".join(
        t[o : o + lay.chunk_bytes].tobytes()
        for o in (lay.chunk_offset(b, layer, kv) for layer in range(lay.num_layers) for kv in (0, 1))
    )


def _device_round_trip(g1: KvPool, tmp_path) -> None:
    """G1 (torch) -> G2 and G3 -> G1; G3 only where NIXL is installed."""
    g2 = KvPool.allocate_host("dg2", block_major(LAYOUT, 3), pin=False)
    io = g3 = None
    if HAVE_NIXL:
        from dynamo_ext.transport.file_tier import NixlFileIO

        io = NixlFileIO("dev-io")
        g3 = KvPool.open_file("dg3", block_major(LAYOUT, 5), str(tmp_path / "d.bin"))
    store = TieredStore(g1, g2, g3, io)
    try:
        src = [4, 0, 9, 10]
        want = [_torch_block(g1, b) for b in src]
        h = store.offload(src[:2], Tier.G2) + store.offload(src[2:], Tier.G3 if HAVE_NIXL else Tier.G2)
        g1.tensor_u8().zero_()
        store.onload(h, [1, 2, 3, 11])
        assert [_torch_block(g1, b) for b in (1, 2, 3, 11)] == want
        assert _torch_block(g1, 0) == bytes(LAYOUT.block_bytes)
    finally:
        if io is not None:
            io.close()
            g3.close()


def test_torch_copy_path_on_cpu(tmp_path):
    pytest.importorskip("torch")
    _device_round_trip(_torch_pool("cpu-g1", "cpu"), tmp_path)


@pytest.mark.parametrize("src_kind", ["torch", "host"])
def test_staged_copy_gathers_copies_once_and_scatters(src_kind):
    """The cross-device path (gather, one copy, scatter), run on CPU tensors."""
    pytest.importorskip("torch")
    from dynamo_ext.kv.tiers import staged_copy

    src = _torch_pool("s", "cpu") if src_kind == "torch" else _g1("s")
    dst = KvPool.allocate_host("d", block_major(LAYOUT, 6), pin=False)
    assert staged_copy(src, [7, 0, 11], dst, [5, 1, 2]) == 3 * LAYOUT.block_bytes
    get = _torch_block if src_kind == "torch" else _block_bytes
    assert [_block_bytes(dst, b) for b in (5, 1, 2)] == [get(src, b) for b in (7, 0, 11)]
    back = _g1("back")
    back.host_view()[:] = 0
    assert local_copy(dst, [5, 1, 2], back, [3, 4, 8], staged=True) == 3 * LAYOUT.block_bytes
    assert [_block_bytes(back, b) for b in (3, 4, 8)] == [get(src, b) for b in (7, 0, 11)]
    assert _block_bytes(back, 0) == bytes(LAYOUT.block_bytes)


@pytest.mark.gpu
def test_device_g1_round_trip(tmp_path):
    _device_round_trip(_torch_pool("cuda-g1", "cuda"), tmp_path)


@needs_nixl
def test_random_operation_sequences_keep_every_handle_byte_exact(store):
    """Random offload / move / onload / release against a model {handle: bytes it must hold}."""
    import random

    rng = random.Random(2026)
    g1 = store.g1
    held: dict[TierHandle, bytes] = {}
    done: dict[str, int] = {}
    for step in range(80):
        op = rng.choice(["offload", "offload", "move", "onload", "release", "scribble"])
        if op == "offload":
            ids = rng.sample(range(LAYOUT.num_blocks), rng.randint(1, 3))
            tier = rng.choice([Tier.G2, Tier.G3])
            want = [_block_bytes(g1, b) for b in ids]
            try:
                hs = store.offload(ids, tier)
            except OutOfBlocks:
                continue
            held.update(zip(hs, want))
        elif op == "move" and held:
            hs = rng.sample(sorted(held, key=lambda h: (h.tier.value, h.slot)), rng.randint(1, min(3, len(held))))
            try:
                new = store.move(hs, rng.choice([Tier.G2, Tier.G3]))
            except OutOfBlocks:
                continue
            for old, nh in zip(hs, new):
                held[nh] = held.pop(old)
        elif op == "onload" and held:
            hs = rng.sample(sorted(held, key=lambda h: (h.tier.value, h.slot)), rng.randint(1, min(3, len(held))))
            dst = rng.sample(range(LAYOUT.num_blocks), len(hs))
            try:
                store.onload(hs, dst)
            except OutOfBlocks:
                continue
            assert [_block_bytes(g1, b) for b in dst] == [held[h] for h in hs], step
        elif op == "release" and held:
            h = rng.choice(sorted(held, key=lambda h: (h.tier.value, h.slot)))
            store.release([h])
            del held[h]
        else:  # other writers change G1 between operations
            op = "scribble"
            b = rng.randrange(LAYOUT.num_blocks)
            off = LAYOUT.chunk_offset(b, rng.randrange(LAYOUT.num_layers), rng.randrange(2))
            g1.host_view()[off : off + 8] = rng.randrange(256)
        n2 = sum(h.tier is Tier.G2 for h in held)
        n3 = sum(h.tier is Tier.G3 for h in held)
        assert store.free_slots(Tier.G2) == 4 - n2 and store.free_slots(Tier.G3) == 6 - n3
        done[op] = done.get(op, 0) + 1
    assert all(done.get(op, 0) >= 5 for op in ("offload", "move", "onload", "release")), done
    # finally every surviving handle still holds its bytes
    for h, want in held.items():
        if h.tier is Tier.G2 or store.free_slots(Tier.G2):
            store.onload([h], [0])
            assert _block_bytes(g1, 0) == want
