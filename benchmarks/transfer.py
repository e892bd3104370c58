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


def _gpus() -> list[str]:
    if not os.path.exists("/dev/nvidiactl"):
        return []
    try:
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


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

    def __init__(self, size_bytes: int, layout_name: str, reps: int, progress: Any) -> None:
        from dynamo_ext.transport.nixl_backend import NixlBackend

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
        sdev, ddev = PATHS[path]
        pool, stg = self.local(sdev)
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
                out.append({"path": path, "method": method, "gbps": round(gbps, 3), "descriptors": int(ndesc),
                            "verified": bool(ok)})
                self.bar.set_postfix_str(f"{path} {method} {gbps:.2f} GB/s")
        finally:
            self.be.remove_peer(peer.info.agent_name)
            peer.close()
        if sdev >= 0 and ddev >= 0:
            out.append(await self._cuda_ipc(path, sdev, ddev, pool))
        return out

    async def _cuda_ipc(self, path: str, sdev: int, ddev: int, pool: KvPool) -> dict[str, Any]:
        """planned transfer through the CUDA IPC fallback (a second peer process, same node)."""
        from dynamo_ext.transport.fallbacks.cuda_ipc import CudaIpcBackend

        if getattr(self, "ipc", None) is None:
            self.ipc = CudaIpcBackend(f"bench-ipc-{os.getpid()}")
        ipc = self.ipc
        if not ipc.is_registered(pool):
            ipc.register_pool(pool)
        peer = PeerProcess.start(backend="cuda_ipc", name=f"bench-ipc-peer-{sdev}{ddev}-{os.getpid()}",
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
        self.bar.set_postfix_str(f"{path} cuda-ipc {gbps:.2f} GB/s")
        return {"path": path, "method": "cuda-ipc", "gbps": round(gbps, 3), "descriptors": int(nd[0]), "verified": bool(ok)}

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


def write_outputs(result: dict[str, Any], json_path: Path) -> tuple[Path, Path]:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md = json_path.with_suffix(".md")
    lines = [f"# KV transfer benchmark: {result['layout']}, {result['size_bytes'] / 2**30:.3f} GiB",
             "", f"Machine: {result['machine']}", "",
             "| path | method | GB/s | descriptors | verified |", "|---|---|---:|---:|---|"]
    for r in result["results"]:
        lines.append(f"| {r['path']} | {r['method']} | {r['gbps']:.2f} | {r['descriptors']} | {r['verified']} |")
    md.write_text("\n".join(lines) + "\n")
    png = json_path.with_suffix(".png")
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
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return md, png


def run_transfer_bench(size_bytes: int = 1 << 30, layout_name: str = "llama3-70b", json_path: str | Path | None = None,
                       paths: Sequence[str] | None = None, reps: int = 5) -> dict[str, Any]:
    from tqdm import tqdm

    paths = list(paths or default_paths())
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ValueError(f"unknown paths {unknown}; known: {list(PATHS)}")
    n_ipc = sum(1 for p in paths if min(PATHS[p]) >= 0)
    bar = tqdm(total=(len(paths) * len(METHODS) + n_ipc) * (reps + 1), desc="kv-transfer", unit="xfer", file=sys.stderr)
    bench = _Bench(size_bytes, layout_name, reps, bar)

    async def main() -> list[dict[str, Any]]:
        res = []
        for p in paths:
            res += await bench.run_path(p)
        return res

    try:
        results = asyncio.run(main())
    finally:
        bar.close()
        bench.be.close_sync()
    result = {"machine": machine_string(), "size_bytes": int(bench.nbytes), "layout": layout_name, "results": results}
    if json_path is None:
        tag = "gpu" if _gpus() else "cpu"
        json_path = RESULTS / f"transfer-{tag}-{layout_name}-{size_bytes >> 20}MiB.json"
    write_outputs(result, Path(json_path))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1GiB")
    p.add_argument("--layout", default="llama3-70b")
    p.add_argument("--json", default=None)
    p.add_argument("--paths", default="", help=f"comma-separated subset of {list(PATHS)}")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    r = run_transfer_bench(parse_size(a.size), a.layout, a.json, [x for x in a.paths.split(",") if x] or None, a.reps)
    for row in r["results"]:
        print(f"{row['path']:12s} {row['method']:15s} {row['gbps']:9.2f} GB/s  {row['descriptors']:6d} desc  "
              f"verified={row['verified']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
