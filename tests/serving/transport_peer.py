"""The other process of tests/serving/test_transports.py: a worker's transports over a host KV pool.

    python tests/serving/transport_peer.py --blocks N --seed S [--force tcp] [--no-nixl] [--shared]

Fills its pool with ``transport.verify.pattern(seed)``, starts ``serving.WorkerTransports`` (every backend it
can run), prints one JSON line ``{"blob": <PeerTransports hex>, "backends": [...], "skipped": {...}}`` and
serves until stdin closes (or says "exit").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dynamo_ext.serving.transports import TransportOptions, WorkerTransports  # noqa: E402
from dynamo_ext.topology import collect_local_topology  # noqa: E402
from dynamo_ext.topology.select import Endpoint  # noqa: E402
from dynamo_ext.transport import KvPool, preset  # noqa: E402
from dynamo_ext.transport.verify import pattern  # noqa: E402


async def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--blocks", type=int, default=64)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--force", default="auto")
    p.add_argument("--no-nixl", action="store_true")
    p.add_argument("--shared", action="store_true", help="the pool in shared memory (as the engine's CPU pool)")
    a = p.parse_args()
    pool = KvPool.allocate_host("kv-prefill", preset("tiny", a.blocks), pin=False, shared=a.shared)
    pattern(pool.buffer, a.seed)
    topo = collect_local_topology(None)
    ts = WorkerTransports(f"peer-{topo.pid}", pool, Endpoint(topo, topo.pid, "host"),
                          TransportOptions(nixl=not a.no_nixl, force=a.force))
    await ts.start()
    print(json.dumps({"blob": ts.advertise().encode().hex(), "backends": list(ts.backends), "skipped": ts.skipped}),
          flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line or line.strip() == b"exit":
            break
    await ts.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
