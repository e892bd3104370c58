"""Control plane apart from the data plane (issue 13, item 3), on the serving core without processes:
a release is answered at once even while the engine thread is busy; a stopping worker refuses with an
exception the router retries (never an error chunk the client would see); the router leaves a worker out
from its first failed call until one succeeds or the back-off passes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from dynamo_ext.metrics import NullMetrics
from dynamo_ext.serving import Draining, RouterCore, RouterSettings, ServingWorker, WorkerSettings
from dynamo_ext.serving import router as router_mod
from dynamo_ext.serving.worker import _Held


class BusyRunner:
    """An engine runner whose engine thread is busy: release waits until ``free`` is set."""

    def __init__(self) -> None:
        self.free = asyncio.Event()
        self.released: list[list[int]] = []

    async def release(self, blocks: list[int]) -> None:
        await self.free.wait()
        self.released.append(list(blocks))


async def test_release_is_answered_while_the_engine_is_busy():
    w = ServingWorker(WorkerSettings(role="prefill", name="p", model="tiny"), plane=None, metrics=NullMetrics())
    w.runner = BusyRunner()  # type: ignore[assignment]
    w.held["h1"] = _Held([3, 4, 5], time.time() + 30)
    t0 = time.monotonic()
    assert await asyncio.wait_for(w.release("h1"), 0.5) is True  # held while read: the answer does not wait
    assert time.monotonic() - t0 < 0.1 and "h1" not in w.held
    assert await w.release("h1") is False and await w.release(123) is False  # unknown / malformed
    assert w.runner.released == []  # the blocks go back after the engine's current step
    w.runner.free.set()
    for _ in range(50):
        await asyncio.sleep(0.01)
        if w.runner.released:
            break
    assert w.runner.released == [[3, 4, 5]] and w.released == 1


async def test_a_stopping_worker_refuses_with_an_exception_not_an_error_chunk():
    w = ServingWorker(WorkerSettings(role="decode", name="d", model="tiny"), plane=None, metrics=NullMetrics())
    w.runner = object()  # type: ignore[assignment]
    w.stopping = True
    with pytest.raises(Draining):
        async for _ in w.generate({"token_ids": [1, 2, 3]}, "r1"):
            pass
    p = ServingWorker(WorkerSettings(role="prefill", name="p", model="tiny"), plane=None, metrics=NullMetrics())
    p.runner, p.engine, p.transports, p.stopping = object(), object(), object(), True  # type: ignore[assignment]
    with pytest.raises(Draining):
        await p.prefill({"token_ids": [1, 2, 3]})


class Plane:
    """Two decode workers; worker 1's calls fail to connect (dead, still listed until its lease ends)."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.dead = {1}

    def prefill_ids(self) -> list[int]:
        return []

    def decode_ids(self) -> list[int]:
        return [1, 2]

    def info(self, role: str, worker: int) -> Any:
        return None

    def overlap(self, tokens: list[int]) -> dict[int, int]:
        return {}

    async def decode(self, request: dict[str, Any], worker: int):
        self.calls.append(worker)
        if worker in self.dead:
            raise ConnectionError(f"Unavailable: TCP connection to worker {worker} failed")
        yield {"token_ids": [7], "finish_reason": "length",
               "completion_usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


async def _run(core: RouterCore) -> list[dict[str, Any]]:
    return [c async for c in core.session({"token_ids": [1, 2, 3], "stop_conditions": {"max_tokens": 1}})]


async def test_the_router_leaves_a_dead_worker_out_from_its_first_failed_call():
    plane = Plane()
    core = RouterCore(RouterSettings(policy="round-robin", disagg_min_prompt_tokens=0), plane, NullMetrics())
    for _ in range(6):
        out = await _run(core)
        assert [c["token_ids"] for c in out] == [[7]] and not any("error" in c for c in out)  # retried, no error
    assert plane.calls.count(1) == 1, plane.calls  # one failed connect, then left out
    assert core.health()["down"] == [1]
    plane.dead.clear()
    core.down[1] = time.monotonic() - router_mod.DOWN_S  # the back-off passed
    plane.calls.clear()
    for _ in range(4):
        await _run(core)
    assert 1 in plane.calls and core.down.get(1) is None  # chosen again, and its success clears the mark


class PrefillPlane(Plane):
    """One prefill worker (9) that answers with ``answer``; one live decode worker (2)."""

    def __init__(self, answer: dict[str, Any]) -> None:
        super().__init__()
        self.dead = set()
        self.answer = answer
        self.decode_requests: list[dict[str, Any]] = []

    def prefill_ids(self) -> list[int]:
        return [9]

    def decode_ids(self) -> list[int]:
        return [2]

    async def prefill(self, request: dict[str, Any], worker: int, timeout_s: float) -> dict[str, Any] | None:
        return self.answer

    async def decode(self, request: dict[str, Any], worker: int):
        self.decode_requests.append(request)
        async for c in super().decode(request, worker):
            yield c


async def test_a_prefill_worker_that_cannot_take_a_prompt_means_a_local_prefill_not_an_error():
    """A prefill worker whose pool is smaller than the prompt refuses it (an error chunk, not the client's
    fault): the decode worker prefills locally and the client gets its tokens (was an HTTP 500)."""
    from dynamo_ext.serving.protocol import error_chunk

    plane = PrefillPlane(error_chunk("cannot prefill: prompt of 1030 tokens needs more blocks than the pool has", 3))
    core = RouterCore(RouterSettings(policy="round-robin", disagg_min_prompt_tokens=0), plane, NullMetrics())
    out = await _run(core)
    assert [c["token_ids"] for c in out] == [[7]] and not any("error" in c for c in out)
    assert "kv_handle" not in plane.decode_requests[0] and core.health()["prefill_refusals"] == 1
    # a request the client got wrong is still refused at once, without a decode call
    plane.answer = error_chunk("bad sampling options", 3, invalid=True)
    out = await _run(core)
    assert out[0].get("error_type") == "invalid_argument" and len(plane.decode_requests) == 1


def test_router_local_prefill_false_sends_every_prompt_through_a_prefill_worker():
    """router.local_prefill: false (dynamo-ext): decide may not pick a local prefill while a prefill worker
    serves; true (default): with no KV layout known the local estimate wins for short prompts here."""
    plane = PrefillPlane({})
    tokens = list(range(200))
    kw = dict(policy="dynamo-ext", disagg_min_prompt_tokens=0, kv_bytes_per_token=4096)
    on = RouterCore(RouterSettings(**kw), plane, NullMetrics())
    off = RouterCore(RouterSettings(**kw, local_prefill=False), plane, NullMetrics())
    routes_on = [on.choose(tokens, f"r{i}") for i in range(5)]
    assert any(r.prefill is None for r in routes_on), routes_on
    assert all(r.reason != "disagg" for r in routes_on)  # routing.decide chose (not the round-robin fallback)
    routes_off = [off.choose(tokens, f"r{i}") for i in range(5)]
    assert all(r.prefill == 9 and r.reason != "disagg" for r in routes_off), routes_off


async def test_the_router_keeps_a_trace_of_routes_and_first_token_times():
    """RouterCore.recent_routes (GET /routes on the router's metrics server): each request's route, the
    estimate of routing.decide and the measured first-token time, for the tail analysis of bench route."""
    import json
    import urllib.request

    from dynamo_ext.metrics import serve_http

    plane = PrefillPlane({})
    core = RouterCore(RouterSettings(policy="dynamo-ext", disagg_min_prompt_tokens=0, kv_bytes_per_token=4096),
                      plane, NullMetrics())
    for _ in range(3):
        await _run(core)
    recs = core.recent_routes()
    assert len(recs) == 3 and all(r["ttft_s"] >= 0 and r["prompt_tokens"] == 3 for r in recs), recs
    assert all(r["estimate"]["est_s"] > 0 and "queue_wait_s" in r["estimate"]["terms"] for r in recs), recs
    assert all(r["first_from"] == r["decode"] == 2 for r in recs)
    srv = serve_http(0, lambda: {"status": "ok"}, json_paths={"/routes": core.recent_routes})
    try:
        with urllib.request.urlopen(srv.url.rsplit("/", 1)[0] + "/routes", timeout=5) as r:
            assert json.loads(r.read()) == json.loads(json.dumps(recs))
    finally:
        srv.close()


class AggPlane(Plane):
    """Three aggregated workers, no prefill workers, an empty prefix index (no KV event has arrived)."""

    def __init__(self) -> None:
        super().__init__()
        self.dead = set()

    def decode_ids(self) -> list[int]:
        return [1, 2, 3]


def test_a_prompt_routed_a_moment_ago_counts_as_cached_where_it_went():
    """router.pending_ttl_s > 0 (and work_weight 1): two requests with the same new long prefix, the second
    before the first one's KV events arrived, both go to the same worker (its prefix is pending there), so
    one cache holds it, not two. (Both are off by default: they measured worse on the CPU benchmarks.)"""
    core = RouterCore(RouterSettings(policy="dynamo-ext", disagg_min_prompt_tokens=0, kv_bytes_per_token=4096,
                                     decode_role="agg", pending_ttl_s=5.0, work_weight=1.0), AggPlane(),
                      NullMetrics())
    system = list(range(1000, 1000 + 64 * 16))
    first = core.choose(system + [1, 2, 3], "a")
    core.inflight[first.decode] += 1  # it is running there now
    second = core.choose(system + [4, 5, 6], "b")
    assert second.decode == first.decode and second.overlap_blocks == 64, (first, second)
    assert second.estimate["pending"] == {str(first.decode): 64}
    other = core.choose(list(range(5000, 5000 + 64 * 16)), "c")  # an unrelated prompt may go anywhere
    assert other.overlap_blocks == 0
