"""Limits of a host -> host KV copy on this machine, measured in ONE process (no transport): what the shm
backend (transport/fallbacks/shm.py) can reach at best, and where the time goes.

    python benchmarks/transfer_shm_limits.py [--size 512MiB] [--rounds 7] [--out PATH.json]

Rows (interleaved round by round, median; wall time AND this thread's CPU time, which a shared box
disturbs less):
  memcpy anon / shm        np.copyto of ``size`` contiguous bytes (anonymous memory with THP as numpy
                           allocates it / a memfd mapping like a shared pool)
  python <src>-><dst>      the bench's work: size // 32 KiB chunks, random source and destination
                           blocks of pools 1.5x larger, one memoryview slice assignment per chunk
                           (hostcopy.copy_runs: the shm backend without a C compiler)
  native <src>-><dst>, Nt  the same chunks through hostcopy's compiled loop (memcpy per chunk, GIL
                           released) in N threads: the shm backend's default executor
  per-chunk Python cost    the python loop on 64-byte chunks in cache (the interpreter's part alone)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynamo_ext.transport.fallbacks.hostcopy import (  # noqa: E402
    copy_runs,
    copy_runs_native,
    native_available,
    split_parts,
)
from dynamo_ext.transport.pool import shared_host_array  # noqa: E402

CHUNK = 32 << 10


def parse_size(s: str) -> int:
    s = s.lower()
    for suf, mul in (("gib", 1 << 30), ("mib", 1 << 20)):
        if s.endswith(suf):
            return int(float(s[: -len(suf)]) * mul)
    return int(s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="512MiB")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    size = parse_size(a.size)
    k = size // CHUNK
    nblk = k * 3 // 2
    rng = np.random.default_rng(0)
    srows = np.sort(rng.permutation(nblk)[:k]).astype(np.int64)  # the plan sorts by source offset
    drows = rng.permutation(nblk)[:k].astype(np.int64)
    pool = nblk * CHUNK
    bufs = {"anon": np.full(pool, 3, np.uint8), "anon2": np.full(pool, 0, np.uint8),
            "shm": shared_host_array(pool, "limits-a", fill=3), "shm2": shared_host_array(pool, "limits-b", fill=0)}
    so, do, ln = (srows * CHUNK).tolist(), (drows * CHUNK).tolist(), [CHUNK] * k
    native = native_available()

    def scattered(s: str, d: str):
        sv, dv = memoryview(bufs[s]), memoryview(bufs[d])
        return lambda: copy_runs(dv, sv, do, so, ln)

    def native_rows(s: str, d: str, threads: int):
        sa, da = bufs[s].ctypes.data, bufs[d].ctypes.data
        sn, dn, nn = srows * CHUNK, drows * CHUNK, np.full(k, CHUNK, np.int64)
        parts = split_parts(nn, threads)

        def run() -> None:
            ts = [threading.Thread(target=copy_runs_native, args=(da, sa, dn[x:y], sn[x:y], nn[x:y]))
                  for x, y in parts[1:]]
            for t in ts:
                t.start()
            x, y = parts[0]
            copy_runs_native(da, sa, dn[x:y], sn[x:y], nn[x:y])
            for t in ts:
                t.join()
        return run

    rows = {
        "memcpy anon (THP)": lambda: np.copyto(bufs["anon2"][:size], bufs["anon"][:size]),
        "memcpy shm": lambda: np.copyto(bufs["shm2"][:size], bufs["shm"][:size]),
        "python anon->anon, 1 thread": scattered("anon", "anon2"),
        "python shm->anon, 1 thread": scattered("shm", "anon2"),
        "python shm->shm, 1 thread": scattered("shm", "shm2"),
    }
    if native:
        rows["native anon->anon, 1 thread"] = native_rows("anon", "anon2", 1)
        rows["native shm->shm, 1 thread"] = native_rows("shm", "shm2", 1)
        rows["native shm->shm, 2 threads"] = native_rows("shm", "shm2", 2)
    wall: dict[str, list[float]] = {r: [] for r in rows}
    cpu: dict[str, list[float]] = {r: [] for r in rows}
    load_before = open("/proc/loadavg").read().split()[:3]
    for f in rows.values():
        f()  # warm-up: pages touched, mappings populated
    for _ in range(a.rounds):
        for r, f in rows.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            f()
            cpu[r].append(time.thread_time() - c0)
            wall[r].append(time.perf_counter() - t0)
    # the interpreter's share: the same loops on 64-byte chunks (in cache)
    small = np.zeros(1 << 20, np.uint8)
    sm, dm = memoryview(small), memoryview(np.zeros(1 << 20, np.uint8))
    sso = (rng.integers(0, (1 << 20) // 64, k) * 64).tolist()
    sdo = (rng.integers(0, (1 << 20) // 64, k) * 64).tolist()
    per_mv = []
    for _ in range(5):
        c0 = time.thread_time()
        copy_runs(dm, sm, sdo, sso, [64] * k)
        per_mv.append((time.thread_time() - c0) / k * 1e6)
    load_after = open("/proc/loadavg").read().split()[:3]
    base_w = size / statistics.median(wall["memcpy anon (THP)"]) / 1e9
    base_c = size / statistics.median(cpu["memcpy anon (THP)"]) / 1e9
    res = []
    for r in rows:
        w, c = size / statistics.median(wall[r]) / 1e9, size / statistics.median(cpu[r]) / 1e9
        us = (statistics.median(cpu[r]) - statistics.median(cpu["memcpy anon (THP)"])) / k * 1e6
        res.append({"row": r, "wall_gbps": round(w, 2), "wall_x_memcpy": round(w / base_w, 3),
                    "cpu_gbps": round(c, 2), "cpu_x_memcpy": round(c / base_c, 3),
                    "us_per_chunk_over_memcpy_cpu": round(us, 3)})
    doc = {"machine": f"{platform.node()}: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
                      f"python {platform.python_version()}",
           "size_bytes": size, "chunks": k, "chunk_bytes": CHUNK, "rounds": a.rounds,
           "load_before": load_before, "load_after": load_after, "results": res,
           "python_us_per_chunk_in_cache": round(statistics.median(per_mv), 3),
           "note": "cpu_* = this thread's CPU time (2-thread row: the calling thread only, not comparable)"}
    print(f"{'row':34s} {'wall GB/s':>9s} {'x memcpy':>8s} {'cpu GB/s':>9s} {'x memcpy':>8s} {'us/chunk':>8s}")
    for x in res:
        print(f"{x['row']:34s} {x['wall_gbps']:9.2f} {x['wall_x_memcpy']:8.3f} {x['cpu_gbps']:9.2f} "
              f"{x['cpu_x_memcpy']:8.3f} {x['us_per_chunk_over_memcpy_cpu']:8.3f}")
    print("python per chunk in cache (us):", doc["python_us_per_chunk_in_cache"], "load", load_before, "->", load_after)
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
