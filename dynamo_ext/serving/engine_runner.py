"""Drive an ``engine.Engine`` from asyncio: one engine thread, one step loop, one queue per request.

Who calls what, in what order::

    worker                                    EngineRunner                          engine thread
    r = EngineRunner(engine, pool)            single-thread executor
    task = create_task(r.run())               loop: wait for work -> step() ------> engine.step()
    await r.call(fn, *args)                   any engine / BlockPool call ----------> fn(*args)
    res = await r.prefill(req)                prefix hit from the pool, prefill_only, commit full blocks
    async for out in r.decode(req, blocks, first):
                                              add_prefilled_request, wake the loop, yield RequestOutputs
                                              (client gone -> abort)
    r.stop()                                  the loop ends after the current step

Every engine and ``BlockPool`` call runs on the one engine thread, so the engine, the pool and the
KV events it publishes are never touched concurrently (``BlockPool`` is not thread-safe). Torch
releases the GIL during a forward, so the asyncio loop (requests, NIXL polling) keeps running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

from dynamo_ext.engine.protocol import DetachedRequest, Engine, PrefillResult, Request, RequestOutput
from dynamo_ext.kv.pool import BlockPool

log = logging.getLogger(__name__)


@dataclass
class Load:
    waiting: int
    running: int
    waiting_tokens: int
    running_kv_tokens: int


class NoRoom(RuntimeError):
    """Not enough free blocks right now (the caller waits for blocks to be freed and retries)."""


class EngineRunner:
    def __init__(self, engine: Engine, pool: BlockPool) -> None:
        self.engine = engine
        self.pool = pool
        self.block_size = pool.block_size
        self._ex = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._wake = asyncio.Event()
        self._freed = asyncio.Event()  # set whenever blocks may have been freed
        self._stopped = False
        #: blocks kept free for running sequences to grow into (one per running sequence, at least this many)
        self.headroom = 4
        self.steps = 0
        self.prefills = 0
        #: the engine's own prefix-cache counters: prompt tokens prefilled here, of which served from the cache
        self.prefill_prompt_tokens = 0
        self.prefill_cached_tokens = 0
        self.prefill_seconds = 0.0  # engine-thread time of those prefills
        #: prefix-aware pulls (a decode worker's KV from a prefill worker or a drained / rebalanced decode
        #: worker): their prompt tokens, and of those the leading full blocks' found in our prefix cache (not read)
        self.pulls = 0
        self.pull_prompt_tokens = 0
        self.pull_cached_tokens = 0

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._ex, fn, *args)

    # -- the step loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        while not self._stopped:
            if not self.engine.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outs: list[RequestOutput] = await self.call(self.engine.step)
            except Exception:  # an engine bug must not kill the worker silently
                log.exception("engine step failed")
                await asyncio.sleep(0.05)
                continue
            self.steps += 1
            if any(o.finished for o in outs):
                self._freed.set()
            for o in outs:
                q = self._queues.get(o.request_id)
                if q is not None:
                    q.put_nowait(o)

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    def load(self) -> Load:
        """Approximate (read without the engine thread: counts only)."""
        e: Any = self.engine
        waiting = list(getattr(e, "waiting", []))
        running = list(getattr(e, "running", []))
        return Load(len(waiting), len(running), sum(len(s.tokens) - s.num_computed for s in waiting),
                    sum(len(s.tokens) for s in running))

    def _room(self, need: int) -> bool:
        running = len(getattr(self.engine, "running", ()))
        return self.pool.num_free >= need + max(self.headroom, running)

    async def wait_room(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> Any:
        """``await self.call(fn, *args)``, retried while it raises NoRoom, each time after blocks were freed."""
        loop = asyncio.get_running_loop()
        t_end = loop.time() + timeout
        while True:
            self._freed.clear()
            try:
                return await self.call(fn, *args)
            except NoRoom:
                left = t_end - loop.time()
                if left <= 0:
                    raise
                try:
                    await asyncio.wait_for(self._freed.wait(), min(left, 0.5))
                except asyncio.TimeoutError:
                    pass

    # -- prefill ----------------------------------------------------------------------------------
    def _prefill_sync(self, req: Request) -> PrefillResult:
        t0 = time.perf_counter()
        bs = self.block_size
        need = -(-(len(req.prompt_token_ids) + 1) // bs)
        if need > self.pool.num_blocks:
            raise ValueError(f"prompt of {len(req.prompt_token_ids)} tokens needs more blocks than the pool has")
        if not self._room(need):
            raise NoRoom(f"{need} blocks needed, {self.pool.num_free} free")
        prefix = self.pool.match_tokens(req.prompt_token_ids)
        usable = min(len(prefix), (len(req.prompt_token_ids) - 1) // bs)
        req.prefix_blocks = list(prefix)
        res = self.engine.prefill_only(req)  # frees prefix blocks beyond `usable`, or all of them on error
        nfull = len(req.prompt_token_ids) // bs
        if nfull > usable:  # register the new full blocks (KV stored events go out here)
            parent = res.block_ids[usable - 1] if usable else None
            try:
                self.pool.commit(res.block_ids[usable:nfull], req.prompt_token_ids[usable * bs:nfull * bs], parent)
            except Exception as e:  # noqa: BLE001 - a cache bookkeeping problem must not fail the request
                log.warning("commit of prefilled blocks failed: %s", e)
        self.prefills += 1
        self.prefill_prompt_tokens += len(req.prompt_token_ids)
        self.prefill_cached_tokens += usable * bs
        self.prefill_seconds += time.perf_counter() - t0
        return res

    def counters(self) -> dict[str, float]:
        """The engine's own counters (cumulative): steps, prefills, prompt tokens prefilled and cached; pulls,
        their prompt tokens and those found cached here (the prefix-aware pull's hits)."""
        return {"steps": self.steps, "prefills": self.prefills, "prefill_prompt_tokens": self.prefill_prompt_tokens,
                "prefill_cached_tokens": self.prefill_cached_tokens, "prefill_seconds": self.prefill_seconds,
                "pulls": self.pulls, "pull_prompt_tokens": self.pull_prompt_tokens,
                "pull_cached_tokens": self.pull_cached_tokens}

    async def prefill(self, req: Request) -> PrefillResult:
        """Prefill now, or as soon as the pool has room (NoRoom after ``wait_room``'s timeout)."""
        return await self.wait_room(self._prefill_sync, req)

    def _commit_pulled(self, req: Request, block_ids: Sequence[int], cached: int = 0) -> None:
        bs = self.block_size
        nfull = len(req.prompt_token_ids) // bs
        self.pulls += 1
        self.pull_prompt_tokens += len(req.prompt_token_ids)
        self.pull_cached_tokens += cached * bs
        if nfull > cached:  # the first ``cached`` blocks came from our prefix cache: already registered
            try:
                self.pool.commit(list(block_ids[cached:nfull]), req.prompt_token_ids[cached * bs: nfull * bs],
                                 block_ids[cached - 1] if cached else None)
            except Exception as e:  # noqa: BLE001
                log.warning("commit of pulled blocks failed: %s", e)

    async def commit_pulled(self, req: Request, block_ids: Sequence[int], cached: int = 0) -> None:
        await self.call(self._commit_pulled, req, block_ids, cached)

    def _match_for_pull(self, req: Request, handle_blocks: int) -> list[int]:
        bs = self.block_size
        prefix = self.pool.match_tokens(req.prompt_token_ids)  # one reference on each
        keep = min(len(prefix), handle_blocks - 1, len(req.prompt_token_ids) // bs)
        if len(prefix) > keep:
            self.pool.free(prefix[keep:])
        return list(prefix[:keep])

    def _blocks_for_pull(self, req: Request, handle_blocks: int) -> tuple[list[int], int]:
        cached = self._match_for_pull(req, handle_blocks)
        try:
            return cached + self._allocate_sync(handle_blocks - len(cached)), len(cached)
        except BaseException:
            self.pool.free(cached)
            raise

    async def blocks_for_pull(self, req: Request, handle_blocks: int) -> tuple[list[int], int]:
        """(destination blocks, k) for a pull of ``handle_blocks``: the first k are the leading prompt blocks
        our prefix cache holds (``match_for_pull``), the rest freshly allocated — one engine-thread call,
        retried when the pool has no room (``wait_room``)."""
        return await self.wait_room(self._blocks_for_pull, req, handle_blocks)

    async def match_for_pull(self, req: Request, handle_blocks: int) -> list[int]:
        """Leading prompt blocks our prefix cache already holds (a reference taken on each), at most
        ``handle_blocks - 1``: a pull then reads only the rest (always at least the last block)."""
        return await self.call(self._match_for_pull, req, handle_blocks)

    async def release(self, block_ids: Sequence[int]) -> None:
        await self.call(self.engine.release, list(block_ids))
        self._freed.set()

    def _allocate_sync(self, n: int) -> list[int]:
        if not self._room(n):
            raise NoRoom(f"{n} blocks needed, {self.pool.num_free} free")
        return self.engine.allocator.allocate(n)

    async def allocate(self, n: int) -> list[int]:
        """``n`` blocks for incoming KV, as soon as the pool has room."""
        return await self.wait_room(self._allocate_sync, n)

    async def free(self, block_ids: Sequence[int]) -> None:
        await self.call(self.engine.allocator.free, list(block_ids))
        self._freed.set()

    # -- migration --------------------------------------------------------------------------------
    async def export(self, request_id: str) -> DetachedRequest | None:
        """Take a running request out of the engine with its KV blocks kept (the caller owns them and
        releases them with ``release``); its ``decode()`` stream ends with finish reason ``migrated``."""
        st = await self.call(self.engine.detach, request_id)
        if st is None:
            return None
        q = self._queues.get(request_id)
        if q is not None:
            q.put_nowait(RequestOutput(request_id, [], True, "migrated", st.num_prompt, len(st.output)))
        return st

    # -- decode -----------------------------------------------------------------------------------
    async def decode(self, req: Request, block_ids: Sequence[int], first_token: int) -> AsyncIterator[RequestOutput]:
        """Outputs after ``first_token`` (which the caller has already sent), until finished."""
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        rid = req.request_id
        self._queues[rid] = q
        finished = False
        try:
            try:
                await self.call(self.engine.add_prefilled_request, req, list(block_ids), first_token)
            except BaseException:
                finished = True  # nothing to abort; the blocks were not handed over
                await self.call(self.engine.allocator.free, list(block_ids))
                raise
            self._wake.set()
            while True:
                o = await q.get()
                yield o
                if o.finished:
                    finished = True
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:
                await self.call(self.engine.abort, rid)
