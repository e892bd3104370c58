"""probe_pair: measure what a transport really delivers between two processes of this node.

Protocol::

    probe_pair(nbytes, backend="nixl", choice={"env": {...}, "params": {...}})
      1. PeerProcess.start(...)  spawns ``python -m dynamo_ext.transport.probe peer --backend ...``
         (the *peer*): it creates its backend with the same env, allocates + registers one host pool,
         and prints one JSON line {"event": "ready", "info": base64(PeerInfo msgpack)} on stdout
      2. this process creates its own backend + pool, add_peer(info), warms up once, then times
         ``reps`` transfers of the whole pool (READ or WRITE) through transfer.pull / push
      3. returns the median GB/s (1e9 bytes/s) and stops the peer (``exit``; SIGKILL after a timeout)

The peer speaks JSON lines on stdin/stdout (one command, one reply), used by the tests and the
benchmark too::

    {"cmd": "fill", "seed": s}                 -> pool := pattern(seed)          {"ok": true}
    {"cmd": "clear", "value": v}               -> every byte := v (one GPU fill)   {"ok": true}
    {"cmd": "fingerprint", "blocks": [...]}    -> fingerprint() of those blocks' chunks, computed where
                                                  the pool lives (fast on a GPU)  {"ok": true, "fingerprint": hex}
    {"cmd": "digest", "blocks": [...]|null, "ranges": [[off, n], ...]|null}
                                               -> sha256 of those blocks' chunks (block, layer, kv order),
                                                  of the byte ranges, or of the whole pool  {"ok": true, "sha256": hex}
    {"cmd": "scatter", "src_layout": {...}, "src_blocks": [...], "dst_blocks": [...]}
                                               -> (with --staging-bytes) recompute the staged plan and
                                                  scatter staging -> pool        {"ok": true, "seconds": s}
    {"cmd": "notifs"}                          -> notifications received so far  {"ok": true, "notifs": {peer: [hex]}}
    {"cmd": "add_peer", "info": base64}        -> add the caller as a peer (to ack staged WRITEs)
    {"cmd": "exit"}                            -> {"ok": true}, then the process exits

``GpuProber(nbytes).probe(src_gpu, dst_gpu | -1)`` measures the GPU paths the same way (CUDA IPC
to a peer process per destination GPU; -1 = the owner's copy into its pinned host tier), verified.

The peer polls its backend (progress + notifications) every millisecond while idle: NIXL runs
without its progress thread. ``publish``/``on_ready`` hooks let a caller also put the PeerInfo in
etcd (tests/transport/peer_proc.py does).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

from .backend import TransferBackend
from .layout import KvLayout
from .peer import PeerInfo
from .pool import KvPool
from .verify import chunk_ranges, digest, fingerprint, pattern  # noqa: F401 - re-exported


# -- shared helpers (pattern, chunk_ranges, digest, fingerprint: verify.py) --------------------------------
def pool_bytes(pool: KvPool) -> np.ndarray:
    """Host bytes of a pool (a device pool is copied to the host first)."""
    if pool.kind.value == "host":
        return pool.host_view()
    return pool.tensor_u8().cpu().numpy()


def fill_pool(pool: KvPool, seed: int) -> None:
    if pool.kind.value == "host":
        pattern(pool.host_view(), seed)
        return
    import torch  # noqa: PLC0415

    host = np.empty(pool.nbytes, dtype=np.uint8)
    pattern(host, seed)
    pool.tensor_u8().copy_(torch.from_numpy(host))
    torch.cuda.synchronize()


def clear_pool(pool: KvPool, value: int) -> None:
    """Every byte := ``value`` (0-255); on a GPU one fill kernel (fast, unlike the pattern's upload)."""
    if not 0 <= value <= 255:
        raise ValueError(f"clear: value must be 0..255, got {value}")
    if pool.kind.value == "host":
        pool.host_view().fill(value)
        return
    import torch  # noqa: PLC0415

    pool.tensor_u8().fill_(value)
    torch.cuda.synchronize(pool.device_id)


def scatter_staged(staging: KvPool, pool: KvPool, cmd: dict[str, Any]) -> float:
    """Destination half of a staged plan: recompute the (pure) plan, scatter staging -> pool."""
    import torch  # noqa: PLC0415

    from .plan import plan_transfer  # noqa: PLC0415
    from .staging import scatter_from  # noqa: PLC0415

    t0 = time.perf_counter()
    plan = plan_transfer(KvLayout.from_dict(cmd["src_layout"]), cmd["src_blocks"], pool.layout, cmd["dst_blocks"],
                         stage=True)
    scatter_from(staging.tensor_u8(), pool.tensor_u8(), plan.scatter)
    if pool.kind.value == "device":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def probe_layout(nbytes: int, chunk_bytes: int = 1 << 20) -> KvLayout:
    """A one-layer uint8 layout of ``nbytes`` (rounded down to 2 chunks per block)."""
    nblocks = max(1, nbytes // (2 * chunk_bytes))
    return KvLayout(num_layers=1, num_kv_heads=1, head_dim=chunk_bytes // 16, block_size=16, dtype="uint8",
                    num_blocks=nblocks)


def make_backend(kind: str, name: str, choice: dict[str, Any] | None = None) -> TransferBackend:
    if kind == "nixl":
        from .nixl_backend import NixlBackend  # noqa: PLC0415

        return NixlBackend(name, choice)
    if kind == "tcp":
        from .fallbacks.tcp import TcpBackend  # noqa: PLC0415

        return TcpBackend(name)
    if kind == "cma":
        from .fallbacks.cma import CmaBackend  # noqa: PLC0415

        return CmaBackend(name)
    if kind == "shm":
        from .fallbacks.shm import ShmBackend  # noqa: PLC0415

        return ShmBackend(name)
    if kind == "cuda_ipc":
        from .fallbacks.cuda_ipc import CudaIpcBackend  # noqa: PLC0415

        return CudaIpcBackend(name)
    raise ValueError(f"backend {kind!r} cannot serve as a peer process (use nixl, tcp, cma, shm or cuda_ipc)")


# -- the peer process ----------------------------------------------------------------------------------
async def _peer_main(args: argparse.Namespace, publish: Callable[[PeerInfo, argparse.Namespace], Awaitable[None]] | None) -> None:
    layout = KvLayout.from_dict(json.loads(args.layout))
    choice = json.loads(args.choice) if args.choice else None
    be = make_backend(args.backend, args.name, choice)
    await be.start()
    shared = args.backend == "shm"  # the shm backend maps pools in shared memory only
    if args.device >= 0:
        pool = KvPool.allocate_device(args.pool, layout, args.device)
    else:
        pool = KvPool.allocate_host(args.pool, layout, shared=shared)
    fill_pool(pool, args.seed)
    be.register_pool(pool)
    staging: KvPool | None = None
    if args.staging_bytes > 0:
        slay = probe_layout(args.staging_bytes, chunk_bytes=layout.chunk_bytes)
        staging = (KvPool.allocate_device("staging", slay, args.device) if args.device >= 0
                   else KvPool.allocate_host("staging", slay, shared=shared))
        be.register_pool(staging, staging=True)
    info = be.local_peer_info()
    if publish is not None:
        await publish(info, args)
    out = sys.stdout
    out.write(json.dumps({"event": "ready", "info": base64.b64encode(info.encode()).decode()}) + "\n")
    out.flush()

    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()
    loop.add_reader(sys.stdin.fileno(), lambda: lines.put_nowait(sys.stdin.readline()))
    notifs: dict[str, list[str]] = {}
    while True:
        be.progress()
        for k, v in be.get_notifs().items():
            notifs.setdefault(k, []).extend(m.hex() for m in v)
        try:
            line = await asyncio.wait_for(lines.get(), timeout=0.001)
        except asyncio.TimeoutError:
            continue
        if not line:  # parent went away
            break
        cmd = json.loads(line)
        c = cmd.get("cmd")
        reply: dict[str, Any] = {"ok": True}
        if c == "fill":
            fill_pool(pool, int(cmd["seed"]))
        elif c == "clear":
            clear_pool(pool, int(cmd.get("value", 0)))
        elif c == "fingerprint":
            reply["fingerprint"] = fingerprint(pool, layout, cmd["blocks"])
        elif c == "digest":
            reply["sha256"] = digest(pool_bytes(pool), layout, cmd.get("blocks"), cmd.get("ranges"))
        elif c == "add_peer":
            pinfo = PeerInfo.decode(base64.b64decode(cmd["info"]))
            if be.has_peer(pinfo.agent_name) and be.peer(pinfo.agent_name) != pinfo:
                be.remove_peer(pinfo.agent_name)  # restarted under the same name
            if not be.has_peer(pinfo.agent_name):
                be.add_peer(pinfo)
        elif c == "scatter" and staging is not None:
            reply["seconds"] = scatter_staged(staging, pool, cmd)
        elif c == "notifs":
            for k, v in be.get_notifs().items():
                notifs.setdefault(k, []).extend(m.hex() for m in v)
            reply["notifs"] = notifs
        elif c == "exit":
            out.write(json.dumps(reply) + "\n")
            out.flush()
            break
        else:
            reply = {"ok": False, "error": f"unknown command {c!r}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    loop.remove_reader(sys.stdin.fileno())
    await be.close()


def peer_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynamo_ext.transport.probe peer")
    p.add_argument("--backend", default="nixl")
    p.add_argument("--name", required=True)
    p.add_argument("--pool", default="kv")
    p.add_argument("--layout", required=True, help="KvLayout as JSON")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--choice", default="", help="TransportChoice-like JSON: {env: {...}, params: {...}}")
    p.add_argument("--device", type=int, default=-1, help="CUDA device of the pool (-1: host memory)")
    p.add_argument("--staging-bytes", type=int, default=0, help="also register a staging region this large")
    p.add_argument("--etcd", default="")
    p.add_argument("--key", default="")
    return p


def run_peer(argv: Sequence[str], publish: Callable[[PeerInfo, argparse.Namespace], Awaitable[None]] | None = None) -> int:
    args = peer_arg_parser().parse_args(list(argv))
    asyncio.run(_peer_main(args, publish))
    return 0


# -- the parent's handle on a peer process ------------------------------------------------------------
class PeerProcess:
    """A peer started as a subprocess; always ``close()`` it (SIGKILL fallback, bounded waits)."""

    def __init__(self, proc: subprocess.Popen, info: PeerInfo) -> None:
        self.proc, self.info = proc, info

    @classmethod
    def start(cls, *, backend: str, name: str, layout: KvLayout, seed: int = 1, choice: dict[str, Any] | None = None,
              script: Sequence[str] | None = None, extra: Sequence[str] = (), env: dict[str, str] | None = None,
              timeout: float = 60.0) -> "PeerProcess":
        cmd = list(script or [sys.executable, "-m", "dynamo_ext.transport.probe", "peer"])
        cmd += ["--backend", backend, "--name", name, "--layout", json.dumps(layout.to_dict()), "--seed", str(seed),
                "--choice", json.dumps(choice or {}), *extra]
        penv = dict(os.environ)
        penv.setdefault("UCX_NET_DEVICES", "lo")
        penv.update(env or {})
        penv.update({str(k): str(v) for k, v in ((choice or {}).get("env") or {}).items()})
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=penv, text=True,
                                start_new_session=True)
        try:
            msg = cls._readline(proc, timeout)
            if msg.get("event") != "ready":
                raise RuntimeError(f"peer {name!r} did not report ready: {msg}")
            info = PeerInfo.decode(base64.b64decode(msg["info"]))
        except BaseException:
            cls._kill(proc)
            raise
        return cls(proc, info)

    @staticmethod
    def _readline(proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
        """The next JSON line of the peer (other lines, e.g. NIXL's log on stdout, skipped). Reads the pipe's fd
        with its own line buffer kept on ``proc``: a buffered readline after select() would keep a line that
        came in the same read as a skipped one (NIXL's log + the ready line) and then wait on an empty pipe."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        buf: bytes = getattr(proc, "_peer_line_buf", b"")
        end = time.monotonic() + timeout
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.startswith(b"{"):
                    proc._peer_line_buf = buf  # type: ignore[attr-defined]
                    return json.loads(line)
            proc._peer_line_buf = buf  # type: ignore[attr-defined]
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"peer pid {proc.pid} did not answer within {timeout} s")
            r, _, _ = select.select([fd], [], [], min(left, 0.5))
            if r:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"peer pid {proc.pid} exited (rc={proc.poll()})")
                buf += chunk
            elif proc.poll() is not None:
                raise RuntimeError(f"peer pid {proc.pid} exited (rc={proc.returncode})")

    def call(self, cmd: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        reply = self._readline(self.proc, timeout)
        if not reply.get("ok"):
            raise RuntimeError(f"peer refused {cmd.get('cmd')}: {reply}")
        return reply

    async def acall(self, cmd: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """``call`` in a worker thread, so the caller's event loop keeps polling its transfers."""
        return await asyncio.to_thread(self.call, cmd, timeout)

    def kill(self) -> None:
        self._kill(self.proc)

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for f in (proc.stdin, proc.stdout):
            try:
                if f:
                    f.close()
            except OSError:
                pass

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call({"cmd": "exit"}, timeout=5)
                self.proc.wait(timeout=5)
            except Exception:  # noqa: BLE001
                pass
        self._kill(self.proc)

    def __enter__(self) -> "PeerProcess":
        return self

    def __exit__(self, *a: Any) -> None:
        self.close()


# -- probe -----------------------------------------------------------------------------------------------
async def probe_pair_async(nbytes: int = 256 << 20, *, backend: str = "nixl", choice: dict[str, Any] | None = None,
                           direction: str = "write", reps: int = 3, name: str = "probe") -> float:
    """Median GB/s of ``reps`` whole-pool transfers of ``nbytes`` to a fresh peer process (after one warm-up)."""
    from .transfer import RemotePool, TransferOptions, pull, push  # noqa: PLC0415

    layout = probe_layout(nbytes)
    peer = PeerProcess.start(backend=backend, name=f"{name}-peer-{os.getpid()}", layout=layout, choice=choice)
    try:
        be = make_backend(backend, f"{name}-{os.getpid()}", choice)
        await be.start()
        pool = KvPool.allocate_host("kv", layout, shared=backend == "shm")
        be.register_pool(pool)
        be.add_peer(peer.info)
        remote = RemotePool(peer.info.agent_name, peer.info.pool("kv"))
        blocks = list(range(layout.num_blocks))
        opts = TransferOptions(deadline_s=max(30.0, nbytes / 1e8))
        rates = []
        for i in range(reps + 1):
            if direction == "write":
                h = await push(be, pool, remote, blocks, opts)
            else:
                h = await pull(be, remote, pool, blocks, opts)
            st = await h
            if i:
                rates.append(st.gbps)
        await be.close()
        return statistics.median(rates)
    finally:
        peer.close()


def probe_pair(nbytes: int = 256 << 20, **kw: Any) -> float:
    """Synchronous wrapper of ``probe_pair_async`` (for the CLI: ``dynamo-ext topology --probe``)."""
    return asyncio.run(probe_pair_async(nbytes, **kw))


# -- GPU paths (``dynamo-ext topology --probe`` on a CUDA machine) ----------------------------------
class GpuProber:
    """Scattered whole-pool WRITEs between GPUs of this node, verified (``fingerprint`` of the chunks):

    ``probe(src, dst)``  dst >= 0: CUDA IPC to a peer PROCESS whose pool is on GPU dst (same GPU when
                         src == dst); one peer per destination GPU, reused for every source GPU.
                         dst == -1: GPU -> host tier, the owner's copy into its own pinned host pool
                         (transfer.copy(gpu_pool, host_pool): zero-copy row kernel when Triton).
    Block ids: the destination ids are a fixed permutation of the source ids (1 MiB chunks)."""

    def __init__(self, nbytes: int = 256 << 20, reps: int = 3) -> None:
        self.layout = probe_layout(nbytes)
        self.reps = reps
        self.peers: dict[int, PeerProcess] = {}
        self.pools: dict[int, KvPool] = {}
        self.tier: KvPool | None = None
        self.be: Any = None
        self.digests: dict[int, str] = {}
        n = self.layout.num_blocks
        self.src_ids = list(range(n))
        self.dst_ids = [int(x) for x in np.random.default_rng(7).permutation(n)]

    def _pool(self, dev: int) -> KvPool:
        if dev not in self.pools:
            pool = KvPool.allocate_device(f"probe{dev}", self.layout, dev)
            fill_pool(pool, 3 + dev)
            self.pools[dev] = pool
        return self.pools[dev]

    async def probe(self, src: int, dst: int) -> dict[str, Any]:
        from .transfer import RemotePool, TransferOptions, copy, push  # noqa: PLC0415

        pool = self._pool(src)
        if src not in self.digests:  # the source pool is written once, when created
            self.digests[src] = fingerprint(pool, self.layout, self.src_ids)
        want = self.digests[src]
        if dst < 0:
            if self.tier is None:
                self.tier = KvPool.allocate_host("probe-tier", self.layout, pin=True)
            target: Any = self.tier
        else:
            if self.be is None:
                from .fallbacks.cuda_ipc import CudaIpcBackend  # noqa: PLC0415

                self.be = CudaIpcBackend(f"probe-ipc-{os.getpid()}")
            if not self.be.is_registered(pool):
                self.be.register_pool(pool)
            if dst not in self.peers:
                peer = PeerProcess.start(backend="cuda_ipc", name=f"probe-gpu{dst}-{os.getpid()}", layout=self.layout,
                                         seed=9, extra=["--device", str(dst)], timeout=120)
                self.peers[dst] = peer
                self.be.add_peer(peer.info)
            else:
                await self.peers[dst].acall({"cmd": "clear", "value": 9 + src}, timeout=120)
            peer = self.peers[dst]
            target = RemotePool(peer.info.agent_name, peer.info.pool("kv"))
        opts = TransferOptions(deadline_s=60, metrics=None)
        blocks = (self.src_ids, self.dst_ids)
        rates = []
        for i in range(self.reps + 1):
            t0 = time.perf_counter()
            h = await (copy(pool, target, blocks, opts) if dst < 0 else push(self.be, pool, target, blocks, opts))
            await h
            if i:
                rates.append(self.layout.pool_bytes / (time.perf_counter() - t0) / 1e9)
        if dst < 0:
            assert self.tier is not None
            got = fingerprint(self.tier, self.layout, self.dst_ids)
        else:
            got = (await self.peers[dst].acall({"cmd": "fingerprint", "blocks": self.dst_ids}, timeout=120))["fingerprint"]
        return {"write": statistics.median(rates), "verified": got == want}

    def close(self) -> None:
        for name, p in list(self.peers.items()):
            if self.be is not None:
                self.be.remove_peer(p.info.agent_name)
            p.close()
            del self.peers[name]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "peer":
        return run_peer(argv[1:])
    p = argparse.ArgumentParser(prog="python -m dynamo_ext.transport.probe")
    p.add_argument("--bytes", type=int, default=256 << 20)
    p.add_argument("--backend", default="nixl")
    p.add_argument("--direction", default="write", choices=["read", "write"])
    p.add_argument("--choice", default="{}")
    a = p.parse_args(argv)
    gbps = probe_pair(a.bytes, backend=a.backend, choice=json.loads(a.choice), direction=a.direction)
    print(json.dumps({"backend": a.backend, "direction": a.direction, "bytes": a.bytes, "gbps": round(gbps, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
