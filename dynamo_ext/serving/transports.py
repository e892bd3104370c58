"""The transports of one worker: every backend its topology supports, its KV pool registered with each
once, and for every pull the backend that ``topology.select_transport`` picks for the pair, with fallback.

Who calls what, in what order::

    worker start-up         ts = WorkerTransports(name, pool, endpoint, options)
                            await ts.start()          backends this process can run for its pool's memory:
                                                      device: cuda_ipc (CUDA), nixl; host: shm (the pool in
                                                      shared memory: the engine's CPU pool is), cma (when the
                                                      kernel allows process_vm_readv), nixl, tcp. NIXL only with
                                                      kv_transfer.backend == nixl and when it imports; its UCX
                                                      environment and parameters are select_transport's for the
                                                      pairs this worker can have (process_choice). The pool is
                                                      registered once with each.
                            blob = ts.advertise().encode()        -> the worker's record / a migrate chunk
    the other side          peer = PeerTransports.decode(blob)    validated msgspec, never pickle
    each pull               res = await ts.pull(peer, remote_pool, src_ids, dst_ids, deadline_s=...)
                              order(peer): select_transport(local, peer, force).backends
                                           ∩ what both sides run for their memory
                                           − backends that failed for this peer in the last FAILED_BACKOFF_S
                                           (shm after cma when this side's shm has no compiled copy loop)
                              each in turn: add_peer (once), transport.pull(...); a TransferError ->
                              the backend is skipped for this peer for a while, the next one is tried
                              (res.failed lists them); none left -> PullFailed (the last error as cause)
    a peer is gone          ts.forget(peer_name)     drops its connections once no pull to it is in flight
    shutdown                await ts.close()

Nothing here knows of requests or Dynamo: a worker's adapter publishes the blob (etcd record) and finds a
peer's blob (record lookup, or a migrate chunk). ``PullResult.kind`` / ``.backend`` name what was used; the
transfer metrics (``dynamo_ext_kv_transfer_*{backend, path}``) are kept by ``transport`` itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from dynamo_ext.topology import NodeTopology
from dynamo_ext.topology.select import BACKEND_MEMORY, Endpoint, TransportChoice, merge_env, select_transport
from dynamo_ext.transport import (
    KvPool,
    MalformedPeerInfo,
    PeerInfo,
    RemotePool,
    TransferBackend,
    TransferError,
    TransferStats,
    make_backend,
)

log = logging.getLogger("dynamo_ext.serving.transports")

#: a backend that failed for a peer is not tried again for that peer for this long
FAILED_BACKOFF_S = 30.0
#: backends a worker may run, in the order they are started
ALL_BACKENDS: tuple[str, ...] = ("cuda_ipc", "shm", "cma", "nixl", "tcp")


class PullFailed(TransferError):
    """Every backend tried for a pull failed (``failed`` lists ``(backend, error)``)."""

    def __init__(self, message: str, failed: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.failed = failed


class PeerTransports(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a worker advertises so that another can pull from it (or push to it)."""

    name: str  # transport agent name, the same for every backend of the worker
    topology: dict[str, Any]  # NodeTopology.to_dict() of the worker's process
    device: int | None  # physical GPU index of its KV pool (GpuInfo.index), None = host memory
    backends: dict[str, bytes]  # backend name -> PeerInfo.encode()

    def encode(self) -> bytes:
        return msgspec.msgpack.encode(self)

    @classmethod
    def decode(cls, blob: bytes) -> "PeerTransports":
        try:
            pt = msgspec.msgpack.decode(blob, type=cls)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise MalformedPeerInfo(f"malformed PeerTransports: {e}") from None
        unknown = [name for name in pt.backends if name not in ALL_BACKENDS]
        if unknown:
            # a newer worker (rolling upgrade) may offer backends this version lacks: use the others
            log.info("PeerTransports of %r: backends %s unknown to this version, not used", pt.name, unknown)
            pt = msgspec.structs.replace(pt, backends={k: v for k, v in pt.backends.items() if k in ALL_BACKENDS})
        for info in pt.backends.values():
            PeerInfo.decode(info)  # validated now, not at the first pull
        try:
            NodeTopology.from_dict(pt.topology)
        except Exception as e:  # noqa: BLE001 - msgspec / ValueError: the record is malformed
            raise MalformedPeerInfo(f"PeerTransports of {pt.name!r}: bad topology: {e}") from None
        return pt

    def endpoint(self) -> Endpoint:
        t = NodeTopology.from_dict(self.topology)
        return Endpoint(t, t.pid, "host" if self.device is None else self.device)

    def info(self, backend: str) -> PeerInfo:
        return PeerInfo.decode(self.backends[backend])


