"""One serving worker without the Dynamo runtime: engine + BlockPool + transport, driven over stdin/stdout.

Used by ``dynamo_ext/bench/serve_direct.py`` (``dynamo-ext bench serve-direct``) where the Dynamo runtime cannot be
carried (the GPU machine): the same layers as ``dynamo_ext/workers`` (``EngineRunner``, ``BlockPool``,
``transfer_kv_cache`` over a pool registered once) with the Dynamo request plane replaced by JSON lines.

Protocol (one JSON object per line; every line is validated with msgspec, nothing is pickled)::

    coordinator -> worker (stdin)                  worker -> coordinator (stdout)
    -----------------------------------------------------------------------------------------------------
                                                   {"ev":"ready", peer_info (base64 PeerInfo.encode()),
                                                    topology (NodeTopology dict), layout, device, role,
                                                    startup_s}
    {"op":"add_peer","info":b64}                   (nothing; errors -> {"ev":"error"})
    {"op":"prefill","rid","prompt"}                prefix match + prefill_only; blocks held under rid
                                                   -> {"ev":"prefilled", rid, block_ids, first_token,
                                                       agent, pool, seconds}
    {"op":"release","rid"}                         the held blocks are freed -> {"ev":"released", rid}
    {"op":"decode","rid","prompt","max_tokens",   handle: allocate, ONE planned READ from the prefill
     "handle"?: {agent,pool,block_ids,first_token}} worker's pool (transfer_kv_cache), -> {"ev":"pulled",
                                                   rid, bytes, seconds, descriptors, path, backend}
                                                   no handle: local prefill (aggregated)
                                                   -> {"ev":"first", rid} then {"ev":"done", rid, tokens}
                                                   local prefill: "first" carries compute_s, cached_tokens
    (engine's BlockPool events)                    -> {"ev":"kv","rid":"__kv__","events":[["stored"|"removed",
                                                       [chain keys]]...]}  (chain_keys(): the prefix index)
    {"op":"generate","rid","prompt","max_tokens"}  = decode without a handle (aggregated: local prefill + decode)
    {"op":"export","rid"}                          migration out: runner.export (engine.detach) -> the request's
                                                   "done" carries migrated=true; blocks held under rid;
                                                   -> {"ev":"exported","rid":"<rid>#export", tokens, num_prompt,
                                                       output, block_ids, num_computed, agent, pool}
                                                   the target continues it with "decode" (prompt = tokens[:-1],
                                                   handle.first_token = tokens[-1]); then "release" here
    {"op":"stats"}                                 -> {"ev":"stats", steps, prefills, free_blocks, ...}
    {"op":"shutdown"}                              process exits 0
    any failure of one request                     -> {"ev":"error", rid, error}
    a fatal CUDA error (poisoned context)          -> that error line, then the process exits with code 3

stdin EOF (the coordinator died) ends the worker too. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import sys
import time
from typing import Any, Union

import msgspec


log = logging.getLogger("dynamo_ext.direct_worker")


# -- messages in ------------------------------------------------------------------------------------
class Handle(msgspec.Struct, forbid_unknown_fields=True):
    agent: str
    pool: str
    block_ids: list[int]
    first_token: int


class AddPeer(msgspec.Struct, tag_field="op", tag="add_peer", forbid_unknown_fields=True):
    info: str


class Prefill(msgspec.Struct, tag_field="op", tag="prefill", forbid_unknown_fields=True):
    rid: str
    prompt: list[int]


class Release(msgspec.Struct, tag_field="op", tag="release", forbid_unknown_fields=True):
    rid: str


class Decode(msgspec.Struct, tag_field="op", tag="decode", forbid_unknown_fields=True):
    rid: str
    prompt: list[int]
    max_tokens: int
    handle: Handle | None = None


class Generate(msgspec.Struct, tag_field="op", tag="generate", forbid_unknown_fields=True):
    """Aggregated serving: local prefill (prefix cache) + decode on this worker; the same events as decode."""

    rid: str
    prompt: list[int]
    max_tokens: int


class Export(msgspec.Struct, tag_field="op", tag="export", forbid_unknown_fields=True):
    """Migrate a running request out: its stream ends ("done" with migrated=true), its blocks are held under
    rid for the target's pull (then "release"), and an "exported" event carries what the target needs."""

    rid: str


