"""Local executor: acts on Dynamo planner decisions for `dynamo-ext serve` (environment: virtual).

Protocol
--------
Dynamo's planner, run with ``environment: virtual``, does not touch processes. It publishes each
decision through its ``VirtualConnectorCoordinator`` (etcd keys ``v1/<namespace>/planner/*``) and
waits until someone acknowledges it; until then later ticks log "Previous scaling decision not
ready, skipping". The deployment side reads them with ``dynamo._core.VirtualConnectorClient``:

    client = VirtualConnectorClient(runtime, namespace)
    await client.wait()                 # returns when an unacknowledged decision exists
    d = await client.get()              # PlannerDecision(num_prefill_workers, num_decode_workers, decision_id);
                                        # -1 = no opinion on that role
    ... add / drain + remove workers ...
    await client.complete(d)            # acknowledge: the planner may decide again

`PlannerExecutor` runs that loop and changes the worker set through a `WorkerScaler`, supplied by
the launcher (which owns the processes; planner/ may not import the launcher or the workers):

    scaler.replicas(role) -> int                 workers of `role` running now (incl. starting ones)
    scaler.scale(role, target)                   start or stop processes until `target` run
    scaler.drain(role, target)                   before a scale-down: pick replicas(role) - target
                                                 workers, stop routing new requests to them and return
                                                 once their in-flight requests finished (or timed out)

`role` is "prefill" or "decode" (Dynamo's decode component is named `backend`). Each method may be
sync (run in a worker thread) or async. For one decision the executor first grows the roles that
grow (capacity arrives before any leaves), then, per shrinking role, `drain` then `scale`, so no
accepted request is lost. A failing callback is logged and recorded in `Applied.error`; the
decision is still completed, otherwise the planner would block forever (the policy re-syncs to
the observed worker count, see `planner.policy` landing_timeout_s).

`PlannerProcess` builds the command line of the planner process itself (`python -m dynamo.planner
--config configs/planner.yaml`, with DYN_NAMESPACE and loopback variables); `ExecutorThread` runs
the executor on its own event loop and Dynamo runtime for a launcher that is synchronous.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

log = logging.getLogger(__name__)

Role = Literal["prefill", "decode"]
ROLES: tuple[Role, Role] = ("prefill", "decode")


class WorkerScaler(Protocol):
    def replicas(self, role: Role) -> int: ...
    def scale(self, role: Role, target: int) -> Any: ...  # None or an awaitable
    def drain(self, role: Role, target: int) -> Any: ...  # None or an awaitable


class DecisionClient(Protocol):
    """The shape of dynamo._core.VirtualConnectorClient."""

    async def wait(self) -> None: ...
    async def get(self) -> Any: ...
    async def complete(self, decision: Any) -> None: ...


@dataclass
class Applied:
    decision_id: int
    before: dict[str, int]
    after: dict[str, int]
    steps: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    res = await asyncio.to_thread(fn, *args)
    if inspect.isawaitable(res):
        return await res
    return res


class PlannerExecutor:
    def __init__(
        self,
        client: DecisionClient,
        scaler: WorkerScaler,
        *,
        drain_timeout_s: float = 120.0,
        on_applied: Callable[[Applied], None] | None = None,
    ) -> None:
        self.client = client
        self.scaler = scaler
        self.drain_timeout_s = drain_timeout_s
        self.on_applied = on_applied
        self.history: list[Applied] = []

    async def apply(self, decision: Any) -> Applied:
        """Apply one PlannerDecision (does not acknowledge it)."""
        t0 = time.monotonic()
        want = {"prefill": int(decision.num_prefill_workers), "decode": int(decision.num_decode_workers)}
        before = {r: int(await _call(self.scaler.replicas, r)) for r in ROLES}
        rec = Applied(decision_id=int(getattr(decision, "decision_id", -1)), before=before, after=dict(before))
        try:
            grow = [r for r in ROLES if want[r] >= 0 and want[r] > before[r]]
            shrink = [r for r in ROLES if want[r] >= 0 and want[r] < before[r]]
            for r in grow:
                rec.steps.append(f"scale {r} {before[r]} -> {want[r]}")
                await _call(self.scaler.scale, r, want[r])
            for r in shrink:
                rec.steps.append(f"drain {r} {before[r] - want[r]} worker(s)")
                try:
                    await asyncio.wait_for(_call(self.scaler.drain, r, want[r]), self.drain_timeout_s)
                except asyncio.TimeoutError:
                    rec.steps.append(f"drain {r} timed out after {self.drain_timeout_s:g}s; stopping anyway")
                rec.steps.append(f"scale {r} {before[r]} -> {want[r]}")
                await _call(self.scaler.scale, r, want[r])
        except Exception as e:  # noqa: BLE001 - recorded, decision still completed
            rec.error = f"{type(e).__name__}: {e}"
            log.error("planner executor: decision %s failed: %s", rec.decision_id, rec.error)
        rec.after = {r: int(await _call(self.scaler.replicas, r)) for r in ROLES}
        rec.seconds = time.monotonic() - t0
        self.history.append(rec)
        if self.on_applied is not None:
            self.on_applied(rec)
        log.info("planner executor: decision %s %s -> %s in %.2fs (%s)", rec.decision_id, before, rec.after,
                 rec.seconds, "; ".join(rec.steps) or "no change")
        return rec

    async def run_once(self) -> Applied:
        await self.client.wait()
        decision = await self.client.get()
        try:
            return await self.apply(decision)
        finally:
            await self.client.complete(decision)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        while not stop.is_set():
            waiter = asyncio.ensure_future(self.run_once())
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if waiter not in done:
                waiter.cancel()  # only ever cancelled while waiting: apply() is not interrupted midway
                await asyncio.gather(waiter, return_exceptions=True)
            else:
                stopper.cancel()
                try:
                    waiter.result()
                except Exception as e:  # noqa: BLE001 - a broken client call must not end the loop
                    log.error("planner executor: %s: %s; retrying in 1s", type(e).__name__, e)
                    await asyncio.sleep(1.0)


# ---- wiring to Dynamo (imported lazily: dynamo._core needs the runtime wheel only) ----------------


def make_client(runtime: Any, namespace: str) -> DecisionClient:
    from dynamo._core import VirtualConnectorClient

    return VirtualConnectorClient(runtime, namespace)


class ExecutorThread:
    """Runs `PlannerExecutor` on its own thread, event loop and DistributedRuntime.

    For a synchronous launcher: `t = ExecutorThread(scaler, namespace); t.start(); ...; t.stop()`.
    The scaler's sync methods are called from worker threads of that loop.
    """

    def __init__(self, scaler: WorkerScaler, namespace: str, **executor_kwargs: Any) -> None:
        self.scaler, self.namespace, self.kwargs = scaler, namespace, executor_kwargs
        self.executor: PlannerExecutor | None = None
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="dynamo-ext-planner-executor", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._amain())
        except BaseException as e:  # noqa: BLE001 - surfaced through .error
            self.error = e
            self._ready.set()

    async def _amain(self) -> None:
        from dynamo._core import DistributedRuntime

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        rt = DistributedRuntime(self._loop, "etcd", "tcp", event_plane=os.environ.get("DYN_EVENT_PLANE", "nats"))
        try:
            self.executor = PlannerExecutor(make_client(rt, self.namespace), self.scaler, **self.kwargs)
            self._ready.set()
            await self.executor.run(self._stop)
        finally:
            rt.shutdown()

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("planner executor did not start")
        if self.error is not None:
            raise RuntimeError(f"planner executor failed to start: {self.error}") from self.error

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)


@dataclass(frozen=True)
class PlannerProcess:
    """How to run Dynamo's planner with our plugins for one namespace (argv + env for a launcher)."""

    config_path: Path
    namespace: str = "dynamo"
    python: str = sys.executable
    extra_pythonpath: tuple[str, ...] = ()  # e.g. the directory that holds planner/ when not installed

    def argv(self) -> list[str]:
        return [self.python, "-m", "dynamo.planner", "--config", str(self.config_path)]

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["DYN_NAMESPACE"] = self.namespace
        for k, v in (("DYN_TCP_RPC_HOST", "127.0.0.1"), ("DYN_EVENT_PLANE_HOST", "127.0.0.1"), ("DYN_EVENT_PLANE", "nats")):
            env.setdefault(k, v)
        if self.extra_pythonpath:
            old = env.get("PYTHONPATH")
            env["PYTHONPATH"] = os.pathsep.join(list(self.extra_pythonpath) + ([old] if old else []))
        return env


def planner_missing_dependencies() -> list[str]:
    """Modules the planner process needs that are not importable here (empty list = ready)."""
    need = ["sklearn", "pmdarima", "filterpy", "prophet", "pandas", "prometheus_api_client", "plotly", "aisimulate_core"]
    return [m for m in need if importlib.util.find_spec(m) is None]

