"""Fixtures of the transfer tests: one backend per kind that runs here, and a peer to move bytes with.

``transport_kind`` is parametrized over "nixl" (when importable), "tcp" and "local". ``pair``
gives a ``Pair``: this process's backend and registered host pool, the peer's ``RemotePool``, and a
``PeerCtl`` that fills/digests the peer's pool. For nixl and tcp the peer is a second PROCESS
(tests/transport/peer_proc.py) whose PeerInfo goes through the real etcd fixture; for "local" it is a
second LocalBackend of this process. NIXL: one agent per test process (session scope), since two
agents in one process silently use TCP.
"""

from __future__ import annotations

import asyncio
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from dynamo_ext.transport import KvLayout, KvPool, PeerInfo, RemotePool, preset
from dynamo_ext.transport.fallbacks import LocalBackend, TcpBackend
from dynamo_ext.transport.fallbacks.cma import CmaBackend, cma_available
from dynamo_ext.transport.fallbacks.shm import ShmBackend, shm_available
from dynamo_ext.transport.nixl_backend import nixl_available
from dynamo_ext.transport.probe import PeerProcess, digest, pattern

os.environ.setdefault("UCX_NET_DEVICES", "lo")
PEER_SCRIPT = [sys.executable, str(Path(__file__).with_name("peer_proc.py"))]
KINDS = ((["nixl"] if nixl_available() else []) + ["tcp"] + (["cma"] if cma_available() else [])
         + (["shm"] if shm_available() else []) + ["local"])
BACKENDS = {"tcp": TcpBackend, "cma": CmaBackend, "shm": ShmBackend}


def small_layout(num_blocks: int = 64) -> KvLayout:
    return preset("tiny", num_blocks)  # 2 layers, 2 heads, dim 16, fp32: 2 KiB chunks, 8 KiB blocks


async def etcd_get(url: str, key: str, timeout: float = 10.0) -> bytes:
    from etcd3aio import Etcd3Client

    async with Etcd3Client([url.split("://", 1)[-1]]) as c:
        r = await c.kv.get(key, timeout=timeout)
        assert r.kvs, f"no PeerInfo under {key}"
        return bytes(r.kvs[0].value)


def start_peer(kind: str, name: str, layout: KvLayout, etcd_url: str, seed: int = 7,
               staging_bytes: int = 0) -> tuple[PeerProcess, PeerInfo]:
    """Start a peer process; return it and the PeerInfo read back from etcd (not from its stdout)."""
    key = f"/dynamo_ext/tests/transport/{name}"
    proc = PeerProcess.start(backend=kind, name=name, layout=layout, seed=seed, script=PEER_SCRIPT,
                             extra=["--etcd", etcd_url, "--key", key, "--staging-bytes", str(staging_bytes)])
    try:
        with ThreadPoolExecutor(1) as ex:  # callers may be inside a running event loop
            info = PeerInfo.decode(ex.submit(asyncio.run, etcd_get(etcd_url, key)).result(timeout=30))
    except BaseException:
        proc.kill()
        raise
    assert info == proc.info
    return proc, info


class PeerCtl:
    """Uniform control of the peer's pool (a process, or an in-process pool)."""

    def __init__(self, proc: PeerProcess | None = None, pool: KvPool | None = None,
                 backend: LocalBackend | None = None) -> None:
        self.proc, self.pool, self.backend = proc, pool, backend

    async def fill(self, seed: int) -> None:
        if self.proc:
            await self.proc.acall({"cmd": "fill", "seed": seed})
        else:
            pattern(self.pool.host_view(), seed)

    async def digest(self, blocks: list[int] | None = None) -> str:
        if self.proc:
            return (await self.proc.acall({"cmd": "digest", "blocks": blocks}))["sha256"]
        return digest(self.pool.host_view(), self.pool.layout, blocks)

    async def add_peer(self, info: PeerInfo) -> None:
        """Let the peer know us (it acks staged WRITEs with a notification)."""
        if self.proc:
            import base64

            await self.proc.acall({"cmd": "add_peer", "info": base64.b64encode(info.encode()).decode()})
        elif not self.backend.has_peer(info.agent_name):
            self.backend.add_peer(info)

    async def notifs(self) -> dict[str, list[bytes]]:
        if self.proc:
            r = (await self.proc.acall({"cmd": "notifs"}))["notifs"]
            return {k: [bytes.fromhex(m) for m in v] for k, v in r.items()}
        return self.backend.get_notifs()