class Stats(msgspec.Struct, tag_field="op", tag="stats", forbid_unknown_fields=True):
    pass


class Shutdown(msgspec.Struct, tag_field="op", tag="shutdown", forbid_unknown_fields=True):
    pass


Command = Union[AddPeer, Prefill, Release, Decode, Generate, Export, Stats, Shutdown]
COMMAND_DECODER = msgspec.json.Decoder(Command)

#: the protocol's stdout: fd 1 is re-pointed to stderr in main() so that library prints (NIXL's log
#: handler, warnings) cannot corrupt the JSON lines
PROTOCOL_OUT: Any = None


def chain_keys(tokens: list[int] | tuple[int, ...], block_size: int, parent_key: int = 0) -> list[int]:
    """Keys of the full blocks of ``tokens``: each chains its parent's key with its own tokens (Python's
    tuple-of-int hash: equal in every process, unlike str/bytes hashes). The coordinator computes the
    same keys from a prompt to score prefix overlap; they stand in for Dynamo's block hashes."""
    out, k = [], parent_key
    for i in range(len(tokens) // block_size):
        k = hash((k, tuple(tokens[i * block_size:(i + 1) * block_size])))
        out.append(k)
    return out


class KvEventForwarder:
    """``kv.KvEventSink`` of this worker's BlockPool: stored / removed blocks -> {"ev":"kv"} lines.

    Called on the engine thread; events are queued and flushed on the asyncio loop, in order."""

    def __init__(self, block_size: int, loop: asyncio.AbstractEventLoop, emit: Any) -> None:
        self.bs, self.loop, self.emit = block_size, loop, emit
        self.key_of: dict[int, int] = {}  # block id -> chain key
        self.pending: list[tuple[str, list[int]]] = []
        self.scheduled = False

    def publish_stored(self, token_ids: Any, block_ids: Any, parent: int | None) -> None:
        keys = chain_keys(list(token_ids), self.bs, self.key_of.get(parent, 0) if parent is not None else 0)
        for b, k in zip(block_ids, keys):
            self.key_of[int(b)] = k
        self._queue("stored", keys)

    def publish_removed(self, block_ids: Any) -> None:
        keys = [self.key_of.pop(int(b)) for b in block_ids if int(b) in self.key_of]
        self._queue("removed", keys)

    def _queue(self, kind: str, keys: list[int]) -> None:
        if not keys:
            return
        self.pending.append((kind, keys))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._flush()))

    async def _flush(self) -> None:
        self.scheduled = False
        batch, self.pending = self.pending, []
        if batch:
            await self.emit("kv", rid="__kv__", events=[[k, keys] for k, keys in batch])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--role", choices=("agg", "prefill", "decode"), required=True)
    p.add_argument("--name", required=True, help="agent / worker name, unique in the graph")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--num-blocks", type=int, default=512)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-batched-tokens", type=int, default=16384)
    p.add_argument("--backend", default="auto", help="auto (cuda_ipc on CUDA, cma or nixl on CPU), nixl, cma, tcp, cuda_ipc")
    p.add_argument("--transfer-timeout-s", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0, help="weights seed: equal on every worker of a graph")
    return p.parse_args(argv)


