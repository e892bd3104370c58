"""KV transfer benchmark: naive vs planned descriptors vs the NIXL and copy ceilings vs the product's pull,
two processes.

Protocol::

    run_transfer_bench(size_bytes, layout_name, json_path, paths=None, reps=5, methods=None)
      0. product-pull, first, for each path (before this process creates its own NIXL agent, so the
         WorkerTransports below hold the process's only one, as in a worker); listed after the path's rows:
             a peer PROCESS (python -m dynamo_ext.bench._pull_peer) runs serving.WorkerTransports over the
             SOURCE pool on the path's source device (as a prefill worker); this process runs WorkerTransports
             over a fresh destination pool on the path's destination device and times
             WorkerTransports.pull(peer, "kv-prefill", src_ids, dst_ids, deadline_s=...) = what a decode worker
             calls: select_transport's backends for the pair (next on failure), add_peer at the first pull, one
             TransferOptions, default metrics. READs; verified like the rest (sha256 of the chunks here == there);
             the table says which backend the product chose: ``product-pull (cma)``; UCX variables the
             transports set in os.environ are restored afterwards
      for each path (host->host; with CUDA also GPU0->GPU0, GPU0->GPU1, GPU0->host):
        1. a peer PROCESS (dynamo_ext.transport.probe peer) holds the destination pool (+ staging)
           on the path's destination device; this process holds the source pool (one NIXL agent
           for the whole run, pools registered once)
        2. block ids: k = size // block_bytes blocks, source and destination ids are independent
           random subsets of pools 1.5x larger (what a busy allocator leaves)
        3. methods, each 1 warm-up + ``reps`` timed WRITEs, median GB/s, then verified (sha256 of
           the destination chunks in the peer == of the source chunks here):
             naive          transport.push(TransferOptions(planner=plan_naive)) (one descriptor per chunk)
             planned        transport.push with plan_transfer (merged runs, pool -> pool)
             planned-staged transport.push(TransferOptions(stage=True)): gather into staging here, ONE wire
                            descriptor, the peer recomputes the pure plan and scatters, then acks
             raw-single     one descriptor of the same bytes, pool -> pool (NIXL ceiling)
             memcpy / torch-copy   one local copy of the same bytes on the same devices (copy ceiling)
             cuda-ipc       (GPU->GPU paths) planned transfer through the CUDA IPC fallback backend
                            (rowcopy: Triton row kernel on one GPU; gather -> peer copy -> scatter
                            pipelined over 64 MiB slices across GPUs); cuda-ipc-torch: same, torch ops
             planned        on host->host: through make_backend("auto", memory="host") = the cma backend
                            (process_vm_writev, iovec arrays) when the kernel allows it; then the
                            NIXL row is called planned-nixl; cma-2t/-4t: cma with 2/4 copy threads;
                            cma-pull / cma-pull-2t: planned READs (process_vm_readv, 1 / 2 threads) through a
                            bare cma backend from a cma peer into a fresh pool here = product-pull's direction
                            without the serving layer
             owner-copy     (GPU->host) the GPU owner copies into its own pinned host pool:
                            transport.copy(gpu_pool, host_pool) (rowcopy.copy_device_to_host,
                            zero-copy when pinned + Triton); owner-copy-staged: gather -> D2H slots ->
                            threaded host scatter; owner-copy-zc: the row kernel stores into pinned
                            host memory directly (UVA zero-copy)
             shm / shm-2t   on host->host: planned WRITEs through the shm backend (fallbacks/shm.py): the
                            source bytes in a shared-memory pool here, the peer's pool (shared memory) mapped
                            here at add_peer, one memcpy per merged run (the compiled loop of
                            fallbacks/hostcopy.py in 1 / 2 threads); shm-pull / shm-pull-2t: planned READs
                            from a shm peer into a fresh shared pool here (product-pull's direction and
                            memory); shm-pull-py: the same READ through the python loop (no compiler)
      -> JSON {"machine", "size_bytes", "layout", "load", "results": [{path, method, gbps, descriptors,
         verified, backend (the make_backend name), direction (write | read | copy), threads, detail, ...}]}
         (product-pull adds chosen, kind, backends_used, fell_back, started, skipped, puller, peer) + a
         markdown table (rows named "backend DIRECTION method", x copy = the same run's ratio to the path's
         copy ceiling, then the best row per path and what set it: threads, descriptors, sweep config) and a
         PNG bar chart next to it. Output: ``--out PATH`` (overwritten when asked); by default a NEW
         temporary directory, printed, so committed results in benchmarks/results are never overwritten

Runs without the Dynamo runtime (torch, CUDA and nixl only). CLI: ``dynamo-ext bench transfer
--size 1GiB --layout llama3-70b [--methods product-pull,cma-pull,planned,...]`` (``python -m
dynamo_ext.bench.transfer`` is the same).  Transfers go through ``transport.push`` / ``copy`` with one
``TransferOptions`` (``pull`` for the READ rows); ``memo_planner()`` memoises plans for the sweeps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

os.environ.setdefault("UCX_NET_DEVICES", "lo")

from dynamo_ext.helpfmt import HelpFormatter  # noqa: E402
from dynamo_ext.transport import (  # noqa: E402
    KvPool,
    RemotePool,
    TransferOptions,
    copy,
    plan_naive,
    plan_transfer,
    preset,
    push,
)
from dynamo_ext.transport.fallbacks.shm import shm_available  # noqa: E402
from dynamo_ext.transport.pool import shared_memory_available  # noqa: E402
from dynamo_ext.transport.probe import PeerProcess, digest, fill_pool, pool_bytes, probe_layout  # noqa: E402

PATHS: dict[str, tuple[int, int]] = {  # name -> (source device, destination device); -1 = host memory
    "host->host": (-1, -1),
    "GPU0->GPU0": (0, 0),
    "GPU0->GPU1": (0, 1),
    "GPU0->host": (0, -1),
}
METHODS = ["naive", "planned", "planned-staged", "raw-single", "copy"]
EXTRA = ["planned-nixl", "cma-2t", "cma-4t", "cma-pull", "cma-pull-2t", "shm", "shm-2t", "shm-pull", "shm-pull-2t", "shm-pull-py", "product-pull", "cuda-ipc", "cuda-ipc-torch", "owner-copy", "owner-copy-staged",
         "owner-copy-zc", "cuda-ipc-direct", "nccl-single", "nccl-planned"]
NCCL_SLICE_BYTES = 128 << 20  # nccl-planned: gather/isend/irecv/scatter slices (0 = one message)

# One GPU run sweeps these (``--sweep``): rowcopy.TUNING overrides per row, applied through rowcopy.tune
SWEEP: dict[str, list[dict[str, Any]]] = {
    "GPU0->GPU1": [  # run 1 (4x H200, 10:06): 159 / 194 / 192 / 197 / 182 / 176 / 179 / 149 / - / - / 172
        {"cross_kernel": "staged-torch", "cross_slice_bytes": 64 << 20, "cross_slots": 2},  # default
        {"cross_kernel": "staged-torch", "cross_slice_bytes": 128 << 20, "cross_slots": 2},
        {"cross_kernel": "staged-torch", "cross_slice_bytes": 256 << 20, "cross_slots": 3},
        {"cross_kernel": "staged-torch", "cross_slice_bytes": 512 << 20, "cross_slots": 2},
        {"cross_kernel": "staged-torch", "cross_slice_bytes": 128 << 20, "cross_slots": 3, "plan_cache": True},
        {"cross_kernel": "staged-triton", "cross_slice_bytes": 256 << 20, "cross_slots": 2},
        {"cross_kernel": "direct-read", "triton_block": 4096},
        {"cross_kernel": "direct-read", "triton_block": 2048, "triton_warps": 4},
        {"cross_kernel": "direct-read", "triton_block": 4096, "plan_cache": True, "rows_cache": True},
        # last: a raw-address store into the peer GPU's mapping (run 1: Triton refused the pointer)
        {"cross_kernel": "direct-write", "triton_block": 2048},
        {"cross_kernel": "direct-write", "triton_block": 4096},
    ],
    "GPU0->GPU0": [  # run 1: block 2048 470.6, 4096 221.0, 4096/16 warps 377.4, 1024 333.6 (then timed out)
        {"triton_block": 2048},  # default
        {"triton_block": 2048, "plan_cache": True},  # H2 probe: no planning per transfer
        {"triton_block": 2048, "plan_cache": True, "rows_cache": True},  # ... nor rows_of / index upload
        {"triton_block": 2048, "triton_warps": 4},
        {"triton_block": 2048, "triton_warps": 16},
        {"triton_block": 1024, "triton_warps": 4},
        {"triton_block": 512, "triton_warps": 2},
        {"triton_block": 4096, "triton_warps": 16},
        {"triton_block": 2048, "index_cache": True},
    ],
}


def memo_planner() -> Callable[..., Any]:
    """plan_transfer(stage=False) memoised on (layouts, block ids): the same plan OBJECT for a repeated
    transfer, so rowcopy's rows_cache can key on its descriptor array (sweep key "plan_cache")."""
    memo: dict[tuple[Any, ...], Any] = {}

    def plan(sl: Any, sb: Sequence[int], dl: Any, db: Sequence[int]) -> Any:
        key = (sl, tuple(sb), dl, tuple(db))
        if key not in memo:
            memo[key] = plan_transfer(sl, sb, dl, db, stage=False)
        return memo[key]

    return plan


