"""The prefill side of ``bench transfer``'s ``product-pull`` row: a process that runs
``serving.WorkerTransports`` over its KV pool exactly as a prefill worker does (every backend its topology
supports, the pool registered once with each, advertised as ``PeerTransports``), so that the bench process can
time ``WorkerTransports.pull`` against it.

Protocol::

    peer = PullPeer.start(name=..., layout=..., device=-1 | cuda index, seed=S)
      spawns  python -m dynamo_ext.bench._pull_peer --name N --layout JSON --pool kv-prefill --seed S --device D
              [--force auto|nvlink|pcie|rdma|tcp] [--no-nixl]
      the peer: a host pool (``--device -1``) or a pool on cuda:D, filled with ``verify.pattern(S)``;
              topology = collect_local_topology(D or None) (as ``ServingWorker.start``), Endpoint(topology, pid,
              "host" | topology.worker_gpu); WorkerTransports(...).start(); prints ONE JSON line
              {"event": "ready", "blob": <PeerTransports msgpack, hex>, "backends": [...], "skipped": {...}}
      peer.transports                  -> the decoded PeerTransports (what a decode worker finds in the record)
      JSON-line commands (the probe peer's subset, same replies), answered while the transports keep serving:
        {"cmd": "fill", "seed": s} | {"cmd": "clear", "value": v}
        {"cmd": "digest", "blocks": [...]}        -> {"ok": true, "sha256": hex}    (verify.digest of the chunks)
        {"cmd": "fingerprint", "blocks": [...]}   -> {"ok": true, "fingerprint": hex}
        {"cmd": "exit"}
      peer.close()                     -> exit, SIGKILL after a timeout (``probe.PeerProcess``)

Only the bench uses it; tests/serving/transport_peer.py is the tests' own (tiny host pool) version.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from typing import Any

from dynamo_ext.transport import KvLayout, KvPool
from dynamo_ext.transport.pool import shared_memory_available
from dynamo_ext.transport.probe import PeerProcess, clear_pool, digest, fill_pool, fingerprint, pool_bytes

POOL = "kv-prefill"


class PullPeer(PeerProcess):
    """A ``_pull_peer`` process; ``transports`` is its decoded ``PeerTransports``, ``ready`` its ready line."""

    transports: Any
    ready: dict[str, Any]

    @classmethod
    def start_peer(cls, *, name: str, layout: KvLayout, device: int = -1, seed: int = 1, pool: str = POOL,
                   force: str = "auto", nixl: bool = True, env: dict[str, str] | None = None,
                   timeout: float = 120.0) -> "PullPeer":
        from dynamo_ext.serving.transports import PeerTransports  # noqa: PLC0415

        cmd = [sys.executable, "-m", "dynamo_ext.bench._pull_peer", "--name", name, "--layout",
               json.dumps(layout.to_dict()), "--pool", pool, "--seed", str(seed), "--device", str(device),
               "--force", force] + ([] if nixl else ["--no-nixl"])
        penv = dict(os.environ)
        penv.update(env or {})
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=penv, text=True,
                                start_new_session=True)
        try:
            msg = cls._readline(proc, timeout)  # skips NIXL's own stdout lines
            if msg.get("event") != "ready":
                raise RuntimeError(f"pull peer {name!r} did not report ready: {msg}")
            pt = PeerTransports.decode(bytes.fromhex(msg["blob"]))
        except BaseException:
            cls._kill(proc)
            raise
        peer = cls(proc, None)  # type: ignore[arg-type] - no single PeerInfo: ``transports`` has one per backend
        peer.transports, peer.ready = pt, msg
        return peer


async def _main(a: argparse.Namespace, out: Any) -> int:
    from dynamo_ext.serving.transports import TransportOptions, WorkerTransports  # noqa: PLC0415
    from dynamo_ext.topology import collect_local_topology  # noqa: PLC0415
    from dynamo_ext.topology.select import Endpoint  # noqa: PLC0415

    layout = KvLayout.from_dict(json.loads(a.layout))
    pool = (KvPool.allocate_device(a.pool, layout, a.device) if a.device >= 0  # host: in shared memory, as the
            else KvPool.allocate_host(a.pool, layout, shared=shared_memory_available()))  # engine's CPU pool
    fill_pool(pool, a.seed)
    topo = collect_local_topology(a.device if a.device >= 0 else None)
    dev = "host" if topo.worker_gpu is None else topo.worker_gpu
    ts = WorkerTransports(a.name, pool, Endpoint(topo, topo.pid, dev), TransportOptions(nixl=not a.no_nixl, force=a.force))
    await ts.start()
    out.write(json.dumps({"event": "ready", "blob": ts.advertise().encode().hex(), "backends": list(ts.backends),
                          "skipped": ts.skipped, "device": dev}) + "\n")
    out.flush()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while True:
            line = await reader.readline()
            if not line:  # the bench went away
                break
            cmd = json.loads(line)
            c = cmd.get("cmd")
            reply: dict[str, Any] = {"ok": True}
            if c == "fill":
                fill_pool(pool, int(cmd["seed"]))
            elif c == "clear":
                clear_pool(pool, int(cmd.get("value", 0)))
            elif c == "digest":
                reply["sha256"] = digest(pool_bytes(pool), layout, cmd.get("blocks"), cmd.get("ranges"))
            elif c == "fingerprint":
                reply["fingerprint"] = fingerprint(pool, layout, cmd["blocks"])
            elif c == "exit":
                out.write(json.dumps(reply) + "\n")
                out.flush()
                break
            else:
                reply = {"ok": False, "error": f"unknown command {c!r}"}
            out.write(json.dumps(reply) + "\n")
            out.flush()
    finally:
        await ts.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynamo_ext.bench._pull_peer")
    p.add_argument("--name", required=True)
    p.add_argument("--layout", required=True, help="KvLayout as JSON")
    p.add_argument("--pool", default=POOL)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", type=int, default=-1, help="CUDA device of the pool (-1: host memory)")
    p.add_argument("--force", default="auto", help="kv_transfer.transport")
    p.add_argument("--no-nixl", action="store_true", help="kv_transfer.backend = fallback")
    a = p.parse_args(argv)
    # The protocol keeps the stdout pipe to itself: NIXL logs to stdout, and a log line arriving in the same
    # pipe read as the ready line would leave that line in the parent's buffer while it select()s the fd.
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return asyncio.run(_main(a, out))


if __name__ == "__main__":
    sys.exit(main())