class DirectWorker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.held: dict[str, list[int]] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self._write_lock = asyncio.Lock()
        self.transfers = 0

    # -- start-up ---------------------------------------------------------------------------------
    def start_engine(self) -> None:
        import torch  # noqa: PLC0415

        from dynamo_ext.engine.core import EngineConfig, LlmEngine  # noqa: PLC0415
        from dynamo_ext.engine.weights import load_model  # noqa: PLC0415
        from dynamo_ext.kv.pool import BlockPool  # noqa: PLC0415
        from dynamo_ext.serving.engine_runner import EngineRunner  # noqa: PLC0415

        a = self.a
        self.cuda_index: int | None = None
        if a.device.startswith("cuda"):
            self.cuda_index = int(a.device.split(":", 1)[1]) if ":" in a.device else 0
            torch.cuda.set_device(self.cuda_index)
            a.device = f"cuda:{self.cuda_index}"
        else:
            torch.set_num_threads(1)
        model = load_model(a.preset, device=a.device, seed=a.seed, num_layers=a.layers, dtype=a.dtype)
        self.pool = BlockPool(a.num_blocks, a.block_size)
        ec = EngineConfig(block_size=a.block_size, num_blocks=a.num_blocks, device=a.device,
                          max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_batched_tokens, seed=a.seed)
        self.engine = LlmEngine(model, ec, allocator=self.pool)
        model.weights.clear()  # the engine's model holds its own (fused) copies
        self.runner = EngineRunner(self.engine, self.pool)
        self.vocab = model.config.vocab_size
        step = self.engine.step

        def guarded_step() -> Any:  # the runner logs step errors and retries: a dead GPU context must end us
            try:
                return step()
            except Exception as e:
                exit_if_fatal(e, "engine step")
                raise

        self.engine.step = guarded_step  # type: ignore[method-assign]

    async def start_transport(self) -> None:
        from dynamo_ext.transport import KvPool, make_backend  # noqa: PLC0415

        kind = self.a.backend
        if kind == "auto":
            kind = "cuda_ipc" if self.cuda_index is not None else "auto"
        self.backend = make_backend(kind, self.a.name, memory="host" if self.cuda_index is None else "device")
        await self.backend.start()
        self.kv_pool = KvPool.from_tensor(f"kv-{self.a.name}", self.engine.kv_layout, self.engine.kv_buffer())
        self.backend.register_pool(self.kv_pool)  # once, never per request
        self.pool.sink = KvEventForwarder(self.a.block_size, asyncio.get_running_loop(), self.emit)
        self.spawn(self.backend.serve(0.01))

    def spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def emit(self, ev: str, **fields: Any) -> None:
        line = msgspec.json.encode({"ev": ev, **fields}) + b"\n"
        async with self._write_lock:
            PROTOCOL_OUT.write(line)

    # -- commands ---------------------------------------------------------------------------------
    def _request(self, rid: str, prompt: list[int], max_tokens: int) -> Any:
        from dynamo_ext.engine.protocol import Request, SamplingParams  # noqa: PLC0415

        return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))

    async def do_prefill(self, c: Prefill) -> None:
        t0 = time.perf_counter()
        req = self._request(c.rid, c.prompt, 1)
        res, compute_s, cached = await self.prefill_timed(req)
        self.held[c.rid] = list(res.block_ids)
        await self.emit("prefilled", rid=c.rid, block_ids=list(res.block_ids), first_token=int(res.first_token),
                        agent=self.backend.agent_name, pool=self.kv_pool.name, seconds=time.perf_counter() - t0,
                        compute_s=compute_s, cached_tokens=cached)

    async def prefill_timed(self, req: Any) -> tuple[Any, float, int]:
        """``EngineRunner.prefill`` with the engine-thread time and the prefix-cache hit (tokens) measured."""
        out: dict[str, Any] = {}

        def run() -> Any:
            t = time.perf_counter()
            res = self.runner._prefill_sync(req)
            out["s"] = time.perf_counter() - t
            return res

        res = await self.runner.wait_room(run)
        usable = min(len(req.prefix_blocks), (len(req.prompt_token_ids) - 1) // self.a.block_size)
        return res, out["s"], usable * self.a.block_size

    async def do_release(self, c: Release) -> None:
        blocks = self.held.pop(c.rid, None)
        if blocks is not None:
            await self.runner.release(blocks)
        await self.emit("released", rid=c.rid, held=blocks is not None)

    async def do_decode(self, c: Decode) -> None:
        from dynamo_ext.transport import RemotePool, transfer_kv_cache  # noqa: PLC0415

        req = self._request(c.rid, c.prompt, c.max_tokens)
        if c.handle is not None:
            h = c.handle
            remote = RemotePool(h.agent, self.backend.peer(h.agent).pool(h.pool))
            dst = await self.runner.allocate(len(h.block_ids))
            try:
                th = await transfer_kv_cache(remote, self.kv_pool, (list(h.block_ids), dst), backend=self.backend,
                                             deadline_s=self.a.transfer_timeout_s)
                st = await th
            except BaseException:
                await self.runner.free(dst)
                raise
            self.transfers += 1
            await self.emit("pulled", rid=c.rid, bytes=st.bytes, seconds=st.seconds, descriptors=st.descriptors,
                            path=str(st.path), backend=str(st.backend))
            await self.runner.commit_pulled(req, dst)
            blocks, first = dst, h.first_token
            extra: dict[str, Any] = {}
        else:
            res, compute_s, cached = await self.prefill_timed(req)
            blocks, first = res.block_ids, res.first_token
            extra = {"compute_s": compute_s, "cached_tokens": cached}
        await self.emit("first", rid=c.rid, **extra)
        tokens = [int(first)]
        migrated = False
        async for o in self.runner.decode(req, blocks, first):
            tokens.extend(int(t) for t in o.new_token_ids)
            migrated = o.finish_reason == "migrated"
        await self.emit("done", rid=c.rid, tokens=tokens, migrated=migrated)

    async def do_export(self, c: Export) -> None:
        st = await self.runner.export(c.rid)
        if st is None:
            raise KeyError(f"request {c.rid} is not running here (finished or unknown)")
        self.held[c.rid] = list(st.blocks)
        await self.emit("exported", rid=f"{c.rid}#export", tokens=st.tokens, num_prompt=st.num_prompt,
                        output=st.output, block_ids=list(st.blocks), num_computed=st.num_computed,
                        agent=self.backend.agent_name, pool=self.kv_pool.name)

    async def do_stats(self) -> None:
        ld = self.runner.load()
        await self.emit("stats", rid="__stats__", steps=self.runner.steps, prefills=self.runner.prefills, free_blocks=self.pool.num_free,
                        held=len(self.held), running=ld.running, waiting=ld.waiting, transfers=self.transfers)

    async def run_command(self, c: Any) -> None:
        rid = getattr(c, "rid", None)
        try:
            if isinstance(c, Prefill):
                await self.do_prefill(c)
            elif isinstance(c, Release):
                await self.do_release(c)
            elif isinstance(c, Generate):
                await self.do_decode(Decode(c.rid, c.prompt, c.max_tokens, None))
            elif isinstance(c, Decode):
                await self.do_decode(c)
            elif isinstance(c, AddPeer):
                from dynamo_ext.transport import PeerInfo  # noqa: PLC0415

                self.backend.add_peer(PeerInfo.decode(base64.b64decode(c.info)))
            elif isinstance(c, Export):
                await self.do_export(c)
            elif isinstance(c, Stats):
                await self.do_stats()
        except Exception as e:  # noqa: BLE001 - reported per request, the worker keeps serving
            log.warning("%s %s failed: %s: %s", type(c).__name__, rid, type(e).__name__, e)
            await self.emit("error", rid=rid, op=type(c).__name__.lower(), error=f"{type(e).__name__}: {e}")
            exit_if_fatal(e, f"{type(c).__name__} {rid}")

    async def main(self) -> int:
        t0 = time.perf_counter()
        self.start_engine()
        self.spawn(self.runner.run())
        await self.start_transport()
        from dynamo_ext.topology import collect_local_topology  # noqa: PLC0415

        try:
            topo = collect_local_topology(self.cuda_index).to_dict()
        except Exception as e:  # noqa: BLE001 - topology is reported, not needed to serve
            log.warning("topology: %s", e)
            topo = None
        await self.emit("ready", role=self.a.role, name=self.a.name, device=self.a.device, pid=os.getpid(),
                        peer_info=base64.b64encode(self.backend.local_peer_info().encode()).decode(),
                        topology=topo, layout=self.engine.kv_layout.to_dict(), vocab=self.vocab, num_blocks=self.a.num_blocks,
                        startup_s=time.perf_counter() - t0)
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
                await self.emit("error", rid=None, op="parse", error=f"invalid command: {e}")
                continue
            if isinstance(c, Shutdown):
                break
            self.spawn(self.run_command(c))
        self.runner.stop()
        try:
            await self.backend.close()
        except Exception:  # noqa: BLE001
            pass
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
