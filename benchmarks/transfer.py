"""KV transfer benchmark: naive vs planned descriptors vs the NIXL and copy ceilings, two processes.

Protocol::

    run_transfer_bench(size_bytes, layout_name, json_path, paths=None)
      for each path (host->host; with CUDA also GPU0->GPU0, GPU0->GPU1, GPU0->host):
        1. a peer PROCESS (dynamo_ext.transport.probe peer) holds the destination pool (+ staging)
           on the path's destination device; this process holds the source pool (one NIXL agent
           for the whole run, pools registered once)
        2. block ids: k = size // block_bytes blocks, source and destination ids are independent
           random subsets of pools 1.5x larger (what a busy allocator leaves)
        3. methods, each 1 warm-up + ``reps`` timed WRITEs, median GB/s, then verified (sha256 of
           the destination chunks in the peer == of the source chunks here):
             naive          transfer_kv_cache with plan_naive (one descriptor per chunk)
             planned        transfer_kv_cache with plan_transfer (merged runs, pool -> pool)
             planned-staged transfer_kv_cache(stage=True): gather into staging here, ONE wire descriptor,
                            the peer recomputes the pure plan and scatters, then acks
             raw-single     one descriptor of the same bytes, pool -> pool (NIXL ceiling)
             memcpy / torch-copy   one local copy of the same bytes on the same devices (copy ceiling)
             cuda-ipc       (GPU->GPU paths) planned transfer through the CUDA IPC fallback backend
                            (rowcopy: Triton row kernel on one GPU; gather -> peer copy -> scatter
                            pipelined over 64 MiB slices across GPUs); cuda-ipc-torch: same, torch ops
             planned        on host->host: through make_backend("auto", memory="host") = the cma backend
                            (process_vm_writev, iovec arrays) when the kernel allows it; then the
                            NIXL row is called planned-nixl; cma-2t/-4t: cma with 2/4 copy threads
             owner-copy     (GPU->host) the GPU owner copies into its own pinned host pool:
                            transfer_kv_cache(gpu_pool, host_pool) (rowcopy.copy_device_to_host,
                            zero-copy when pinned + Triton); owner-copy-staged: gather -> D2H slots ->
                            threaded host scatter; owner-copy-zc: the row kernel stores into pinned
                            host memory directly (UVA zero-copy)
      -> JSON {"machine", "size_bytes", "layout", "results": [{path, method, gbps, descriptors, verified}]}
         + a markdown table and a PNG bar chart next to it (benchmarks/results/ by default)

Runs without the Dynamo runtime (torch, CUDA and nixl only). CLI: ``python benchmarks/transfer.py
--size 1GiB --layout llama3-70b``.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("UCX_NET_DEVICES", "lo")

from dynamo_ext.transport import KvPool, RemotePool, plan_naive, plan_transfer, preset, transfer_kv_cache  # noqa: E402
from dynamo_ext.transport.probe import PeerProcess, digest, fill_pool, pool_bytes, probe_layout  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PATHS: dict[str, tuple[int, int]] = {  # name -> (source device, destination device); -1 = host memory
    "host->host": (-1, -1),
    "GPU0->GPU0": (0, 0),
    "GPU0->GPU1": (0, 1),
    "GPU0->host": (0, -1),
}
METHODS = ["naive", "planned", "planned-staged", "raw-single", "copy"]
EXTRA = ["planned-nixl", "cma-2t", "cma-4t", "cuda-ipc", "cuda-ipc-torch", "owner-copy", "owner-copy-staged",
         "owner-copy-zc"]


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
    """One NIXL agent for the whole run; pools registered once per device."""

    def __init__(self, size_bytes: int, layout_name: str, reps: int, progress: Any,
                 methods: Sequence[str] | None = None) -> None:
        from dynamo_ext.transport.nixl_backend import NixlBackend

        self.methods = set(methods) if methods else None
        self.be = NixlBackend(f"bench-{os.getpid()}")
        self.size, self.layout_name, self.reps, self.bar = size_bytes, layout_name, reps, progress
        lay1 = preset(layout_name, 1)
        self.k = max(1, size_bytes // lay1.block_bytes)
        self.layout = preset(layout_name, self.k + max(1, self.k // 2))
        self.nbytes = self.k * lay1.block_bytes
        rng = np.random.default_rng(0)
        self.src_ids = [int(x) for x in rng.permutation(self.layout.num_blocks)[: self.k]]
        self.dst_ids = [int(x) for x in rng.permutation(self.layout.num_blocks)[: self.k]]
        self.pools: dict[int, tuple[KvPool, KvPool]] = {}

    def local(self, dev: int) -> tuple[KvPool, KvPool]:
        if dev not in self.pools:
            slay = probe_layout(self.nbytes, chunk_bytes=self.layout.chunk_bytes)
            if dev >= 0:
                pool = KvPool.allocate_device("kv", self.layout, dev)
                stg = KvPool.allocate_device("staging", slay, dev)
            else:
                pool = KvPool.allocate_host("kv", self.layout)
                stg = KvPool.allocate_host("staging", slay)
            pool.name, stg.name = f"kv{dev}", f"staging{dev}"
            fill_pool(pool, 5)
            self.be.register_pool(pool)
            self.be.register_pool(stg, staging=True)
            self.pools[dev] = (pool, stg)
        return self.pools[dev]

    def want(self, method: str, path: str | None = None) -> bool:
        """``methods`` entries: a method name (every path) or ``path:method`` (that path only)."""
        path = path or self.path
        return self.methods is None or method in self.methods or f"{path}:{method}" in self.methods

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
        pool, stg = self.local(sdev)
        auto_cma = sdev < 0 and ddev < 0 and cma_available()  # what make_backend("auto", memory="host") picks
        names = {m: ("planned-nixl" if (m == "planned" and auto_cma) else m) for m in METHODS}
        todo = [m for m in METHODS if self.want(names[m])]
        out: list[dict[str, Any]] = []
        if todo:
            out += await self._nixl_methods(path, sdev, ddev, pool, todo, names)
        if auto_cma:
            for threads, name in ((None, "planned"), (2, "cma-2t"), (4, "cma-4t")):
                if self.want(name):
                    out.append(await self._cma(path, pool, threads, name))
        if sdev >= 0 and ddev >= 0:
            from dynamo_ext.transport import rowcopy

            for name, prefer in (("cuda-ipc", True), ("cuda-ipc-torch", False)):
                if self.want(name):
                    rowcopy.PREFER_TRITON = prefer
                    try:
                        out.append(await self._cuda_ipc(path, sdev, ddev, pool, name))
                    finally:
                        rowcopy.PREFER_TRITON = True
        if sdev >= 0 and ddev < 0:
            for name in ("owner-copy", "owner-copy-staged", "owner-copy-zc"):
                if self.want(name):
                    out.append(await self._owner_copy(path, pool, name))
        return out

    async def _nixl_methods(self, path: str, sdev: int, ddev: int, pool: KvPool, todo: list[str],
                            names: dict[str, str]) -> list[dict[str, Any]]:
        peer = PeerProcess.start(backend="nixl", name=f"bench-peer-{path.replace('>', '').replace('-', '')}-{os.getpid()}",
                                 layout=self.layout, seed=11,
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
                h = await transfer_kv_cache(pool, remote, (self.src_ids, self.dst_ids), backend=self.be,
                                            planner=planner, deadline_s=deadline, metrics=None)
                return (await h).descriptors

            async def post_wait(local: KvPool, rem: Any, descs: Any) -> None:
                req = self.be.post("write", local, peer.info.agent_name, rem, descs)
                while not req.poll():
                    await asyncio.sleep(0)

            # the peer must know this agent to ack staged WRITEs
            import base64

            await peer.acall({"cmd": "add_peer", "info": base64.b64encode(self.be.local_peer_info().encode()).decode()})

            async def staged() -> int:
                h = await transfer_kv_cache(pool, remote, (self.src_ids, self.dst_ids), backend=self.be, stage=True,
                                            deadline_s=deadline, metrics=None)
                return (await h).descriptors

            for seed, method in enumerate(METHODS, start=20):
                if method not in todo:
                    continue
                await peer.acall({"cmd": "fill", "seed": seed}, timeout=120)
                ndesc = 1
                if method in ("naive", "planned"):
                    planner = plan_naive if method == "naive" else None
                    ndesc = await via(planner or (lambda *a: plan_transfer(*a, stage=False)))
                    times = await self._timed(lambda p=planner: via(p or (lambda *a: plan_transfer(*a, stage=False))))
                    ok = (await peer.acall({"cmd": "digest", "blocks": self.dst_ids}, timeout=300))["sha256"] == src_digest
                elif method == "planned-staged":
                    ndesc = await staged()
                    times = await self._timed(staged)
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
                            "backend": "local" if is_copy else "nixl"})
                self.bar.set_postfix_str(f"{path} {method} {gbps:.2f} GB/s")
        finally:
            self.be.remove_peer(peer.info.agent_name)
            peer.close()
        return out

    async def _cma(self, path: str, pool: KvPool, threads: int | None, name: str) -> dict[str, Any]:
        """planned (stage=False) WRITEs through the cma backend to a cma peer process."""
        from dynamo_ext.transport import make_backend
        from dynamo_ext.transport.fallbacks.cma import CmaBackend

        be = make_backend("auto", f"bench-cma{threads}-{os.getpid()}", memory="host")
        assert isinstance(be, CmaBackend), type(be)
        be.threads = threads or be.threads  # None: the backend's default
        await be.start()
        lpool = KvPool.from_host_array(pool.name, pool.layout, pool.host_view())  # same bytes, cma-registered
        be.register_pool(lpool)
        peer = PeerProcess.start(backend="cma", name=f"bench-cma-peer{threads}-{os.getpid()}", layout=self.layout,
                                 seed=17, timeout=120)
        try:
            be.add_peer(peer.info)
            remote = RemotePool(peer.info.agent_name, peer.info.pool("kv"))
            nd = [0]

            async def go() -> None:
                h = await transfer_kv_cache(lpool, remote, (self.src_ids, self.dst_ids), backend=be, deadline_s=120,
                                            metrics=None, stage=False)
                nd[0] = (await h).descriptors

            times = await self._timed(go)
            ok = (await peer.acall({"cmd": "digest", "blocks": self.dst_ids}, timeout=300))["sha256"] == \
                digest(pool_bytes(pool), self.layout, self.src_ids)
        finally:
            peer.close()
            await be.close()
        gbps = self.nbytes / statistics.median(times) / 1e9
        self.bar.set_postfix_str(f"{path} {name} {gbps:.2f} GB/s")
        return {"path": path, "method": name, "gbps": round(gbps, 3), "descriptors": int(nd[0]), "verified": bool(ok),
                "backend": f"cma x{be.threads}"}

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
            h = await transfer_kv_cache(pool, tier, (self.src_ids, self.dst_ids), metrics=None)
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
                    "backend": "local", "error": f"{type(e).__name__}: {e}"[:300]}
        ok = digest(tier.host_view(), self.layout, self.dst_ids) == digest(pool_bytes(pool), self.layout, self.src_ids)
        gbps = self.nbytes / statistics.median(times) / 1e9
        self.bar.set_postfix_str(f"{path} {name} {gbps:.2f} GB/s")
        return {"path": path, "method": name, "gbps": round(gbps, 3), "descriptors": int(nd[0]), "verified": bool(ok),
                "backend": {"owner-copy": "local (transfer_kv_cache)", "owner-copy-staged": "local (staged + host scatter)",
                            "owner-copy-zc": "local (zero-copy kernel)"}[name]}

    async def _cuda_ipc(self, path: str, sdev: int, ddev: int, pool: KvPool, name: str = "cuda-ipc") -> dict[str, Any]:
        """planned transfer through the CUDA IPC fallback (a second peer process, same node)."""
        from dynamo_ext.transport.fallbacks.cuda_ipc import CudaIpcBackend

        if getattr(self, "ipc", None) is None:
            self.ipc = CudaIpcBackend(f"bench-ipc-{os.getpid()}")
        ipc = self.ipc
        if not ipc.is_registered(pool):
            ipc.register_pool(pool)
        peer = PeerProcess.start(backend="cuda_ipc", name=f"bench-{name}-peer-{sdev}{ddev}-{os.getpid()}",
                                 layout=self.layout, seed=13, extra=["--device", str(ddev)], timeout=120)
        try:
            ipc.add_peer(peer.info)
            remote = RemotePool(peer.info.agent_name, peer.info.pool("kv"))
            nd = [0]

            async def go() -> None:
                h = await transfer_kv_cache(pool, remote, (self.src_ids, self.dst_ids), backend=ipc, deadline_s=60,
                                            metrics=None)
                nd[0] = (await h).descriptors

            times = await self._timed(go)
            ok = (await peer.acall({"cmd": "digest", "blocks": self.dst_ids}, timeout=300))["sha256"] == \
                digest(pool_bytes(pool), self.layout, self.src_ids)
            ipc.remove_peer(peer.info.agent_name)
        finally:
            peer.close()
        gbps = self.nbytes / statistics.median(times) / 1e9
        self.bar.set_postfix_str(f"{path} {name} {gbps:.2f} GB/s")
        return {"path": path, "method": name, "gbps": round(gbps, 3), "descriptors": int(nd[0]), "verified": bool(ok),
                "backend": "cuda_ipc" + (" (triton)" if name == "cuda-ipc" and _triton() and sdev == ddev else " (torch)")}

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


def markdown_table(result: dict[str, Any]) -> str:
    lines = [f"# KV transfer benchmark: {result['layout']}, {result['size_bytes'] / 2**30:.3f} GiB",
             "", f"Machine: {result['machine']}", "",
             f"Median of {result.get('reps', '?')} timed repetitions after one warm-up; every row verified byte "
             "for byte (sha256 of the destination chunks vs the source chunks).", "",
             "| path | method | backend | GB/s | descriptors | verified |", "|---|---|---|---:|---:|---|"]
    for r in result["results"]:
        err = f" ({r['error']})" if r.get("error") else ""
        lines.append(f"| {r['path']} | {r['method']} | {r.get('backend', '')} | {r['gbps']:.2f} | {r['descriptors']} | "
                     f"{r['verified']}{err} |")
    return "\n".join(lines) + "\n"


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
    labels = [f"{r['path']}\n{r['method']}" for r in res]
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
    n = len(methods) if methods else len(METHODS) + 2
    bar = tqdm(total=len(paths) * n * (reps + 1), desc="kv-transfer", unit="xfer", file=sys.stderr)
    bench = _Bench(size_bytes, layout_name, reps, bar, methods)

    if json_path is None:
        tag = "gpu" if _gpus() else "cpu"
        json_path = RESULTS / f"transfer-{tag}-{layout_name}-{size_bytes >> 20}MiB.json"

    def result_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"machine": machine_string(), "size_bytes": int(bench.nbytes), "layout": layout_name, "reps": reps,
                "results": rows}

    async def main() -> list[dict[str, Any]]:
        res: list[dict[str, Any]] = []
        for p in paths:
            rows = await bench.run_path(p)
            res += rows
            for r in rows:  # progress on stdout, and partial outputs in case the run is cut short
                print(f"{r['path']:12s} {r['method']:15s} {r['gbps']:10.2f} GB/s {r['descriptors']:6d} desc "
                      f"verified={r['verified']} {r.get('error', '')}", flush=True)
            write_outputs(result_of(res), Path(json_path), png=False)
        return res

    try:
        results = asyncio.run(main())
    finally:
        bar.close()
        bench.be.close_sync()
    result = result_of(results)
    write_outputs(result, Path(json_path))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1GiB")
    p.add_argument("--layout", default="llama3-70b")
    p.add_argument("--json", default=None)
    p.add_argument("--paths", default="", help=f"comma-separated subset of {list(PATHS)}")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--methods", default="", help=f"comma-separated subset of {METHODS + EXTRA} (default: all)")
    a = p.parse_args(argv)
    r = run_transfer_bench(parse_size(a.size), a.layout, a.json, [x for x in a.paths.split(",") if x] or None, a.reps,
                           [x for x in a.methods.split(",") if x] or None)
    print(markdown_table(r), flush=True)  # the table, last
    return 0


if __name__ == "__main__":
    sys.exit(main())