@dataclass
class Pair:
    kind: str
    backend: Any
    pool: KvPool
    remote: RemotePool
    peer: PeerCtl
    layout: KvLayout

    def extra_pool(self, name: str, layout: KvLayout, fill: int = 0) -> KvPool:
        """Another registered local pool (NIXL: registered once per session and reused)."""
        if self.kind == "nixl":
            pool = _session_pool(self.backend, name, layout)
        else:
            pool = KvPool.allocate_host(name, layout, shared=self.kind == "shm")
            self.backend.register_pool(pool)
        pool.host_view().fill(fill)
        return pool


@pytest.fixture(scope="session")
def nixl_backend() -> Iterator[Any]:
    if not nixl_available():
        pytest.skip("nixl not importable")
    from dynamo_ext.transport.nixl_backend import NixlBackend

    be = NixlBackend(f"test-{os.getpid()}")
    pools: dict[str, KvPool] = {}
    be.test_pools = pools  # type: ignore[attr-defined]
    yield be
    be.close_sync()


def _session_pool(be: Any, name: str, layout: KvLayout) -> KvPool:
    """NIXL pools are registered once per test session (never per test), like a worker would."""
    pools = be.test_pools
    if name not in pools:
        pools[name] = KvPool.allocate_host(name, layout)
        be.register_pool(pools[name])
    return pools[name]


@pytest.fixture(scope="module")
def module_peers(shared_etcd) -> Iterator[dict[str, tuple[PeerProcess, PeerInfo]]]:
    """One long-lived peer process per remote backend kind (started on first use)."""
    peers: dict[str, tuple[PeerProcess, PeerInfo]] = {}

    def get(kind: str) -> tuple[PeerProcess, PeerInfo]:
        proc = peers.get(kind)
        if proc is None or proc[0].proc.poll() is not None:
            peers[kind] = start_peer(kind, f"peer-{kind}-{os.getpid()}-{len(peers)}", small_layout(), shared_etcd.url,
                                     staging_bytes=small_layout().pool_bytes)
        return peers[kind]

    yield get  # type: ignore[misc]
    for proc, _ in peers.values():
        proc.close()


@pytest.fixture(params=KINDS)
def transport_kind(request) -> str:
    return request.param


@pytest.fixture
async def pair(transport_kind, module_peers, request) -> Any:
    layout = small_layout()
    if transport_kind == "local":
        be = LocalBackend(f"local-a-{id(request)}")
        other = LocalBackend(f"local-b-{id(request)}")
        pool = KvPool.allocate_host("kv", layout)
        rpool = KvPool.allocate_host("kv", layout)
        be.register_pool(pool)
        other.register_pool(rpool)
        be.register_pool(KvPool.allocate_host("staging", layout), staging=True)
        other.register_pool(KvPool.allocate_host("staging", layout), staging=True)
        pattern(rpool.host_view(), 7)
        be.add_peer(other.local_peer_info())
        yield Pair("local", be, pool, RemotePool(other.agent_name, rpool.descriptor()), PeerCtl(pool=rpool, backend=other),
                   layout)
        await be.close()
        await other.close()
        return
    proc, info = module_peers(transport_kind)
    if transport_kind == "nixl":
        be = request.getfixturevalue("nixl_backend")
        pool = _session_pool(be, "kv", layout)
        if be.staging_pool is None:
            be.register_pool(KvPool.allocate_host("staging", layout), staging=True)
        if not be.has_peer(info.agent_name):
            be.add_peer(info)
    else:
        be = BACKENDS[transport_kind](f"{transport_kind}-a-{os.getpid()}")
        await be.start()
        shared = transport_kind == "shm"  # the shm backend registers pools in shared memory only
        pool = KvPool.allocate_host("kv", layout, shared=shared)
        be.register_pool(pool)
        be.register_pool(KvPool.allocate_host("staging", layout, shared=shared), staging=True)
        be.add_peer(info)
    pool.host_view().fill(0)
    ctl = PeerCtl(proc=proc)
    await ctl.fill(7)
    yield Pair(transport_kind, be, pool, RemotePool(info.agent_name, info.pool("kv")), ctl, layout)
    if transport_kind in BACKENDS:
        await be.close()


def scattered(n: int, k: int, seed: int) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).permutation(n)[:k]]