def _gpus() -> list[str]:
    if not os.path.exists("/dev/nvidiactl"):
        return []
    try:
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def _triton() -> bool:
    try:
        from dynamo_ext.transport.rowcopy import triton_available

        return triton_available()
    except Exception:  # noqa: BLE001
        return False


def machine_string() -> str:
    gpus = _gpus()
    try:
        import nixl  # noqa: F401
        from importlib.metadata import version

        nv = version("nixl")
    except Exception:
        nv = "absent"
    g = f"{len(gpus)}x {gpus[0]}" if gpus else "no GPU"
    return f"{platform.node()}: {os.cpu_count()} CPU cores, {g}, nixl {nv}, python {platform.python_version()}"


def default_paths() -> list[str]:
    n = len(_gpus())
    if n == 0:
        return ["host->host"]
    return ["GPU0->GPU0"] + (["GPU0->GPU1"] if n > 1 else []) + ["GPU0->host", "host->host"]


def parse_size(s: str) -> int:
    s = s.strip().lower()
    for suf, mul in (("gib", 1 << 30), ("mib", 1 << 20), ("kib", 1 << 10), ("g", 1 << 30), ("m", 1 << 20)):
        if s.endswith(suf):
            return int(float(s[: -len(suf)]) * mul)
    return int(s)