@dataclass(frozen=True)
class TransportOptions:
    """The ``kv_transfer`` settings a worker's transports follow (dynamo.yaml)."""

    nixl: bool = True  # kv_transfer.backend == "nixl"; "fallback": never start NIXL
    force: str = "auto"  # kv_transfer.transport: auto | nvlink | pcie | rdma | shm | tcp
    rdma_device: str | None = None
    threads: int = 4  # kv_transfer.transport_threads: copy threads of a host-memory pull (cma, shm), <= the cores


@dataclass
class PullResult:
    stats: TransferStats
    backend: str
    kind: str  # select_transport's kind for the pair (same-gpu, nvlink, host-shm, ...)
    failed: list[tuple[str, str]] = field(default_factory=list)  # backends tried before, with their error


def process_choice(endpoint: Endpoint, options: TransportOptions) -> tuple[dict[str, str], dict[str, Any], list[str]]:
    """(UCX environment, NIXL choice dict, conflicts) for this worker's one NIXL agent: ``select_transport``
    for the pairs it can have on its host (another process on the same GPU and on every other GPU of the
    node for a GPU worker; another process's host memory for a host worker), merged (``merge_env``).
    A forced ``kv_transfer.transport`` that cannot work here raises ValueError naming the field."""
    t = endpoint.topology
    peers: list[Endpoint] = []
    if endpoint.device == "host":
        peers.append(Endpoint(t, -1, "host"))
    else:
        peers += [Endpoint(t, -1, g.index) for g in t.gpus]
    choices: list[TransportChoice] = []
    for p in peers:
        try:
            choices.append(select_transport(endpoint, p, options.force, rdma_device=options.rdma_device))
        except ValueError as e:
            if options.force != "auto":
                raise ValueError(f"kv_transfer.transport: {e}") from None
            raise
    env, conflicts = merge_env(choices)
    params: dict[str, Any] = {}
    agent_config: dict[str, Any] = {}
    for c in choices:
        for k, v in c.nixl_params.items():
            params.setdefault(k, v)
        for k, v in c.agent_config.items():
            agent_config.setdefault(k, v)
    return env, {"env": env, "params": params, "agent_config": agent_config}, conflicts


