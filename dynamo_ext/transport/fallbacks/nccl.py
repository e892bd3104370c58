"""NCCL send/recv between two processes of one node: the comparison rows of ``bench transfer``.

Not a TransferBackend (NCCL has no one-sided writes into a registered pool: both sides must post);
it answers "what would torch.distributed send/recv give for the same bytes?".

Protocol::

    run_pair(backend="nccl"|"gloo", devices=(0, 1), layout_name, size_bytes, reps, methods, slice_bytes)
      1. picks a free port on 127.0.0.1 and spawns two processes
         ``python -m dynamo_ext.transport.fallbacks.nccl --rank r --port P ...`` (rank 0 sends, rank 1
         receives); each: TCPStore(127.0.0.1, P) (rank 0 hosts it) -> init_process_group(backend,
         store, rank, world_size=2); device = cuda:devices[r] (gloo: host memory)
      2. both ranks derive the SAME layout and block ids from (layout_name, size_bytes): k blocks of
         the layout, ids = independent random subsets of a pool 1.5x larger (seed 0; as the benchmark)
         and the same pure plan (plan_transfer(stage=False): merged runs)
      3. per method, 1 warm-up + ``reps`` timed, each between two barriers; the receiver times from
         its barrier to "bytes in place" (device synchronised):
           nccl-single   one contiguous send/recv of the k blocks' bytes (the NCCL ceiling)
           nccl-planned  sender gathers the merged runs into a contiguous buffer (row index_select),
                         sends it in slices of ``slice_bytes`` (0: one message) with isend; the
                         receiver irecv's every slice, then per slice waits and scatters (index_copy_)
                         into its pool, so the gather/send/scatter of different slices overlap
      4. verification: the sender sends sha256 of its source chunks (32 bytes, a uint8 tensor: no
         pickle); the receiver compares with sha256 of its destination chunks
      5. rank 1 prints one JSON line per method {"event": "row", method, gbps, descriptors, verified,
         slice_bytes}; both print {"event": "done"}; errors: {"event": "error", "error": ...}, exit 1

gloo runs the same code on host memory (tests on CPU); NCCL needs one GPU per rank.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

import numpy as np

BACKENDS = ("nccl", "gloo")
METHODS = ("nccl-single", "nccl-planned")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_case(layout_name: str, size_bytes: int) -> tuple[Any, list[int], list[int], int]:
    """(layout, source ids, destination ids, payload bytes): identical in both ranks and in benchmarks/transfer.py."""
    from ..layout import preset  # noqa: PLC0415

    lay1 = preset(layout_name, 1)
    k = max(1, size_bytes // lay1.block_bytes)
    layout = preset(layout_name, k + max(1, k // 2))
    rng = np.random.default_rng(0)
    src = [int(x) for x in rng.permutation(layout.num_blocks)[:k]]
    dst = [int(x) for x in rng.permutation(layout.num_blocks)[:k]]
    return layout, src, dst, k * lay1.block_bytes


def _digest_chunks(pool_host: np.ndarray, layout: Any, blocks: Sequence[int] | None, nbytes: int) -> bytes:
    from ..verify import digest  # noqa: PLC0415

    if blocks is None:
        return hashlib.sha256(memoryview(pool_host[:nbytes])).digest()
    return bytes.fromhex(digest(pool_host, layout, list(blocks)))


def _worker(a: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    from ..plan import plan_transfer  # noqa: PLC0415
    from ..verify import pattern  # noqa: PLC0415
    from ..rowcopy import rows_of  # noqa: PLC0415
    from ..staging import _as_rows  # noqa: PLC0415

    rank = a.rank
    if a.backend == "nccl":
        dev_i = int(a.devices.split(",")[rank])
        torch.cuda.set_device(dev_i)
        dev = torch.device(f"cuda:{dev_i}")
    else:
        dev = torch.device("cpu")
    store = dist.TCPStore("127.0.0.1", a.port, 2, is_master=rank == 0, timeout=__import__("datetime").timedelta(seconds=a.timeout))
    dist.init_process_group(a.backend, store=store, rank=rank, world_size=2,
                            timeout=__import__("datetime").timedelta(seconds=a.timeout))

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def barrier() -> None:
        if a.backend == "nccl":
            dist.barrier(device_ids=[dev.index])
        else:
            dist.barrier()
        sync()

    layout, src_ids, dst_ids, nbytes = bench_case(a.layout, a.size)
    host = np.empty(layout.pool_bytes, dtype=np.uint8)
    pattern(host, 5 if rank == 0 else 11)
    pool = torch.from_numpy(host).to(dev) if dev.type == "cuda" else torch.from_numpy(host)
    plan = plan_transfer(layout, src_ids, layout, dst_ids, stage=False)
    srows, drows, unit = rows_of(plan.wire, layout.pool_bytes, layout.pool_bytes)
    n = srows.shape[0]
    stg = torch.empty(n * unit, dtype=torch.uint8, device=dev)
    pool2d, stg2d = _as_rows(pool, unit, stg), _as_rows(stg, unit, pool)
    idx = torch.from_numpy(srows if rank == 0 else drows).to(dev)
    rows_per = n if a.slice_bytes <= 0 else max(1, min(n, a.slice_bytes // unit))
    cuts = [(lo, min(n, lo + rows_per)) for lo in range(0, n, rows_per)]
    peer = 1 - rank

    def single() -> None:
        buf = pool[:nbytes]
        if rank == 0:
            dist.send(buf, peer)
        else:
            dist.recv(buf, peer)

    def planned() -> None:
        if rank == 0:
            works = []
            for lo, hi in cuts:
                torch.index_select(pool2d, 0, idx[lo:hi], out=stg2d[lo:hi])
                works.append(dist.isend(stg[lo * unit:hi * unit], peer))
            for w in works:
                w.wait()
        else:
            works = [dist.irecv(stg[lo * unit:hi * unit], peer) for lo, hi in cuts]
            for (lo, hi), w in zip(cuts, works):
                w.wait()  # NCCL: the current stream waits for this slice; gloo: blocks until it arrived
                pool2d.index_copy_(0, idx[lo:hi], stg2d[lo:hi])
        sync()

    for method in [m for m in a.methods.split(",") if m]:
        fn = single if method == "nccl-single" else planned
        if rank == 1:  # fresh destination bytes, so a method that moved nothing cannot verify
            pattern(host, 11 + len(method))
            pool.copy_(torch.from_numpy(host))
        times = []
        for i in range(a.reps + 1):
            barrier()
            t0 = time.perf_counter()
            fn()
            sync()
            if i:
                times.append(time.perf_counter() - t0)
            barrier()
        view = pool.cpu().numpy() if dev.type == "cuda" else pool.numpy()
        blocks = None if method == "nccl-single" else (src_ids if rank == 0 else dst_ids)
        mine = _digest_chunks(view, layout, blocks, nbytes)
        d = torch.frombuffer(bytearray(mine), dtype=torch.uint8).to(dev)
        if rank == 0:
            dist.send(d, 1)
        else:
            theirs = torch.empty(32, dtype=torch.uint8, device=dev)
            dist.recv(theirs, 0)
            ok = bytes(theirs.cpu().numpy().tobytes()) == mine
            print(json.dumps({"event": "row", "method": method, "gbps": round(nbytes / statistics.median(times) / 1e9, 3),
                              "descriptors": 1 if method == "nccl-single" else len(plan.wire),
                              "slices": 1 if method == "nccl-single" else len(cuts),
                              "slice_bytes": nbytes if method == "nccl-single" else rows_per * unit,
                              "verified": bool(ok), "backend": a.backend}), flush=True)
    barrier()
    dist.destroy_process_group()
    print(json.dumps({"event": "done", "rank": rank}), flush=True)
    return 0


def run_pair(backend: str = "nccl", devices: tuple[int, int] = (0, 1), layout_name: str = "llama3-70b",
             size_bytes: int = 1 << 30, reps: int = 5, methods: Sequence[str] = METHODS, slice_bytes: int = 0,
             timeout: float = 300.0) -> list[dict[str, Any]]:
    """Two processes, rank 0 (devices[0]) -> rank 1 (devices[1]); returns the receiver's rows."""
    if backend not in BACKENDS:
        raise ValueError(f"nccl.run_pair: backend={backend!r}; allowed: {list(BACKENDS)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"nccl.run_pair: unknown methods {bad}; allowed: {list(METHODS)}")
    port = free_port()
    env = dict(os.environ)
    env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    procs = []
    for r in (0, 1):
        cmd = [sys.executable, "-m", "dynamo_ext.transport.fallbacks.nccl", "--rank", str(r), "--port", str(port),
               "--backend", backend, "--devices", f"{devices[0]},{devices[1]}", "--layout", layout_name,
               "--size", str(size_bytes), "--reps", str(reps), "--methods", ",".join(methods),
               "--slice-bytes", str(slice_bytes), "--timeout", str(int(timeout))]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        raise TimeoutError(f"nccl pair ({backend}) did not finish in {timeout:.0f} s") from None
    rows: list[dict[str, Any]] = []
    for line in outs[1][0].splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and ev.get("event") == "row":
            rows.append(ev)
    if any(p.returncode for p in procs) or len(rows) != len(methods):
        tail = " | ".join(f"rank{r} rc={p.returncode}: {outs[r][1][-800:]}" for r, p in enumerate(procs))
        raise RuntimeError(f"nccl pair ({backend}) failed: {tail}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynamo_ext.transport.fallbacks.nccl")
    p.add_argument("--rank", type=int, required=True, choices=[0, 1])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--backend", default="nccl", choices=list(BACKENDS))
    p.add_argument("--devices", default="0,1")
    p.add_argument("--layout", default="llama3-70b")
    p.add_argument("--size", type=int, default=1 << 30)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--slice-bytes", type=int, default=0)
    p.add_argument("--timeout", type=int, default=300)
    a = p.parse_args(argv)
    try:
        return _worker(a)
    except Exception as e:  # noqa: BLE001 - one line for the launcher, then fail
        print(json.dumps({"event": "error", "rank": a.rank, "error": f"{type(e).__name__}: {e}"[:500]}), flush=True)
        print(f"rank {a.rank}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
