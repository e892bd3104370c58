"""One serving worker without the Dynamo runtime: ``serving.ServingWorker`` driven over JSON lines on
stdin/stdout — a request-plane adapter, nothing more (the serving logic is the core's, the same code the
Dynamo workers run).

    python -m dynamo_ext.bench.direct_worker --role {agg,prefill,decode} --worker-id N --name NAME
        [--device cpu|cuda:N] [--preset P --layers L --dtype D] [--num-blocks B] [--block-size 16]
        [--transport auto|nvlink|pcie|rdma|shm|tcp] [--no-nixl] [--transfer-timeout-s S] [--seed S]

Protocol (one JSON object per line; every line validated with msgspec, nothing is pickled)::

    coordinator -> worker (stdin)                     worker -> coordinator (stdout)
    -----------------------------------------------------------------------------------------------------
                                                      {"ev":"ready", worker_id, role, name, device, pid,
                                                       transports (base64 PeerTransports | null), topology,
                                                       layout, vocab, num_blocks, startup_s}
    {"op":"peer", worker_id, transports}              a peer's transports (plane.peer looks them up by
                                                      the handle's worker_id)
    {"op":"prefill", rid, request}                    core.prefill -> {"ev":"chunk", rid, chunk}, {"ev":"end", rid}
    {"op":"generate", rid, request}                   core.generate -> {"ev":"chunk", rid, chunk}..., {"ev":"end", rid}
                                                      (a raise, e.g. Draining -> {"ev":"end", rid, error})
    {"op":"release", rid, handle_id}                  core.release -> {"ev":"result", rid, value: bool}
    {"op":"export", rid, router_rids}                 core.export -> {"ev":"result", rid, value: [router rids]}
    {"op":"stats", rid}                               -> {"ev":"result", rid, value: {...}}
    {"op":"reply", cid, value}                        the answer to one of our calls (below)
    {"op":"shutdown"}                                 the process exits 0
                                                      {"ev":"call", cid, op:"release", worker_id, handle_id}
                                                      (plane.release: the holder frees the handle) and
                                                      {"ev":"call", cid, op:"decode_peers"} -> a reply each
    (the pool's KV events)                            {"ev":"kv", events: [router events]} (kv.RouterEventSink:
                                                      the coordinator's KvEventIndexer applies them)
    a fatal CUDA error (poisoned context)             {"ev":"fatal", error}, then the process exits with code 3

stdin EOF (the coordinator died) ends the worker too. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import logging
import os
import sys
import time
from typing import Any, Union

import msgspec

log = logging.getLogger("dynamo_ext.direct_worker")


# -- messages in ------------------------------------------------------------------------------------
class Peer(msgspec.Struct, tag_field="op", tag="peer", forbid_unknown_fields=True):
    worker_id: int
    transports: str


class Prefill(msgspec.Struct, tag_field="op", tag="prefill", forbid_unknown_fields=True):
    rid: str
    request: dict[str, Any]


class Generate(msgspec.Struct, tag_field="op", tag="generate", forbid_unknown_fields=True):
    rid: str
    request: dict[str, Any]


class Release(msgspec.Struct, tag_field="op", tag="release", forbid_unknown_fields=True):
    rid: str
    handle_id: str


class Export(msgspec.Struct, tag_field="op", tag="export", forbid_unknown_fields=True):
    rid: str
    router_rids: list[str]


class Stats(msgspec.Struct, tag_field="op", tag="stats", forbid_unknown_fields=True):
    rid: str


class Reply(msgspec.Struct, tag_field="op", tag="reply", forbid_unknown_fields=True):
    cid: int
    value: Any = None
    error: str | None = None


class Shutdown(msgspec.Struct, tag_field="op", tag="shutdown", forbid_unknown_fields=True):
    pass


Command = Union[Peer, Prefill, Generate, Release, Export, Stats, Reply, Shutdown]
COMMAND_DECODER = msgspec.json.Decoder(Command)

#: the protocol's stdout: fd 1 is re-pointed to stderr in main() so that library prints (NIXL's log
#: handler, warnings) cannot corrupt the JSON lines
PROTOCOL_OUT: Any = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dynamo_ext.bench.direct_worker", description=__doc__.splitlines()[0])
    p.add_argument("--role", choices=("agg", "prefill", "decode"), required=True)
    p.add_argument("--worker-id", type=int, required=True, help="this worker's id in the graph (handles name it)")
    p.add_argument("--name", required=True, help="transport agent name, unique in the graph")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--preset", default="tiny", help="a model preset or a model directory")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--num-blocks", type=int, default=512)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-batched-tokens", type=int, default=16384)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--transport", default="auto", help="kv_transfer.transport: auto, nvlink, pcie, rdma, shm, tcp")
    p.add_argument("--no-nixl", action="store_true", help="kv_transfer.backend: fallback (no NIXL)")
    p.add_argument("--transfer-timeout-s", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0, help="weights seed: equal on every worker of a graph")
    return p.parse_args(argv)


class JsonLinesPlane:
    """``serving.WorkerPlane`` over the coordinator: peers it announced, calls answered by ``reply``."""

    def __init__(self, w: "DirectWorker") -> None:
        self.w = w
        self.peers: dict[int, Any] = {}
        self._cid = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}

    async def peer(self, handle: Any) -> Any:
        from dynamo_ext.transport import TransferError  # noqa: PLC0415

        pt = self.peers.get(int(handle.worker_id))
        if pt is None:
            raise TransferError(f"no transports known for worker {handle.worker_id}")
        return pt

    async def _call(self, op: str, timeout_s: float, **fields: Any) -> Any:
        cid = next(self._cid)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[cid] = fut
        try:
            await self.w.emit("call", cid=cid, op=op, **fields)
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._pending.pop(cid, None)

    def answer(self, r: Reply) -> None:
        fut = self._pending.get(r.cid)
        if fut is not None and not fut.done():
            if r.error:
                fut.set_exception(RuntimeError(r.error))
            else:
                fut.set_result(r.value)

    async def release(self, handle: Any, timeout_s: float) -> bool:
        return bool(await self._call("release", timeout_s, worker_id=int(handle.worker_id), handle_id=handle.handle_id))

    async def decode_peers(self) -> int:
        return int(await self._call("decode_peers", 5.0))

    def forget(self, handle: Any) -> None:
        pass  # the coordinator announces peers; a dead one is not announced again


class DirectWorker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.plane = JsonLinesPlane(self)
        self.tasks: set[asyncio.Task[Any]] = set()
        self._write_lock = asyncio.Lock()
        self.core: Any = None

    def spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def emit(self, ev: str, **fields: Any) -> None:
        line = msgspec.json.encode({"ev": ev, **fields}) + b"\n"
        async with self._write_lock:
            PROTOCOL_OUT.write(line)

    # -- start-up ---------------------------------------------------------------------------------
    async def start(self) -> dict[str, Any]:
        from dynamo_ext.kv.events import RouterEventSink  # noqa: PLC0415
        from dynamo_ext.metrics import NullMetrics  # noqa: PLC0415
        from dynamo_ext.serving import ServingWorker, TransportOptions, WorkerSettings  # noqa: PLC0415
        from dynamo_ext.topology import collect_local_topology  # noqa: PLC0415

        a = self.a
        s = WorkerSettings(role=a.role, name=a.name, model=a.preset, device=a.device, block_size=a.block_size,
                           num_kv_blocks=a.num_blocks, max_model_len=a.max_model_len, seed=a.seed,
                           num_layers=a.layers, dtype=a.dtype, max_num_seqs=a.max_num_seqs,
                           max_num_batched_tokens=a.max_batched_tokens, transfer_timeout_s=a.transfer_timeout_s,
                           hold_s=max(2 * a.transfer_timeout_s, 30.0),
                           transport=TransportOptions(nixl=not a.no_nixl, force=a.transport))
        core = ServingWorker(s, self.plane, NullMetrics())  # the coordinator measures
        core.instance_id = a.worker_id
        self.core = core
        runner = core.start_engine()
        guard_fatal(core.engine)
        loop = asyncio.get_running_loop()
        pending: list[dict[str, Any]] = []

        def on_event(ev: dict[str, Any]) -> None:  # engine thread: batch, flush on the loop, in order
            pending.append(ev)
            if len(pending) == 1:
                loop.call_soon_threadsafe(lambda: self.spawn(self._flush_kv(pending)))

        runner.pool.sink = RouterEventSink(a.block_size, on_event)
        try:
            topo = collect_local_topology(core.cuda_index())
        except Exception as e:  # noqa: BLE001 - host memory assumed
            log.warning("topology: %s", e)
            topo = None
        await core.start(topo)
        return {"role": a.role, "name": a.name, "device": a.device, "pid": os.getpid(), "worker_id": a.worker_id,
                "transports": base64.b64encode(core.advertise()).decode() if core.transports else None,
                "topology": topo.to_dict() if topo is not None else None, "layout": core.engine.kv_layout.to_dict(),
                "vocab": core.vocab_size, "num_blocks": a.num_blocks,
                "backends": list(core.transports.backends) if core.transports else []}

    async def _flush_kv(self, pending: list[dict[str, Any]]) -> None:
        batch = list(pending)
        pending.clear()
        if batch:
            await self.emit("kv", events=batch)

    # -- commands ---------------------------------------------------------------------------------
    async def _stream(self, rid: str, agen: Any) -> None:
        try:
            async for chunk in agen:
                await self.emit("chunk", rid=rid, chunk=chunk)
        except Exception as e:  # noqa: BLE001 - the coordinator's session decides (retry elsewhere, error)
            await self.emit("end", rid=rid, error=f"{type(e).__name__}: {e}")
            exit_if_fatal(e, f"request {rid}")
            return
        await self.emit("end", rid=rid)

    async def _one(self, c: Prefill) -> Any:
        yield await self.core.prefill(c.request)

    async def run_command(self, c: Any) -> None:
        core = self.core
        if isinstance(c, Prefill):
            await self._stream(c.rid, self._one(c))
        elif isinstance(c, Generate):
            await self._stream(c.rid, core.generate(c.request, c.rid))
        elif isinstance(c, Release):
            await self.emit("result", rid=c.rid, value=await core.release(c.handle_id))
        elif isinstance(c, Export):
            await self.emit("result", rid=c.rid, value=await core.export(c.router_rids))
        elif isinstance(c, Stats):
            ld = core.load()
            await self.emit("result", rid=c.rid, value={
                **core.runner.counters(), "free_blocks": core.pool.num_free, "held": len(core.held),
                "running": ld.running, "waiting": ld.waiting, "transfers": core.transfers})
        elif isinstance(c, Peer):
            from dynamo_ext.serving import PeerTransports  # noqa: PLC0415

            self.plane.peers[c.worker_id] = PeerTransports.decode(base64.b64decode(c.transports))
        elif isinstance(c, Reply):
            self.plane.answer(c)

    async def _guarded(self, c: Any) -> None:
        try:
            await self.run_command(c)
        except Exception as e:  # noqa: BLE001 - reported, the worker keeps serving
            log.warning("%s failed: %s: %s", type(c).__name__, type(e).__name__, e)
            rid = getattr(c, "rid", None)
            if rid is not None:
                await self.emit("end", rid=rid, error=f"{type(e).__name__}: {e}")
            exit_if_fatal(e, type(c).__name__)

    async def main(self) -> int:
        t0 = time.perf_counter()
        ready = await self.start()
        await self.emit("ready", startup_s=time.perf_counter() - t0, **ready)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 26)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line:
                break  # coordinator gone
            if not line.strip():
                continue
            try:
                c = COMMAND_DECODER.decode(line)
            except msgspec.ValidationError as e:
                await self.emit("error", error=f"invalid command: {e}")
                continue
            if isinstance(c, Shutdown):
                break
            if isinstance(c, (Peer, Reply)):  # in order, at once
                await self.run_command(c)
            else:
                self.spawn(self._guarded(c))
        await self.core.close()
        return 0


FATAL_EXIT_CODE = 3


def is_fatal_cuda(e: BaseException) -> bool:
    """A CUDA error that poisons the process's context (illegal address, launch failure, ECC, ...): every
    later kernel fails too. Out-of-memory is not fatal (the allocation failed, the context is intact)."""
    if type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower():
        return False
    text = f"{type(e).__name__}: {e}"
    return type(e).__name__ == "AcceleratorError" or "CUDA error" in text or "cudaError" in text


def exit_if_fatal(e: BaseException, what: str) -> None:
    """Exit at once (code 3) on a fatal CUDA error: the coordinator sees the death and fails this worker's
    requests immediately instead of waiting for their timeouts on a worker that can no longer compute."""
    if is_fatal_cuda(e):
        log.critical("%s: fatal CUDA error, exiting with %d: %s", what, FATAL_EXIT_CODE, e)
        sys.stderr.flush()
        os._exit(FATAL_EXIT_CODE)


def guard_fatal(engine: Any) -> None:
    """The engine runner logs step errors and retries: a dead GPU context must end the process instead."""
    step = engine.step

    def guarded_step() -> Any:
        try:
            return step()
        except Exception as e:
            exit_if_fatal(e, "engine step")
            raise

    engine.step = guarded_step


def main(argv: list[str] | None = None) -> int:
    global PROTOCOL_OUT
    args = parse_args(argv)
    sys.stdout.flush()
    PROTOCOL_OUT = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    logging.basicConfig(level=os.environ.get("DYNAMO_EXT_LOG", "WARNING"), stream=sys.stderr,
                        format=f"[{args.name}] %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop  # noqa: PLC0415

        uvloop.install()
    except Exception:  # noqa: BLE001
        pass
    rc = asyncio.run(DirectWorker(args).main())
    os._exit(rc)  # CUDA IPC mappings and NIXL threads must not hold the exit


if __name__ == "__main__":
    sys.exit(main())