class _Bench:
    """One NIXL agent for the whole run, created at its first use (``be``); pools registered once per device."""

    def __init__(self, size_bytes: int, layout_name: str, reps: int, progress: Any,
                 methods: Sequence[str] | None = None) -> None:
        self.methods = set(methods) if methods else None
        self._be: Any = None
        self.size, self.layout_name, self.reps, self.bar = size_bytes, layout_name, reps, progress
        lay1 = preset(layout_name, 1)
        self.k = max(1, size_bytes // lay1.block_bytes)
        self.layout = preset(layout_name, self.k + max(1, self.k // 2))
        self.nbytes = self.k * lay1.block_bytes
        rng = np.random.default_rng(0)
        self.src_ids = [int(x) for x in rng.permutation(self.layout.num_blocks)[: self.k]]
        self.dst_ids = [int(x) for x in rng.permutation(self.layout.num_blocks)[: self.k]]
        self.pools: dict[int, tuple[KvPool, KvPool]] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self.agent_dev = -1

    @property
    def be(self) -> Any:
        """This process's one NIXL agent, created when a row first needs it: the product-pull rows run before
        it exists, so their WorkerTransports owns the process's only agent, as in a worker."""
        if self._be is None:
            from dynamo_ext.transport.nixl_backend import NixlBackend

            self.agent_dev = 0 if _gpus() else -1  # the device whose worker choice this agent takes
            self._be = NixlBackend(f"bench-{os.getpid()}", self.nixl_choice(self.agent_dev))
        return self._be

    def nixl_choice(self, dev: int) -> dict[str, Any]:
        """The NIXL choice (UCX environment, params, agent config) a worker on ``dev`` (-1: host) uses:
        ``serving.transports.process_choice``, i.e. ``select_transport`` over the pairs of this node, so the NIXL
        rows measure the settings the workers run with (e.g. UCX_CUDA_IPC_ENABLE_GET_ZCOPY=on for GPU pairs).
        A UCX variable already set in the environment wins (as in the workers); the result records it."""
        if dev not in self._choices:
            from dynamo_ext.serving.transports import TransportOptions, process_choice
            from dynamo_ext.topology import collect_local_topology
            from dynamo_ext.topology.select import Endpoint

            topo = collect_local_topology(dev if dev >= 0 else None)
            _env, choice, _conflicts = process_choice(Endpoint(topo, topo.pid, dev if dev >= 0 else "host"),
                                                      TransportOptions())
            for k in list(choice["env"]):
                if k in os.environ:
                    choice["env"][k] = os.environ[k]
            self._choices[dev] = choice
        return self._choices[dev]

    def close(self) -> None:
        if self._be is not None:
            self._be.close_sync()

    def local(self, dev: int) -> tuple[KvPool, KvPool | None]:
        """This run's source pool on ``dev`` (filled once) and its staging pool (None until ``nixl_pools``)."""
        if dev not in self.pools:
            pool = (KvPool.allocate_device("kv", self.layout, dev) if dev >= 0
                    else KvPool.allocate_host("kv", self.layout))
            pool.name = f"kv{dev}"
            fill_pool(pool, 5)
            self.pools[dev] = (pool, None)
        return self.pools[dev]

    def nixl_pools(self, dev: int) -> tuple[KvPool, KvPool]:
        """``local(dev)`` and a staging pool, registered with this process's NIXL agent (created here: rows
        without NIXL never make one, nor the staging pool)."""
        pool, stg = self.local(dev)
        if stg is None:
            slay = probe_layout(self.nbytes, chunk_bytes=self.layout.chunk_bytes)
            stg = (KvPool.allocate_device("staging", slay, dev) if dev >= 0
                   else KvPool.allocate_host("staging", slay))
            stg.name = f"staging{dev}"
            self.pools[dev] = (pool, stg)
        if not self.be.is_registered(pool):
            self.be.register_pool(pool)
            self.be.register_pool(stg, staging=True)
        return pool, stg

    def want(self, method: str, path: str | None = None) -> bool:
        """``methods`` entries: a method name (every path) or ``path:method`` (that path only)."""
        path = path or self.path
        return self.methods is None or method in self.methods or f"{path}:{method}" in self.methods

    def wants_path(self, path: str) -> bool:
        """Any row of ``run_path`` wanted on ``path`` (product-pull runs on its own, before them)."""
        return any(self.want(m, path) for m in METHODS + EXTRA if m != "product-pull")

    async def _timed(self, fn: Callable[[], Any]) -> list[float]:
        times = []
        for i in range(self.reps + 1):
            t0 = time.perf_counter()
            await fn()
            dt = time.perf_counter() - t0
            if i:
                times.append(dt)
            self.bar.update(1)
        return times

    async def run_path(self, path: str) -> list[dict[str, Any]]:
        from dynamo_ext.transport.fallbacks.cma import cma_available

        sdev, ddev = PATHS[path]
        self.path = path
        pool, _ = self.local(sdev)
        auto_cma = sdev < 0 and ddev < 0 and cma_available()  # what make_backend("auto", memory="host") picks
        names = {m: ("planned-nixl" if (m == "planned" and auto_cma) else m) for m in METHODS}
        todo = [m for m in METHODS if self.want(names[m])]
        out: list[dict[str, Any]] = []
        if todo:
            if [m for m in todo if m != "copy"]:
                pool, _ = self.nixl_pools(sdev)
            out += await self._nixl_methods(path, sdev, ddev, pool, todo, names)
        if auto_cma:
            for threads, name in ((None, "planned"), (2, "cma-2t"), (4, "cma-4t")):
                if self.want(name):
                    out.append(await self._cma(path, pool, threads, name))
            for name, threads in (("cma-pull", 1), ("cma-pull-2t", 2)):
                if self.want(name):
                    out.append(await self._cma_pull(path, name, threads))
        if sdev < 0 and ddev < 0 and shm_available():
            for name, threads, op, native in (("shm", 1, "write", None), ("shm-2t", 2, "write", None),
                                              ("shm-pull", 1, "read", None), ("shm-pull-2t", 2, "read", None),
                                              ("shm-pull-py", 1, "read", False)):
                if self.want(name):
                    try:
                        out.append(await self._shm(path, pool, name, threads, op, native))
                    except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
                        out.append(self._failed(path, name, "shm", e))
        if sdev >= 0 and ddev >= 0:
            from dynamo_ext.transport import rowcopy

            variants = [(n, p) for n, p in (("cuda-ipc", True), ("cuda-ipc-torch", False), ("cuda-ipc-direct", True))
                        if self.want(n) and not (n == "cuda-ipc-direct" and sdev == ddev)]
            peer = self.ipc_peer(sdev, ddev, "ipc") if variants else None
            try:
                for name, prefer in variants:
                    rowcopy.PREFER_TRITON = prefer
                    old = rowcopy.tune(cross_kernel="direct-read") if name == "cuda-ipc-direct" else {}
                    try:
                        out.append(await self._cuda_ipc(path, sdev, ddev, pool, name, peer=peer))
                    except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
                        out.append(self._failed(path, name, "cuda_ipc", e))
                    finally:
                        rowcopy.PREFER_TRITON = True
                        rowcopy.tune(**old)
            finally:
                if peer is not None:
                    self.ipc.remove_peer(peer.info.agent_name)
                    peer.close()
        if sdev >= 0 and ddev >= 0 and sdev != ddev:
            out += self._nccl(path, sdev, ddev)
        if sdev >= 0 and ddev < 0:
            for name in ("owner-copy", "owner-copy-staged", "owner-copy-zc"):
                if self.want(name):
                    out.append(await self._owner_copy(path, pool, name))
        return out

    async def _nixl_methods(self, path: str, sdev: int, ddev: int, pool: KvPool, todo: list[str],
                            names: dict[str, str]) -> list[dict[str, Any]]:
        peer = PeerProcess.start(backend="nixl", name=f"bench-peer-{path.replace('>', '').replace('-', '')}-{os.getpid()}",
                                 layout=self.layout, seed=11, choice=self.nixl_choice(ddev),
                                 extra=["--device", str(ddev), "--staging-bytes", str(self.nbytes)], timeout=120)
        out = []
        try:
            self.be.add_peer(peer.info)
            remote = RemotePool(peer.info.agent_name, peer.info.pool("kv"))
            rstg = peer.info.staging
            assert rstg is not None
            src_digest = digest(pool_bytes(pool), self.layout, self.src_ids)
            deadline = max(60.0, self.nbytes / 1e8)

            async def via(planner: Callable[..., Any]) -> int:
                h = await push(self.be, pool, remote, (self.src_ids, self.dst_ids),
                               TransferOptions(planner=planner, deadline_s=deadline, metrics=None))
                return (await h).descriptors

            async def post_wait(local: KvPool, rem: Any, descs: Any) -> None:
                req = self.be.post("write", local, peer.info.agent_name, rem, descs)
                while not req.poll():
                    await asyncio.sleep(0)

            # the peer must know this agent to ack staged WRITEs
            import base64

            await peer.acall({"cmd": "add_peer", "info": base64.b64encode(self.be.local_peer_info().encode()).decode()})

            async def staged() -> int:
                h = await push(self.be, pool, remote, (self.src_ids, self.dst_ids),
                               TransferOptions(stage=True, deadline_s=deadline, metrics=None))
                return (await h).descriptors

            for seed, method in enumerate(METHODS, start=20):
                if method not in todo:
                    continue
                await peer.acall({"cmd": "fill", "seed": seed}, timeout=120)
                ndesc = 1
                extra: dict[str, Any] = {}
                if method in ("naive", "planned"):
                    planner = plan_naive if method == "naive" else None
                    ndesc = await via(planner or (lambda *a: plan_transfer(*a, stage=False)))
                    times = await self._timed(lambda p=planner: via(p or (lambda *a: plan_transfer(*a, stage=False))))
                    ok = (await peer.acall({"cmd": "digest", "blocks": self.dst_ids}, timeout=300))["sha256"] == src_digest
                elif method == "planned-staged":
                    ndesc = await staged()
                    times = await self._timed(staged)
                    from dynamo_ext.transport.staged import recent_phases

                    ph = recent_phases(self.be)[-self.reps:]
                    extra["phases_ms"] = {k: round(statistics.median(p[k] for p in ph), 3) for k in (ph[0] if ph else {})}
                    if ph:
                        m = extra["phases_ms"]
                        extra["phases"] = (f"median ms: gather {m['gather_ms']:.2f}, post {m['post_ms']:.2f}, wire "
                                           f"{m['wire_ms']:.2f}, peer scatter + ack {m['ack_ms']:.2f}")
                    ok = (await peer.acall({"cmd": "digest", "blocks": self.dst_ids}, timeout=300))["sha256"] == src_digest
                elif method == "raw-single":
                    times = await self._timed(lambda: post_wait(pool, remote.pool, [(0, 0, self.nbytes)]))
                    want = digest(pool_bytes(pool), self.layout, None, [[0, self.nbytes]])
                    got = (await peer.acall({"cmd": "digest", "ranges": [[0, self.nbytes]]}, timeout=300))["sha256"]
                    ok = got == want
                else:
                    method = "memcpy" if sdev < 0 and ddev < 0 else "torch-copy"
                    times, ok = await self._copy_ceiling(sdev, ddev)
                gbps = self.nbytes / statistics.median(times) / 1e9
                is_copy = method in ("memcpy", "torch-copy")
                out.append({"path": path, "method": names.get(method, method), "gbps": round(gbps, 3),
                            "descriptors": int(ndesc), "verified": bool(ok),
                            "backend": "local" if is_copy else "nixl", "direction": "copy" if is_copy else "write",
                            **({} if is_copy else {"ucx_env": dict(self.nixl_choice(self.agent_dev)["env"]),
                                                      "peer_ucx_env": dict(self.nixl_choice(ddev)["env"])}),
                            **extra,
                            "detail": {"naive": "one descriptor per chunk", "planned": "merged runs, pool -> pool",
                                       "planned-staged": "gather -> 1 descriptor -> peer scatters",
                                       "raw-single": "one descriptor of the same bytes (ceiling)",
                                       "memcpy": "np.copyto, one thread, contiguous (ceiling)",
                                       "torch-copy": "one torch copy (ceiling)"}.get(method, "")})
                self.bar.set_postfix_str(f"{path} {method} {gbps:.2f} GB/s")
        finally:
            self.be.remove_peer(peer.info.agent_name)
            peer.close()
        return out

    async def _planned_row(self, path: str, name: str, be: Any, lpool: KvPool, op: str, *, seed: int,
                           detail: Callable[[], str]) -> dict[str, Any]:
        """One row of planned (stage=False) transfers through ``be`` (a started host backend with ``lpool``
        registered) against a peer PROCESS of the same backend: op "write" = ``lpool`` -> the peer's pool,
        "read" = the peer's pool -> ``lpool`` (product-pull's direction). Timed, verified (sha256 of the chunks
        on both sides), ``be`` closed."""
        from dynamo_ext.transport import pull

        peer = PeerProcess.start(backend=be.name, name=f"bench-{name}-peer-{os.getpid()}", layout=self.layout,
                                 seed=seed, timeout=120)
        try:
            be.add_peer(peer.info)
            remote = RemotePool(peer.info.agent_name, peer.info.pool("kv"))
            nd = [0]
            opts = TransferOptions(deadline_s=120, metrics=None, stage=False)

            async def go() -> None:
                h = await (push(be, lpool, remote, (self.src_ids, self.dst_ids), opts) if op == "write" else
                           pull(be, remote, lpool, (self.src_ids, self.dst_ids), opts))
                nd[0] = (await h).descriptors

            times = await self._timed(go)
            there, here = (self.dst_ids, self.src_ids) if op == "write" else (self.src_ids, self.dst_ids)
            ok = (await peer.acall({"cmd": "digest", "blocks": there}, timeout=300))["sha256"] == \
                digest(pool_bytes(lpool), self.layout, here)
        finally:
            peer.close()
            await be.close()
        gbps = self.nbytes / statistics.median(times) / 1e9
        self.bar.set_postfix_str(f"{path} {name} {gbps:.2f} GB/s")
        return {"path": path, "method": name, "gbps": round(gbps, 3), "descriptors": int(nd[0]), "verified": bool(ok),
                "backend": be.name, "direction": op, "threads": be.threads, "detail": detail()}

    async def _cma(self, path: str, pool: KvPool, threads: int | None, name: str) -> dict[str, Any]:
        """planned WRITEs through the cma backend (what make_backend("auto", memory="host") picks) to a cma peer."""
        from dynamo_ext.transport import make_backend
        from dynamo_ext.transport.fallbacks.cma import CmaBackend

        be = make_backend("auto", f"bench-{name}-{os.getpid()}", memory="host")
        assert isinstance(be, CmaBackend), type(be)
        be.threads = threads or be.threads  # None: the backend's default
        await be.start()
        lpool = KvPool.from_host_array(pool.name, pool.layout, pool.host_view())  # same bytes, cma-registered
        be.register_pool(lpool)
        return await self._planned_row(path, name, be, lpool, "write", seed=17,
                                       detail=lambda: f"process_vm_writev, {be.threads} thread(s)")

    def _pull_pool(self, dev: int, name: str, shared: bool = False) -> KvPool:
        """A fresh destination pool for the READ rows (the run's source pool ``local(dev)`` stays untouched);
        ``shared``: host memory in a memfd, as the engine's CPU KV pool (product-pull)."""
        return (KvPool.allocate_device(name, self.layout, dev) if dev >= 0
                else KvPool.allocate_host(name, self.layout, shared=shared and shared_memory_available()))

    async def _cma_pull(self, path: str, name: str = "cma-pull", threads: int = 1) -> dict[str, Any]:
        """planned READs through a bare cma backend (process_vm_readv, ``threads`` copy threads) from a cma peer
        into a fresh pool here: product-pull's direction, without the serving layer."""
        from dynamo_ext.transport.fallbacks.cma import CmaBackend

        be = CmaBackend(f"bench-{name}-{os.getpid()}", threads=threads)
        await be.start()
        lpool = self._pull_pool(-1, "kv-pull")
        be.register_pool(lpool)
        return await self._planned_row(path, name, be, lpool, "read", seed=19,
                                       detail=lambda: f"process_vm_readv, {be.threads} thread(s)")

    async def _shm(self, path: str, pool: KvPool, name: str, threads: int, op: str,
                   native: bool | None = None) -> dict[str, Any]:
        """planned transfers through the shm backend (both pools in shared memory, the peer's mapped here at
        add_peer): WRITEs from a shared copy of the source pool into a shm peer process, or READs from a shm peer
        into a fresh shared pool here (what the product's decode worker does)."""
        from dynamo_ext.transport.fallbacks.shm import ShmBackend

        be = ShmBackend(f"bench-{name}-{os.getpid()}", threads=threads, native=native)
        await be.start()
        if op == "write":
            lpool = KvPool.allocate_host(pool.name, pool.layout, shared=True, fill=0)
            np.copyto(lpool.host_view(), pool.host_view())  # the same bytes, in shared memory
        else:
            lpool = KvPool.allocate_host("kv-pull", self.layout, shared=True, fill=0)
        be.register_pool(lpool)
        how = (f"compiled loop, {be.threads} thread(s)" if be.native else "python loop: memoryview slices, 1 thread")
        row = await self._planned_row(path, name, be, lpool, op, seed=21,
                                      detail=lambda: f"memfd pools mapped by the peer, one memcpy per run ({how})")
        row["native"] = be.native
        return row

    async def product_pull(self, path: str) -> dict[str, Any]:
        """The product's pull (what a decode worker calls): a peer PROCESS runs serving.WorkerTransports over the
        source pool on the path's source device (``bench._pull_peer``, as a prefill worker); this process runs
        WorkerTransports over a fresh destination pool on the path's destination device and times
        ``WorkerTransports.pull(peer, pool, src_ids, dst_ids, deadline_s=...)``: select_transport's backend for
        the pair (next on failure), add_peer at the first pull, one TransferOptions, the default metrics.
        Verified like the other rows (sha256 of the destination chunks here == of the source chunks there).
        UCX variables the transports set in os.environ are restored afterwards (the bench's own NIXL agent,
        created later, keeps the run's environment)."""
        from dynamo_ext.bench._pull_peer import PullPeer
        from dynamo_ext.serving.transports import TransportOptions, WorkerTransports
        from dynamo_ext.topology import collect_local_topology
        from dynamo_ext.topology.select import Endpoint

        name = "product-pull"
        sdev, ddev = PATHS[path]
        tag = path.replace(">", "").replace("-", "")
        saved_env = dict(os.environ)
        peer: PullPeer | None = None
        ts: WorkerTransports | None = None
        used: list[Any] = []
        try:
            peer = PullPeer.start_peer(name=f"bench-prefill-{tag}-{os.getpid()}", layout=self.layout,
                                       device=sdev, seed=23, timeout=120)
            pool = self._pull_pool(ddev, "kv-decode", shared=True)  # as a worker's engine pool
            topo = collect_local_topology(ddev if ddev >= 0 else None)  # as ServingWorker.start
            dev = "host" if topo.worker_gpu is None else topo.worker_gpu
            ts = WorkerTransports(f"bench-decode-{tag}-{os.getpid()}", pool, Endpoint(topo, topo.pid, dev),
                                  TransportOptions())
            await ts.start()
            pt = peer.transports
            deadline = max(60.0, self.nbytes / 1e8)

            async def go() -> None:
                used.append(await ts.pull(pt, "kv-prefill", self.src_ids, self.dst_ids, deadline_s=deadline))

            times = await self._timed(go)
            ok = (await peer.acall({"cmd": "digest", "blocks": self.src_ids}, timeout=300))["sha256"] == \
                digest(pool_bytes(pool), self.layout, self.dst_ids)
            verify_ms = self._verify_cost(pool)
            last = used[-1]
            be = ts.backends[last.backend]
            threads = getattr(be, "threads", None)
            started, skipped = list(ts.backends), dict(ts.skipped)
        except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
            row = self._failed(path, name, "WorkerTransports.pull", e)
            if used:
                row["chosen"] = used[-1].backend
            return row
        finally:
            if ts is not None:
                await ts.close()
            if peer is not None:
                peer.close()
            for k in [k for k in os.environ if k not in saved_env]:
                del os.environ[k]
            os.environ.update(saved_env)
        gbps = self.nbytes / statistics.median(times) / 1e9
        self.bar.set_postfix_str(f"{path} {name} ({last.backend}) {gbps:.2f} GB/s")
        chosen = sorted({r.backend for r in used})
        return {"path": path, "method": name, "gbps": round(gbps, 3), "descriptors": int(last.stats.descriptors),
                "verified": bool(ok), "backend": last.backend, "direction": "read", "threads": threads,
                "detail": f"WorkerTransports.pull, {last.kind}" + (f", {threads} thread(s)" if threads else ""),
                "chosen": last.backend, "kind": last.kind, "backends_used": chosen,
                "fell_back": sorted({f"{b}: {m}"[:200] for r in used for b, m in r.failed}),
                "started": started, "skipped": skipped, "puller": dev, "peer": peer.ready.get("device"),
                **verify_ms}

    def _verify_cost(self, pool: Any) -> dict[str, float]:
        """kv_transfer.verify's cost on this pull's blocks: ms of ``transport.verify.block_digests`` over the
        blocks that mode checks (each side pays it once per transfer: the holder at the hand-off, the puller
        after the pull), median of 5; also as a share of the product pull's median time."""
        from dynamo_ext.serving.worker import verify_indices
        from dynamo_ext.transport.verify import block_digests

        out: dict[str, float] = {}
        for mode in ("sample", "all"):
            ids = [self.dst_ids[i] for i in verify_indices(len(self.dst_ids), mode)]
            ts = []
            for _ in range(6):
                t0 = time.perf_counter()
                block_digests(pool, self.layout, ids)  # returns host ints: synchronous on a GPU too
                ts.append(time.perf_counter() - t0)
            out[f"verify_{mode}_ms"] = round(statistics.median(ts[1:]) * 1e3, 3)
        return out

    def _failed(self, path: str, name: str, backend: str, e: BaseException) -> dict[str, Any]:
        print(f"{path} {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return {"path": path, "method": name, "gbps": 0.0, "descriptors": 0, "verified": False, "backend": backend,
                "direction": "read" if "pull" in name else "write", "error": f"{type(e).__name__}: {e}"[:300]}

    def _nccl(self, path: str, sdev: int, ddev: int, backend: str = "nccl") -> list[dict[str, Any]]:
        """nccl-single / nccl-planned: two fresh processes (torch.distributed, TCPStore on 127.0.0.1)."""
        from dynamo_ext.transport.fallbacks import nccl

        todo = [m for m in nccl.METHODS if self.want(m)]
        if not todo:
            return []
        try:
            rows = nccl.run_pair(backend, (sdev, ddev), self.layout_name, self.size, self.reps, todo,
                                 slice_bytes=NCCL_SLICE_BYTES, timeout=240)
        except Exception as e:  # noqa: BLE001
            return [self._failed(path, m, backend, e) for m in todo]
        self.bar.update(len(todo) * (self.reps + 1))
        out = []
        for r in rows:
            extra = "" if r["method"] == "nccl-single" else f", {r['slices']} slices of {r['slice_bytes'] >> 20} MiB"
            out.append({"path": path, "method": r["method"], "gbps": r["gbps"], "descriptors": r["descriptors"],
                        "verified": r["verified"], "backend": backend, "direction": "write",
                        "detail": f"send/recv{extra}"})
        return out

    async def sweep(self, path: str, configs: Sequence[dict[str, Any]],
                    on_row: Callable[[dict[str, Any]], None] | None = None,
                    peer: PeerProcess | None = None) -> list[dict[str, Any]]:
        """cuda-ipc transfers on ``path`` once per rowcopy tuning (one peer process for all), each verified by
        probe.fingerprint (GPU-side checksums: sha256 after a device -> host copy cost ~2 s per row)."""
        from dynamo_ext.transport import rowcopy

        sdev, ddev = PATHS[path]
        self.path = path
        pool, _ = self.local(sdev)
        out: list[dict[str, Any]] = []
        own = peer is None
        peer = peer or self.ipc_peer(sdev, ddev, "sweep")
        try:
            return await self._sweep(path, sdev, ddev, pool, configs, peer, out, on_row)
        finally:
            if own:
                self.ipc.remove_peer(peer.info.agent_name)
                peer.close()

    async def _sweep(self, path: str, sdev: int, ddev: int, pool: KvPool, configs: Sequence[dict[str, Any]],
                     peer: PeerProcess, out: list[dict[str, Any]],
                     on_row: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
        from dynamo_ext.transport import rowcopy

        for i, cfg in enumerate(configs):
            tun = {k: v for k, v in cfg.items() if k != "plan_cache"}
            planner = memo_planner() if cfg.get("plan_cache") else None
            old = rowcopy.tune(**tun)
            label = " ".join(f"{k}={(v >> 20) if k.endswith('bytes') else v}{'M' if k.endswith('bytes') else ''}"
                             for k, v in cfg.items())
            try:
                row = await self._cuda_ipc(path, sdev, ddev, pool, f"sweep-{i}", peer=peer, planner=planner,
                                           fast_verify=True)
                row["config"] = dict(cfg)
                row["detail"] = label
            except Exception as e:  # noqa: BLE001
                row = self._failed(path, f"sweep-{i}", "cuda_ipc", e)
                row["config"], row["detail"] = dict(cfg), label
            finally:
                rowcopy.tune(**old)
            print(f"sweep {path} {label}: {row['gbps']:.1f} GB/s verified={row['verified']} {row.get('error', '')}",
                  flush=True)
            out.append(row)
            if on_row is not None:
                on_row(row)
        return out

    async def timeline(self, path: str = "GPU0->GPU0", reps: int = 5, trace: str | None = None,
                       peer: PeerProcess | None = None) -> dict[str, Any]:
        """Where the time of one cuda-ipc transfer goes: host phases (perf_counter) vs GPU time (CUDA
        events) vs the poll/await; plus a torch.profiler trace of one ``transport.push`` (chrome JSON)."""
        import torch

        from dynamo_ext.transport import rowcopy

        sdev, ddev = PATHS[path]
        pool, _ = self.local(sdev)
        ipc = self._ipc(pool)
        own = peer is None
        peer = peer or self.ipc_peer(sdev, ddev, "timeline")
        # plan/rows: host prep; post: backend.post (rows + upload + launch, enqueue only); gpu: CUDA events around
        # the post on the stream; poll: post return -> event done; direct_total: all of that; push: the same
        # transfer through the public API (transport.push; "transfer_kv_cache_ms" in result files before
        # 2026-12-04); upload_sync: index H2D + sync; launch_host: one Triton/torch launch (host); kernel_only:
        # the row kernel alone (CUDA events, indices already on the GPU)
        phases: dict[str, list[float]] = {k: [] for k in ("plan_ms", "rows_ms", "post_ms", "gpu_ms", "poll_ms",
                                                          "direct_total_ms", "push_ms", "upload_sync_ms",
                                                          "launch_host_ms", "kernel_only_ms")}
        try:
            remote = RemotePool(peer.info.agent_name, peer.info.pool("kv"))
            dev = torch.device(f"cuda:{ddev}")
            for i in range(reps + 1):
                torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                plan = plan_transfer(pool.layout, self.src_ids, self.layout, self.dst_ids, stage=False)
                t1 = time.perf_counter()
                rowcopy.rows_of(plan.wire, pool.nbytes, remote.pool.nbytes)
                t2 = time.perf_counter()
                e0 = torch.cuda.Event(enable_timing=True)
                e0.record(torch.cuda.current_stream(dev))
                t3 = time.perf_counter()
                req = ipc.post("write", pool, peer.info.agent_name, remote.pool, plan.wire)
                t4 = time.perf_counter()
                e1 = torch.cuda.Event(enable_timing=True)
                e1.record(torch.cuda.current_stream(dev))
                while not req.poll():
                    await asyncio.sleep(0)
                t5 = time.perf_counter()
                e1.synchronize()
                t6 = time.perf_counter()
                h = await push(ipc, pool, remote, (self.src_ids, self.dst_ids),
                               TransferOptions(deadline_s=60, metrics=None))
                await h
                t7 = time.perf_counter()
                # the kernel alone, indices already on the GPU
                rt = ipc._remote[(peer.info.agent_name, "kv")]  # noqa: SLF001
                s_r, d_r, unit = rowcopy.rows_of(plan.wire, pool.nbytes, remote.pool.nbytes)
                from dynamo_ext.transport.staging import _as_rows

                torch.cuda.synchronize(dev)
                u0 = time.perf_counter()
                si, di = torch.from_numpy(s_r).to(dev), torch.from_numpy(d_r).to(dev)
                torch.cuda.synchronize(dev)
                u1 = time.perf_counter()
                k0, k1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                with torch.cuda.device(dev):
                    a2d, b2d = _as_rows(pool.tensor_u8(), unit, rt), _as_rows(rt, unit, pool.tensor_u8())
                    k0.record()
                    l0 = time.perf_counter()
                    rowcopy._launch_rows(a2d, b2d, si, di, s_r.shape[0], rowcopy._use_triton(rt, None))  # noqa: SLF001
                    l1 = time.perf_counter()
                    k1.record()
                k1.synchronize()
                if i:
                    for k, v in (("plan_ms", t1 - t0), ("rows_ms", t2 - t1), ("post_ms", t4 - t3), ("poll_ms", t5 - t4),
                                 ("direct_total_ms", t6 - t0), ("push_ms", t7 - t6),
                                 ("upload_sync_ms", u1 - u0), ("launch_host_ms", l1 - l0)):
                        phases[k].append(v * 1e3)
                    phases["gpu_ms"].append(e0.elapsed_time(e1))
                    phases["kernel_only_ms"].append(k0.elapsed_time(k1))
            prof_table = ""
            if trace:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    h = await push(ipc, pool, remote, (self.src_ids, self.dst_ids),
                                   TransferOptions(deadline_s=60, metrics=None))
                    await h
                    torch.cuda.synchronize(dev)
                prof.export_chrome_trace(trace)
                prof_table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=15)
        finally:
            if own:
                ipc.remove_peer(peer.info.agent_name)
                peer.close()
        med = {k: round(statistics.median(v), 3) for k, v in phases.items() if v}
        return {"path": path, "bytes": self.nbytes, "median": med, "profile_table": prof_table, "trace": trace}

    async def profile_one(self, path: str, trace: str, configs: Sequence[dict[str, Any]]) -> dict[str, str]:
        """torch.profiler chrome trace of one cuda-ipc transfer on ``path`` per rowcopy tuning (after a
        warm-up): which streams overlap, where the host waits. Files: ``trace`` with -<i> before .json."""
        import torch
        from torch.profiler import ProfilerActivity, profile

        from dynamo_ext.transport import rowcopy

        sdev, ddev = PATHS[path]
        pool, _ = self.local(sdev)
        ipc = self._ipc(pool)
        peer = self.ipc_peer(sdev, ddev, "profile")
        tables: dict[str, str] = {}
        try:
            remote = RemotePool(peer.info.agent_name, peer.info.pool("kv"))
            for i, cfg in enumerate(configs):
                old = rowcopy.tune(**{k: v for k, v in cfg.items() if k != "plan_cache"})
                try:
                    for prof_on in (False, True):
                        ctx = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) if prof_on else None
                        if ctx is not None:
                            ctx.__enter__()
                        h = await push(ipc, pool, remote, (self.src_ids, self.dst_ids),
                                       TransferOptions(deadline_s=60, metrics=None))
                        await h
                        torch.cuda.synchronize(sdev)
                        torch.cuda.synchronize(ddev)
                        if ctx is not None:
                            ctx.__exit__(None, None, None)
                            f = trace.replace(".json", f"-{i}.json")
                            ctx.export_chrome_trace(f)
                            tables[f] = ctx.key_averages().table(sort_by="cuda_time_total", row_limit=12)
                except Exception as e:  # noqa: BLE001
                    tables[f"config {i}"] = f"failed: {type(e).__name__}: {e}"
                finally:
                    rowcopy.tune(**old)
        finally:
            ipc.remove_peer(peer.info.agent_name)
            peer.close()
        return tables

    async def _owner_copy(self, path: str, pool: KvPool, name: str) -> dict[str, Any]:
        """GPU -> host tier inside the owner process (no peer): the pool's own pinned host tier."""
        import torch

        from dynamo_ext.transport import rowcopy

        if getattr(self, "tier", None) is None:
            self.tier = KvPool.allocate_host("tier", self.layout, pin=True)
        tier = self.tier
        tier.host_view().fill(0)
        nd = [0]

        async def go() -> None:
            h = await copy(pool, tier, (self.src_ids, self.dst_ids), TransferOptions(metrics=None))
            nd[0] = (await h).descriptors

        async def go_direct() -> None:  # the executor itself, zero-copy forced on or off
            plan = plan_transfer(pool.layout, self.src_ids, tier.layout, self.dst_ids, stage=False)
            with torch.cuda.device(pool.device_id):
                rowcopy.copy_device_to_host(pool.tensor_u8(), tier.tensor_u8(), plan.wire,
                                            zerocopy=name == "owner-copy-zc")
            nd[0] = len(plan.wire)

        try:
            times = await self._timed(go if name == "owner-copy" else go_direct)
        except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
            print(f"{path} {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            return {"path": path, "method": name, "gbps": 0.0, "descriptors": 0, "verified": False,
                    "backend": "local", "direction": "copy", "error": f"{type(e).__name__}: {e}"[:300]}
        ok = digest(tier.host_view(), self.layout, self.dst_ids) == digest(pool_bytes(pool), self.layout, self.src_ids)
        gbps = self.nbytes / statistics.median(times) / 1e9
        self.bar.set_postfix_str(f"{path} {name} {gbps:.2f} GB/s")
        return {"path": path, "method": name, "gbps": round(gbps, 3), "descriptors": int(nd[0]), "verified": bool(ok),
                "backend": "local", "direction": "copy",
                "detail": {"owner-copy": "transport.copy", "owner-copy-staged": "staged + host scatter",
                           "owner-copy-zc": "zero-copy kernel"}[name]}

    def _ipc(self, pool: KvPool) -> Any:
        from dynamo_ext.transport.fallbacks.cuda_ipc import CudaIpcBackend

        if getattr(self, "ipc", None) is None:
            self.ipc = CudaIpcBackend(f"bench-ipc-{os.getpid()}")
        if not self.ipc.is_registered(pool):
            self.ipc.register_pool(pool)
        return self.ipc

    def ipc_peer(self, sdev: int, ddev: int, tag: str) -> PeerProcess:
        pool, _ = self.local(sdev)
        ipc = self._ipc(pool)
        peer = PeerProcess.start(backend="cuda_ipc", name=f"bench-{tag}-peer-{sdev}{ddev}-{os.getpid()}",
                                 layout=self.layout, seed=13, extra=["--device", str(ddev)], timeout=120)
        ipc.add_peer(peer.info)
        return peer

    def src_digest(self, dev: int) -> str:
        """sha256 of the source chunks of this device's pool (pools are written only when created)."""
        cache = self.__dict__.setdefault("_digests", {})
        if dev not in cache:
            cache[dev] = digest(pool_bytes(self.local(dev)[0]), self.layout, self.src_ids)
        return cache[dev]

    def src_fingerprint(self, dev: int) -> str:
        from dynamo_ext.transport.probe import fingerprint

        cache = self.__dict__.setdefault("_fingerprints", {})
        if dev not in cache:
            cache[dev] = fingerprint(self.local(dev)[0], self.layout, self.src_ids)
        return cache[dev]

    async def _cuda_ipc(self, path: str, sdev: int, ddev: int, pool: KvPool, name: str = "cuda-ipc",
                        peer: PeerProcess | None = None, planner: Callable[..., Any] | None = None,
                        fast_verify: bool = False) -> dict[str, Any]:
        """planned transfer through the CUDA IPC fallback (a second peer process, same node; ``peer``: reuse
        one, refilled first so the verification covers this run only)."""
        ipc = self._ipc(pool)
        own = peer is None
        if own:
            peer = self.ipc_peer(sdev, ddev, name)
        else:
            await peer.acall({"cmd": "clear", "value": 29}, timeout=120)
        try:
            remote = RemotePool(peer.info.agent_name, peer.info.pool("kv"))
            nd = [0]

            async def go() -> None:
                h = await push(ipc, pool, remote, (self.src_ids, self.dst_ids),
                               TransferOptions(deadline_s=60, metrics=None, planner=planner))
                nd[0] = (await h).descriptors

            times = await self._timed(go)
            if fast_verify:  # position-weighted 64-bit checksums computed on the GPUs (probe.fingerprint)
                ok = (await peer.acall({"cmd": "fingerprint", "blocks": self.dst_ids}, timeout=300))["fingerprint"] == \
                    self.src_fingerprint(sdev)
            else:
                ok = (await peer.acall({"cmd": "digest", "blocks": self.dst_ids}, timeout=300))["sha256"] == \
                    self.src_digest(sdev)
        finally:
            if own:
                ipc.remove_peer(peer.info.agent_name)
                peer.close()
        gbps = self.nbytes / statistics.median(times) / 1e9
        self.bar.set_postfix_str(f"{path} {name} {gbps:.2f} GB/s")
        return {"path": path, "method": name, "gbps": round(gbps, 3), "descriptors": int(nd[0]), "verified": bool(ok),
                "backend": "cuda_ipc", "direction": "write",
                "detail": ("direct-read Triton kernel" if name == "cuda-ipc-direct" else
                           "triton" if name == "cuda-ipc" and _triton() and sdev == ddev else "torch")}

    async def _copy_ceiling(self, sdev: int, ddev: int) -> tuple[list[float], bool]:
        n = self.nbytes
        if sdev < 0 and ddev < 0:
            a = np.empty(n, dtype=np.uint8)
            fill = np.random.default_rng(1).integers(0, 255, 1 << 20, dtype=np.uint8)
            a[:] = np.resize(fill, n)
            b = np.empty(n, dtype=np.uint8)
            b.fill(0)  # pre-touch

            async def cp() -> None:
                np.copyto(b, a)

            times = await self._timed(cp)
            return times, bool(np.array_equal(a, b))
        import torch

        a = torch.randint(0, 255, (n,), dtype=torch.uint8, device=f"cuda:{sdev}")
        b = (torch.empty(n, dtype=torch.uint8, device=f"cuda:{ddev}") if ddev >= 0
             else torch.empty(n, dtype=torch.uint8, pin_memory=True))

        async def cpg() -> None:
            b.copy_(a, non_blocking=True)
            torch.cuda.synchronize(sdev)
            if ddev >= 0:
                torch.cuda.synchronize(ddev)

        times = await self._timed(cpg)
        return times, bool(torch.equal(a.cpu(), b.cpu()))


def method_label(r: dict[str, Any]) -> str:
    """The row's method, with the backend the product path chose: ``product-pull (cma)``."""
    return f"{r['method']} ({r['chosen']})" if r.get("chosen") else r["method"]


_CEILINGS = ("memcpy", "torch-copy", "raw-single")
_COPY_CEILINGS = ("memcpy", "torch-copy")


def row_name(r: dict[str, Any]) -> str:
    """Backend, direction and method of a row: ``shm READ shm-pull``, ``cma WRITE planned``, ``nixl WRITE naive``
    (older result files: the backend field's first word)."""
    be = str(r.get("backend", "")).split(" ")[0] or "?"
    d = r.get("direction")
    return f"{be} {d.upper() if d else ''} {r['method']}".replace("  ", " ")


def _ratio(r: dict[str, Any], rows: Sequence[dict[str, Any]]) -> float | None:
    """The row's GB/s over the same run's copy ceiling of its path (memcpy / torch-copy), when it has one."""
    ceil = [x for x in rows if x["path"] == r["path"] and x["method"] in _COPY_CEILINGS and x["gbps"] > 0]
    return r["gbps"] / ceil[0]["gbps"] if ceil and r["gbps"] > 0 else None


def best_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per path, the fastest verified row that is not a ceiling (copy, raw single descriptor), with what set
    it: backend, method, threads, descriptors, sweep configuration."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if not r.get("verified") or r.get("error") or r["method"] in _CEILINGS:
            continue
        if r["path"] not in best or r["gbps"] > best[r["path"]]["gbps"]:
            best[r["path"]] = r
    return list(best.values())


def _setting(r: dict[str, Any]) -> str:
    parts = []
    if r.get("config"):
        parts.append(" ".join(f"{k}={(v >> 20) if isinstance(v, int) and k.endswith('bytes') else v}"
                              f"{'M' if k.endswith('bytes') else ''}" for k, v in r["config"].items()))
    if r.get("threads"):
        parts.append(f"{r['threads']} thread(s)")
    parts.append(f"{r['descriptors']} descriptors")
    if r.get("detail"):
        parts.append(str(r["detail"]))
    return "; ".join(parts)


def markdown_table(result: dict[str, Any]) -> str:
    rows = result["results"]
    lines = [f"# KV transfer benchmark: {result['layout']}, {result['size_bytes'] / 2**30:.3f} GiB",
             "", f"Machine: {result['machine']}", ""]
    if result.get("load"):
        lines += [f"Load average (1/5/15 min) before / after: {result['load'].get('before', '?')} / "
                  f"{result['load'].get('after', '?')}", ""]
    envs = sorted({" ".join(f"{k}={v}" for k, v in sorted(r["ucx_env"].items())) for r in rows if r.get("ucx_env")})
    if envs:
        lines += ["NIXL rows: this process's UCX environment from the workers' `select_transport` choice: "
                  + "; ".join(f"`{e}`" for e in envs), ""]
    lines += [f"Median of {result.get('reps', '?')} timed repetitions after one warm-up; every row verified "
              f"({result.get('verification', 'byte for byte: sha256 of the destination chunks vs the source chunks')}). "
              "x copy = GB/s over the same run's copy ceiling of the path.",
              "",
              "| path | row (backend DIRECTION method) | GB/s | x copy | descriptors | verified | how |",
              "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        err = f" ({r['error']})" if r.get("error") else ""
        x = _ratio(r, rows)
        how = r.get("detail") or (r.get("backend", "") if " " in str(r.get("backend", "")) else "")
        if r.get("phases"):
            how += f" ({r['phases']})"
        lines.append(f"| {r['path']} | {row_name(r)} | "
                     f"{r['gbps']:.2f} | {'' if x is None else f'{x:.2f}'} | {r['descriptors']} | "
                     f"{r['verified']}{err} | {how} |")
    best = best_rows(rows)
    if best:
        lines += ["", "Best per path (what set it):", ""]
        for r in best:
            x = _ratio(r, rows)
            lines.append(f"- {r['path']}: **{r['gbps']:.2f} GB/s** {row_name(r)}"
                         f"{f' = {x:.2f} x copy' if x is not None else ''} ({_setting(r)})")
    return "\n".join(lines) + "\n"


def default_out(stem: str) -> Path:
    """Where a run writes when no ``--out`` is given: a new temporary directory (never the committed
    benchmarks/results files); the caller prints it."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="dynamo-ext-bench-transfer-")) / f"{stem}.json"


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def write_outputs(result: dict[str, Any], json_path: Path, png: bool = True) -> tuple[Path, Path]:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md = json_path.with_suffix(".md")
    md.write_text(markdown_table(result))
    png_path = json_path.with_suffix(".png")
    if not png:
        return md, png_path
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = result["results"]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(res)), 4))
    labels = [f"{r['path']}\n{row_name(r)}" for r in res]
    colors = ["tab:green" if r["verified"] else "tab:red" for r in res]
    ax.bar(range(len(res)), [r["gbps"] for r in res], color=colors)
    ax.set_xticks(range(len(res)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("GB/s (1e9 B/s)")
    ax.set_title(f"{result['layout']} KV, {result['size_bytes'] / 2**30:.2f} GiB, two processes")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return md, png_path


def run_transfer_bench(size_bytes: int = 1 << 30, layout_name: str = "llama3-70b", json_path: str | Path | None = None,
                       paths: Sequence[str] | None = None, reps: int = 5,
                       methods: Sequence[str] | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    paths = list(paths or default_paths())
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ValueError(f"unknown paths {unknown}; known: {list(PATHS)}")
    bad = [m for m in (methods or []) if m.rsplit(":", 1)[-1] not in METHODS + EXTRA]
    if bad:
        raise ValueError(f"unknown methods {bad}; known: {METHODS + EXTRA}")
    n = len(methods) if methods else len(METHODS) + 5
    bar = tqdm(total=len(paths) * n * (reps + 1), desc="kv-transfer", unit="xfer", file=sys.stderr)
    bench = _Bench(size_bytes, layout_name, reps, bar, methods)

    if json_path is None:
        tag = "gpu" if _gpus() else "cpu"
        json_path = default_out(f"transfer-{tag}-{layout_name}-{size_bytes >> 20}MiB")
    print(f"bench transfer: writing {json_path} (+ .md, .png)", file=sys.stderr, flush=True)
    load = {"before": _loadavg()}

    def result_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"machine": machine_string(), "size_bytes": int(bench.nbytes), "layout": layout_name, "reps": reps,
                "load": load, "results": rows}

    def report(rows: list[dict[str, Any]]) -> None:  # progress on stdout, partial outputs if the run is cut short
        for r in rows:
            print(f"{r['path']:12s} {row_name(r):28s} {r['gbps']:10.2f} GB/s {r['descriptors']:6d} desc "
                  f"verified={r['verified']} {r.get('error', '')}", flush=True)

    async def main() -> list[dict[str, Any]]:
        # the product's pulls first, while this process holds no NIXL agent of its own (a worker has one only:
        # the WorkerTransports' one); each path's product row is listed after that path's other rows
        product: dict[str, dict[str, Any]] = {}
        for p in paths:
            if bench.want("product-pull", p):
                product[p] = await bench.product_pull(p)
                report([product[p]])
                write_outputs(result_of(list(product.values())), Path(json_path), png=False)
        res: list[dict[str, Any]] = []
        for p in paths:
            rows = await bench.run_path(p) if bench.wants_path(p) else []
            report(rows)
            res += rows + ([product[p]] if p in product else [])
            write_outputs(result_of(res), Path(json_path), png=False)
        return res

    try:
        results = asyncio.run(main())
    finally:
        bar.close()
        bench.close()
    load["after"] = _loadavg()
    result = result_of(results)
    write_outputs(result, Path(json_path))
    result["json_path"] = str(json_path)
    return result


def run_sweep(paths: Sequence[str], size_bytes: int, layout_name: str, reps: int, json_path: str | Path,
              timeline: bool = False, trace: str | None = None, profile_cross: str | None = None) -> dict[str, Any]:
    """rowcopy tunings (SWEEP) per path through cuda-ipc, then optionally the same-GPU timeline."""
    from tqdm import tqdm

    bar = tqdm(total=sum(len(SWEEP[p]) for p in paths) * (reps + 1), desc="sweep", unit="xfer", file=sys.stderr)
    bench = _Bench(size_bytes, layout_name, reps, bar)
    doc: dict[str, Any] = {"machine": machine_string(), "size_bytes": int(bench.nbytes), "layout": layout_name,
                           "reps": reps, "results": [], "timeline": None,
                           "verification": "probe.fingerprint: position-weighted 64-bit sums of the destination "
                                           "chunks vs the source chunks, computed on the GPUs"}

    def keep(row: dict[str, Any]) -> None:  # written after every configuration: a timeout keeps what ran
        doc["results"].append(row)
        write_outputs(doc, Path(json_path), png=False)

    async def main() -> None:
        shared = None  # one same-GPU peer for the timeline and the GPU0->GPU0 sweep (start-up ~5 s each)
        if timeline and "GPU0->GPU0" in paths:
            shared = bench.ipc_peer(0, 0, "same")
        try:
            await _main(shared)
        finally:
            if shared is not None:
                bench.ipc.remove_peer(shared.info.agent_name)
                shared.close()

    async def _main(shared: PeerProcess | None) -> None:
        if timeline:  # first: short, and the one measurement (d) has none of
            try:
                doc["timeline"] = await bench.timeline("GPU0->GPU0", reps=reps, trace=trace, peer=shared)
                print("timeline GPU0->GPU0 (ms, median):", json.dumps(doc["timeline"]["median"]), flush=True)
                if doc["timeline"]["profile_table"]:
                    print(doc["timeline"]["profile_table"], flush=True)
            except Exception as e:  # noqa: BLE001 - the sweep still runs
                print(f"timeline failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                doc["timeline_error"] = f"{type(e).__name__}: {e}"[:300]
            write_outputs(doc, Path(json_path), png=False)
        for p in paths:
            await bench.sweep(p, SWEEP[p], keep, peer=shared if p == "GPU0->GPU0" else None)
        if profile_cross and "GPU0->GPU1" in paths:  # last: the sweep's rows are already written
            cfgs = [{"cross_kernel": "staged-torch", "cross_slice_bytes": 64 << 20, "cross_slots": 2},
                    {"cross_kernel": "staged-torch", "cross_slice_bytes": 256 << 20, "cross_slots": 3},
                    {"cross_kernel": "direct-read", "triton_block": 4096}]
            try:
                doc["profiles"] = await bench.profile_one("GPU0->GPU1", profile_cross, cfgs)
                for f, t in doc["profiles"].items():
                    print(f"profile {f}:\n{t}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"profile failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            write_outputs(doc, Path(json_path), png=False)

    try:
        asyncio.run(main())
    finally:
        bar.close()
        bench.close()
    write_outputs(doc, Path(json_path), png=False)
    return doc


def dry_run(json_dir: Path) -> dict[str, Any]:
    """CPU check of what the GPU session runs: every SWEEP config is a valid rowcopy tuning, the NCCL row
    code runs (gloo, two processes, tiny layout, verified), and the summary reads the files it writes."""
    from dynamo_ext.transport import rowcopy
    from dynamo_ext.transport.fallbacks import nccl

    saved = dict(rowcopy.TUNING)
    try:
        for p, cfgs in SWEEP.items():
            for c in cfgs:
                rowcopy.tune(**{k: v for k, v in c.items() if k != "plan_cache"})
    finally:
        rowcopy.TUNING.clear()
        rowcopy.TUNING.update(saved)
    rows = nccl.run_pair("gloo", (0, 1), "tiny", 1 << 20, 1, list(nccl.METHODS), slice_bytes=256 << 10, timeout=120)
    doc = {"machine": machine_string(), "size_bytes": 1 << 20, "layout": "tiny", "reps": 1,
           "results": [{"path": "host->host (gloo)", "method": r["method"], "gbps": r["gbps"],
                        "descriptors": r["descriptors"], "verified": r["verified"], "backend": "gloo send/recv"}
                       for r in rows],
           "sweep_configs": sum(len(v) for v in SWEEP.values())}
    json_dir.mkdir(parents=True, exist_ok=True)
    write_outputs(doc, json_dir / "dry-run.json", png=False)
    return doc


def summarize(files: Sequence[str | Path]) -> str:
    """One table over result JSONs (bench rows, sweep rows, timeline medians), best first per path."""
    lines = ["| source | path | method | backend / config | GB/s | verified |", "|---|---|---|---|---:|---|"]
    notes = []
    for f in files:
        f = Path(f)
        if not f.exists():
            notes.append(f"missing: {f.name} (stage failed or timed out)")
            continue
        try:
            doc = json.loads(f.read_text())
        except ValueError as e:
            notes.append(f"unreadable: {f.name}: {e}")
            continue
        for r in doc.get("results", []):
            err = f" ERROR {r['error'][:60]}" if r.get("error") else ""
            lines.append(f"| {f.stem} | {r['path']} | {row_name(r)} | {r.get('detail') or r.get('backend', '')} | "
                         f"{r['gbps']:.1f} | {r['verified']}{err} |")
        for r in best_rows(doc.get("results", [])):
            notes.append(f"best {f.stem} {r['path']}: {r['gbps']:.1f} GB/s {row_name(r)} ({_setting(r)})")
        tl = doc.get("timeline")
        if tl:
            notes.append(f"timeline {tl['path']} ms: " + ", ".join(f"{k}={v}" for k, v in tl["median"].items()))
    return "\n".join(lines + [""] + notes) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    global NCCL_SLICE_BYTES
    p = argparse.ArgumentParser(prog="dynamo-ext bench transfer", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--size", default="1GiB", help="bytes per transfer (suffixes KiB, MiB, GiB)")
    p.add_argument("--layout", default="llama3-70b", help="KV layout preset: llama3-70b, llama3-8b, tiny")
    p.add_argument("--out", "--json", dest="json", default=None, metavar="PATH",
                   help="result JSON (+ .md, .png next to it); overwritten if it exists. Default: a new temporary "
                        "directory (printed), so committed results in benchmarks/results are never overwritten")
    p.add_argument("--paths", default="", help=f"comma-separated subset of {list(PATHS)}")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per path and method")
    p.add_argument("--methods", default="", help=f"comma-separated subset of {METHODS + EXTRA} (default: all)")
    p.add_argument("--tune", default="", help="rowcopy tuning for this run, e.g. cross_kernel=direct-read,triton_block=4096")
    p.add_argument("--nccl-slice-bytes", type=int, default=NCCL_SLICE_BYTES, help="nccl-planned slices (0: one message)")
    p.add_argument("--sweep", default="", help=f"sweep rowcopy tunings on these paths ({list(SWEEP)}, or 'all')")
    p.add_argument("--timeline", action="store_true", help="with --sweep: phase timeline of one same-GPU transfer")
    p.add_argument("--trace", default=None, help="with --timeline: torch.profiler chrome trace file")
    p.add_argument("--profile-cross", default=None, metavar="FILE",
                   help="with --sweep GPU0->GPU1: torch.profiler traces of one transfer for 3 tunings (FILE-<i>.json)")
    p.add_argument("--dry-run", default=None, metavar="DIR", help="CPU check of the GPU session's Python parts")
    p.add_argument("--summarize", nargs="*", default=None, metavar="JSON", help="print one table over result files")
    a = p.parse_args(argv)
    NCCL_SLICE_BYTES = a.nccl_slice_bytes
    if a.summarize is not None:
        print(summarize(a.summarize), flush=True)
        return 0
    if a.dry_run:
        d = dry_run(Path(a.dry_run))
        print(markdown_table(d), flush=True)
        return 0 if all(r["verified"] for r in d["results"]) else 1
    if a.tune:
        from dynamo_ext.transport import rowcopy

        rowcopy.tune(**rowcopy.parse_tuning(a.tune))
    if a.sweep:
        sp = list(SWEEP) if a.sweep == "all" else [x for x in a.sweep.split(",") if x]
        bad = [x for x in sp if x not in SWEEP]
        if bad:
            raise SystemExit(f"--sweep: unknown paths {bad}; allowed: {list(SWEEP)} or 'all'")
        if len(_gpus()) < 2:
            sp = [x for x in sp if PATHS[x][1] == 0]
        out = a.json or str(default_out(f"transfer-sweep-{a.layout}-{parse_size(a.size) >> 20}MiB"))
        print(f"bench transfer --sweep: writing {out}", file=sys.stderr, flush=True)
        d = run_sweep(sp, parse_size(a.size), a.layout, a.reps, out, a.timeline, a.trace, a.profile_cross)
        print(summarize([out]), flush=True)
        return 0
    r = run_transfer_bench(parse_size(a.size), a.layout, a.json, [x for x in a.paths.split(",") if x] or None, a.reps,
                           [x for x in a.methods.split(",") if x] or None)
    print(markdown_table(r), flush=True)  # the table, last
    print(f"results: {r['json_path']} (+ .md, .png)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
