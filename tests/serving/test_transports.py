"""serving.WorkerTransports between two real processes (host memory, one host): the pull uses the backend that
``topology.select_transport`` picks for the pair, forcing ``tcp`` works, a worker without NIXL still serves,
and a backend that fails for a peer is replaced by the next one (and skipped for that peer afterwards).
Every pull is checked byte for byte against the source pattern: each pulled block equals the source block
it came from, and no other block of the destination changed."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest

from dynamo_ext.serving.transports import PeerTransports, PullFailed, TransportOptions, WorkerTransports
from dynamo_ext.topology import collect_local_topology
from dynamo_ext.topology.select import Endpoint, select_transport
from dynamo_ext.transport import KvPool, PeerInfo, preset
from dynamo_ext.transport.fallbacks.cma import cma_available
from dynamo_ext.transport.fallbacks.shm import shm_available
from dynamo_ext.transport.verify import pattern

HERE = Path(__file__).parent
BLOCKS = 64
SEED = 7


class Peer:
    def __init__(self, *args: str, hide_nixl: bool = False) -> None:
        env = dict(os.environ)
        env.setdefault("UCX_NET_DEVICES", "lo")
        if hide_nixl:
            env["PYTHONPATH"] = os.pathsep.join([str(HERE / "hide_nixl"), env.get("PYTHONPATH", "")])
        self.p = subprocess.Popen([sys.executable, str(HERE / "transport_peer.py"), "--blocks", str(BLOCKS),
                                   "--seed", str(SEED), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, env=env, text=True)
        line = self.p.stdout.readline()
        while line and not line.startswith("{"):  # NIXL logs to stdout
            line = self.p.stdout.readline()
        assert line, f"peer exited with {self.p.wait()}"
        self.ready = json.loads(line)
        self.blob = bytes.fromhex(self.ready["blob"])

    def close(self) -> None:
        try:
            self.p.stdin.write("exit\n")
            self.p.stdin.close()
            self.p.wait(10)
        except Exception:  # noqa: BLE001
            self.p.kill()


def _local(options: TransportOptions, shared: bool = False) -> tuple[WorkerTransports, KvPool]:
    pool = KvPool.allocate_host("kv-decode", preset("tiny", BLOCKS), pin=False, shared=shared)
    topo = collect_local_topology(None)
    return WorkerTransports(f"local-{topo.pid}", pool, Endpoint(topo, topo.pid, "host"), options), pool


def _check_bytes(pool: KvPool, src: list[int], dst: list[int]) -> None:
    """Every pulled block equals its source block (the peer's pattern); every other block is untouched (0)."""
    lay = pool.layout
    ref = np.empty(lay.pool_bytes, dtype=np.uint8)
    pattern(ref, SEED)
    got = pool.buffer
    for s, d in zip(src, dst):
        for layer in range(lay.num_layers):
            for kv in (0, 1):
                so, do, n = lay.chunk_offset(s, layer, kv), lay.chunk_offset(d, layer, kv), lay.chunk_bytes
                assert np.array_equal(got[do:do + n], ref[so:so + n]), (s, d, layer, kv)
    untouched = [b for b in range(BLOCKS) if b not in set(dst)]
    for b in untouched:
        for layer in range(lay.num_layers):
            for kv in (0, 1):
                o = lay.chunk_offset(b, layer, kv)
                assert not got[o:o + lay.chunk_bytes].any(), ("touched", b)


def _ids(seed: int, n: int = 24) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    return rng.sample(range(BLOCKS), n), rng.sample(range(BLOCKS), n)


async def test_pull_uses_the_backend_select_transport_picks():
    peer = Peer()
    ts, pool = _local(TransportOptions())
    try:
        await ts.start()
        pt = PeerTransports.decode(peer.blob)
        want = select_transport(ts.endpoint, pt.endpoint()).backends
        assert want[:2] == ("shm", "cma")  # pools outside shared memory here: shm is not started, cma serves
        assert "shm" not in ts.backends and "shared memory" in ts.skipped["shm"]
        src, dst = _ids(1)
        res = await ts.pull(pt, "kv-prefill", src, dst, deadline_s=10)
        expected = next(b for b in want if b in ts.backends and b in pt.backends)
        assert (res.backend, res.kind, res.failed) == (expected, "host-shm", [])
        assert res.stats.bytes == len(src) * pool.layout.block_bytes
        _check_bytes(pool, src, dst)
    finally:
        await ts.close()
        peer.close()


async def test_forced_tcp_pulls_over_tcp():
    peer = Peer("--force", "tcp")
    ts, pool = _local(TransportOptions(force="tcp"))
    try:
        await ts.start()
        pt = PeerTransports.decode(peer.blob)
        src, dst = _ids(2)
        res = await ts.pull(pt, "kv-prefill", src, dst, deadline_s=10)
        assert (res.backend, res.kind) == ("tcp", "tcp")
        _check_bytes(pool, src, dst)
    finally:
        await ts.close()
        peer.close()


async def test_without_nixl_the_other_backends_serve():
    peer = Peer(hide_nixl=True)
    ts, pool = _local(TransportOptions(nixl=False))  # kv_transfer.backend: fallback
    try:
        await ts.start()
        assert "nixl" not in ts.backends and "nixl" in ts.skipped
        assert "nixl" not in peer.ready["backends"] and "does not import" in peer.ready["skipped"]["nixl"]
        pt = PeerTransports.decode(peer.blob)
        src, dst = _ids(3)
        res = await ts.pull(pt, "kv-prefill", src, dst, deadline_s=10)
        assert res.backend in ("cma", "tcp")
        _check_bytes(pool, src, dst)
    finally:
        await ts.close()
        peer.close()


@pytest.mark.skipif(not cma_available(), reason="needs process_vm_readv")
async def test_a_failing_backend_falls_back_to_the_next_and_is_skipped_for_that_peer():
    peer = Peer()
    ts, pool = _local(TransportOptions())
    try:
        await ts.start()
        good = PeerTransports.decode(peer.blob)
        # the peer's cma entry names a process that does not exist: cma fails for this peer, NIXL takes over
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        cma = msgspec.structs.replace(PeerInfo.decode(good.backends["cma"]), pid=dead.pid)
        bad = msgspec.structs.replace(good, backends={**good.backends, "cma": cma.encode()})
        src, dst = _ids(4)
        res = await ts.pull(bad, "kv-prefill", src, dst, deadline_s=10)
        assert [b for b, _ in res.failed] == ["cma"] and res.backend == "nixl", res
        _check_bytes(pool, src, dst)
        _, order = ts.order(bad)
        assert order[0] == "nixl" and "cma" not in order  # backed off for this peer
        with pytest.raises(PullFailed, match="no common transport backend"):
            await ts.pull(msgspec.structs.replace(bad, backends={"cma": cma.encode()}), "kv-prefill", src, dst,
                          deadline_s=5)
    finally:
        await ts.close()
        peer.close()


@pytest.mark.skipif(not shm_available(), reason="needs memfd_create / pidfd_open")
async def test_shared_pools_pull_over_shm_and_an_unmappable_segment_falls_back():
    peer = Peer("--shared")
    ts, pool = _local(TransportOptions(), shared=True)  # as two workers' engine pools on the CPU
    try:
        await ts.start()
        good = PeerTransports.decode(peer.blob)
        assert "shm" in ts.backends and "shm" in good.backends
        src, dst = _ids(5)
        res = await ts.pull(good, "kv-prefill", src, dst, deadline_s=10)
        assert (res.backend, res.kind, res.failed) == ("shm", "host-shm", []), res
        _check_bytes(pool, src, dst)
        if cma_available():  # without its compiled loop shm copies in Python: cma (2 threads) goes first
            native, ts.backends["shm"].native = ts.backends["shm"].native, False
            assert ts.order(good)[1][:2] == ["cma", "shm"]
            ts.backends["shm"].native = native
            assert ts.order(good)[1][:2] == (["shm", "cma"] if native else ["cma", "shm"])
        # the peer's shm entry advertises a segment that is not the file behind its fd: refused at add_peer,
        # the pull goes on over the next backend, and shm is skipped for that peer afterwards
        info = PeerInfo.decode(good.backends["shm"])
        d = info.pools[0]
        forged = msgspec.structs.replace(info, pools=[
            msgspec.structs.replace(d, shm=msgspec.structs.replace(d.shm, inode=d.shm.inode + 1))])
        bad = msgspec.structs.replace(good, backends={**good.backends, "shm": forged.encode()})
        pool.buffer[:] = 0
        src, dst = _ids(6)
        res = await ts.pull(bad, "kv-prefill", src, dst, deadline_s=10)
        assert [b for b, _ in res.failed] == ["shm"] and "not the advertised" in res.failed[0][1], res
        assert res.backend == ("cma" if cma_available() else "nixl")
        _check_bytes(pool, src, dst)
        assert "shm" not in ts.order(bad)[1]
    finally:
        await ts.close()
        peer.close()


async def test_forcing_shm_without_shared_memory_fails_at_start_naming_the_field():
    ts, _pool = _local(TransportOptions(force="shm"))  # a pool outside shared memory
    with pytest.raises(RuntimeError, match="kv_transfer.transport: shm is forced"):
        await ts.start()
    await ts.close()


def test_forcing_a_transport_this_host_cannot_use_fails_at_start_naming_the_field():
    ts, _pool = _local(TransportOptions(force="nvlink"))
    import asyncio

    with pytest.raises(ValueError, match="kv_transfer.transport"):
        asyncio.run(ts.start())


def test_malformed_peer_transports_are_refused():
    from dynamo_ext.transport import MalformedPeerInfo

    with pytest.raises(MalformedPeerInfo):
        PeerTransports.decode(b"\x80\x04not msgpack")
    ok = PeerTransports(name="x", topology=collect_local_topology(None).to_dict(), device=None, backends={})
    # a backend this version does not know (a newer peer, rolling upgrade) is left out, the others kept
    newer = PeerTransports.decode(msgspec.structs.replace(ok, backends={"rdma-magic": b""}).encode())
    assert newer.backends == {}
    # a known backend's info is still validated
    with pytest.raises(MalformedPeerInfo):
        PeerTransports.decode(msgspec.structs.replace(ok, backends={"tcp": b"\x80garbage"}).encode())