def _cuda_ipc_usable() -> str | None:
    """None when CUDA IPC can export this process's CUDA memory, else why not."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + os.environ.get("PYTORCH_ALLOC_CONF", "")
    if "expandable_segments:true" in conf.replace(" ", "").lower():
        return ("PYTORCH_CUDA_ALLOC_CONF has expandable_segments:True: CUDA memory from that allocator cannot be "
                "exported for CUDA IPC (NIXL PR 1755); unset it for KV transfers between GPU processes")
    return None


class WorkerTransports:
    def __init__(self, name: str, pool: KvPool, endpoint: Endpoint, options: TransportOptions | None = None) -> None:
        self.name = name
        self.pool = pool
        self.endpoint = endpoint
        self.options = options or TransportOptions()
        self.memory: Literal["host", "device"] = "device" if pool.kind.value == "device" else "host"
        self.backends: dict[str, TransferBackend] = {}
        self.skipped: dict[str, str] = {}  # backend -> why it is not running here
        self._peers: dict[tuple[str, str], bytes] = {}  # (backend, peer name) -> the PeerInfo blob added
        self._inflight: dict[str, int] = {}  # peer name -> pulls in flight
        self._forget: set[str] = set()  # peers to drop once their pulls are done
        self._failed: dict[tuple[str, str], float] = {}  # (peer name, backend) -> monotonic time of failure
        self._tasks: list[asyncio.Task[Any]] = []
        self.nixl_env: dict[str, str] = {}
        #: per peer name (unique per worker lifetime): its choice and remote pools, computed once (a pull pays
        #: neither select_transport nor the decoding of its PeerInfos)
        self._choice: dict[str, tuple[bytes, TransportChoice]] = {}
        self._remote: dict[tuple[str, str, str], RemotePool] = {}

    # -- start-up -----------------------------------------------------------------------------------
    def _wanted(self) -> list[str]:
        return [b for b in ALL_BACKENDS if self.memory in BACKEND_MEMORY[b]]

    def _make(self, kind: str) -> TransferBackend:
        if kind == "nixl":
            if not self.options.nixl:
                raise RuntimeError("kv_transfer.backend is 'fallback'")
            env, choice, conflicts = process_choice(self.endpoint, self.options)
            for c in conflicts:
                log.warning("NIXL environment conflict between pairs: %s", c)
            for k, v in env.items():  # what the launcher or the user set explicitly wins
                have = os.environ.get(k)
                if have is not None and have != v:
                    log.warning("%s=%s set in the environment; select_transport would use %s", k, have, v)
                    choice["env"][k] = have
            self.nixl_env = dict(choice["env"])
            try:
                import nixl._api  # noqa: F401, PLC0415 - configures NIXL's logging before the agent exists
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(f"nixl does not import: {e}") from None
            return make_backend("nixl", self.name, choice)
        if kind == "cma":
            from dynamo_ext.transport.fallbacks.cma import CmaBackend, cma_available  # noqa: PLC0415

            if not cma_available():
                raise RuntimeError("process_vm_readv is not allowed in this process")
            return CmaBackend(self.name, threads=max(1, min(self.options.threads, os.cpu_count() or 1)))
        if kind == "shm":
            from dynamo_ext.transport.fallbacks.shm import ShmBackend  # noqa: PLC0415

            return ShmBackend(self.name, threads=max(1, min(self.options.threads, os.cpu_count() or 1)))
        if kind == "cuda_ipc":
            why = _cuda_ipc_usable()
            if why:
                log.warning(why)
                raise RuntimeError(why)
        return make_backend(kind, self.name)

    async def start(self) -> None:
        """Start every backend this process can run for its pool and register the pool with each, once."""
        if self.options.force != "auto":  # a forced transport that cannot work here: fail at start-up
            process_choice(self.endpoint, self.options)
        for kind in self._wanted():
            try:
                be = self._make(kind)
                await be.start()
                be.register_pool(self.pool)
            except Exception as e:  # noqa: BLE001 - a backend that cannot run here is skipped, with the reason
                self.skipped[kind] = f"{type(e).__name__}: {e}"
                log.info("transport backend %s not started: %s", kind, self.skipped[kind])
                continue
            self.backends[kind] = be
            self._tasks.append(asyncio.ensure_future(be.serve(0.01)))  # passive side: staged protocol, notifs
        if not self.backends:
            raise RuntimeError(f"no transport backend can run for a {self.memory} pool here: {self.skipped}")
        if self.options.force == "shm" and "shm" not in self.backends:
            raise RuntimeError(f"kv_transfer.transport: shm is forced but the shm backend cannot run here: "
                               f"{self.skipped.get('shm', 'not wanted for a ' + self.memory + ' pool')}")
        log.info("transport backends: %s (skipped: %s)", list(self.backends), self.skipped or "none")

    def advertise(self) -> PeerTransports:
        dev = self.endpoint.device
        return PeerTransports(name=self.name, topology=self.endpoint.topology.to_dict(),
                              device=None if dev == "host" else int(dev),
                              backends={k: be.local_peer_info().encode() for k, be in self.backends.items()})

    # -- the choice ---------------------------------------------------------------------------------
    def choice(self, peer: PeerTransports) -> TransportChoice:
        key = peer.encode()
        hit = self._choice.get(peer.name)
        if hit is not None and hit[0] == key:
            return hit[1]
        c = select_transport(self.endpoint, peer.endpoint(), self.options.force, rdma_device=self.options.rdma_device)
        self._choice[peer.name] = (key, c)
        return c

    def _remote_pool(self, kind: str, peer: PeerTransports, pool: str) -> RemotePool:
        k = (kind, peer.name, pool)
        rp = self._remote.get(k)
        if rp is None:
            rp = self._remote[k] = RemotePool(peer.name, peer.info(kind).pool(pool))
        return rp

    def order(self, peer: PeerTransports, now: float | None = None) -> tuple[TransportChoice, list[str]]:
        """The pair's choice and the backends to try, best first (see the module docstring)."""
        c = self.choice(peer)
        peer_mem = "host" if peer.device is None else "device"
        now = time.monotonic() if now is None else now
        out = [b for b in c.backends
               if b in self.backends and b in peer.backends and peer_mem in BACKEND_MEMORY[b]
               and now - self._failed.get((peer.name, b), -1e18) >= FAILED_BACKOFF_S]
        if "shm" in out and "cma" in out and not getattr(self.backends["shm"], "native", True):
            # shm without its compiled copy loop (no C compiler here) copies in Python, as fast as cma with ONE
            # thread and slower than cma with two (benchmarks/results/transfer-cpu-shm.md): cma first then
            out.remove("shm")
            out.insert(out.index("cma") + 1, "shm")
        return c, out

    def _connect(self, kind: str, peer: PeerTransports) -> None:
        blob = peer.backends[kind]
        key = (kind, peer.name)
        be = self.backends[kind]
        if self._peers.get(key) is blob or (self._peers.get(key) == blob and be.has_peer(peer.name)):
            return
        if be.has_peer(peer.name):
            be.remove_peer(peer.name)
        be.add_peer(PeerInfo.decode(blob))
        self._peers[key] = blob
        for k in [k for k in self._remote if k[0] == kind and k[1] == peer.name]:
            del self._remote[k]

    # -- pull ---------------------------------------------------------------------------------------
    async def pull(self, peer: PeerTransports, remote_pool: str, src_ids: list[int], dst_ids: list[int], *,
                   deadline_s: float, expected_gbps: float | None = None) -> PullResult:
        """One pull of ``src_ids`` of the peer's pool into ``dst_ids`` of ours (see the module docstring)."""
        from dynamo_ext.transport import TransferOptions, pull  # noqa: PLC0415

        choice, order = self.order(peer)
        if not order:
            raise PullFailed(f"no common transport backend with {peer.name!r}: ours {list(self.backends)}, "
                             f"theirs {list(peer.backends)}, {choice.kind} wants {list(choice.backends)}"
                             + (f" (recently failed: {sorted(b for p, b in self._failed if p == peer.name)})"
                                if any(p == peer.name for p, _ in self._failed) else ""), [])
        failed: list[tuple[str, str]] = []
        t_end = time.monotonic() + deadline_s
        self._inflight[peer.name] = self._inflight.get(peer.name, 0) + 1
        try:
            for kind in order:
                left = t_end - time.monotonic()
                if left <= 0:
                    break
                try:
                    self._connect(kind, peer)
                    remote = self._remote_pool(kind, peer, remote_pool)
                    h = await pull(self.backends[kind], remote, self.pool, (list(src_ids), list(dst_ids)),
                                   TransferOptions(deadline_s=left, expected_gbps=expected_gbps))
                    stats = await h
                except (TransferError, KeyError) as e:
                    self._failed[(peer.name, kind)] = time.monotonic()
                    failed.append((kind, f"{type(e).__name__}: {e}"))
                    log.warning("pull from %s over %s failed (%s: %s)%s", peer.name, kind, type(e).__name__, e,
                                "; trying the next backend" if kind != order[-1] else "")
                    continue
                self._failed.pop((peer.name, kind), None)
                return PullResult(stats, kind, choice.kind, failed)
        finally:
            self._inflight[peer.name] -= 1
            if not self._inflight[peer.name]:
                del self._inflight[peer.name]
                if peer.name in self._forget:
                    self._drop(peer.name)
        err = PullFailed(f"pull from {peer.name!r} failed on every backend: "
                         + "; ".join(f"{k}: {m}" for k, m in failed) if failed else
                         f"pull from {peer.name!r}: deadline of {deadline_s:.3f} s passed", failed)
        raise err

    # -- peers going away ---------------------------------------------------------------------------
    def forget(self, peer_name: str) -> None:
        """Drop a peer's connections (its process is gone) once no pull to it is in flight."""
        if self._inflight.get(peer_name):
            self._forget.add(peer_name)
        else:
            self._drop(peer_name)

    def _drop(self, peer_name: str) -> None:
        self._forget.discard(peer_name)
        self._choice.pop(peer_name, None)
        for k in [k for k in self._remote if k[1] == peer_name]:
            del self._remote[k]
        for (kind, name) in [k for k in self._peers if k[1] == peer_name]:
            self._peers.pop((kind, name), None)
            try:
                self.backends[kind].remove_peer(name)
            except Exception as e:  # noqa: BLE001
                log.debug("remove_peer %s on %s: %s", name, kind, e)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for kind, be in self.backends.items():
            try:
                await be.close()
            except Exception as e:  # noqa: BLE001
                log.debug("closing %s: %s", kind, e)

    def describe(self) -> dict[str, Any]:
        return {"backends": list(self.backends), "skipped": dict(self.skipped), "nixl_env": dict(self.nixl_env)}


__all__ = ["ALL_BACKENDS", "FAILED_BACKOFF_S", "PeerTransports", "PullFailed", "PullResult", "TransportOptions",
           "WorkerTransports", "process_choice"]
