"""What every worker process does around its role: runtime, record, metrics, signals, ready line.

Order of a worker's life (``WorkerProcess.main``)::

    1. env defaults from dynamo.yaml (ETCD_ENDPOINTS, NATS_SERVER, DYN_EVENT_PLANE=nats, loopback hosts)
    2. rt = DistributedRuntime(loop, "etcd", "tcp", event_plane="nats")   instance id = rt lease id
    3. SIGTERM / SIGINT -> request_stop(): our record is deleted at once, rt.shutdown(): Dynamo
       unregisters the endpoints (no new requests; any that still reach us get an error chunk), waits
       for in-flight requests (we wait up to workers.drain_s, default 30 s, or --drain-s), then revokes the lease
       (instance, model card gone); leave main() -> exit 0
    4. await self.setup()            role: engine, endpoints, register_model, serve_endpoint tasks
    5. store.put(worker_key, encode_record(WorkerRecord(...)), lease=ep.connection_id())
    6. our dynamo_ext_* series appended to Dynamo's system status server (DYN_SYSTEM_PORT, --system-port) with
       Dynamo's labels (observability.py); /metrics (the plain series) + /health + /live on
       127.0.0.1:<--metrics-port> (0 = any free port)
    7. print("DYNAMO_EXT_READY role=<role> instance_id=<id> metrics=<url> [system=<url>]") on stdout, flushed
       (with DYN_LOGGING_JSONL: one JSON line with those fields, logfmt.ready_line_text);
       rt.set_health_status(True): the system server's /health and /live answer 200
    8. wait for the stop request; self.teardown(); return 0 (3 after a lost registration, below)

Lost registration (``watch_registration``, every ``REGISTRATION_CHECK_S`` while serving): the process must
not stay alive unregistered. It is lost when

* etcd answers that our lease (= instance id) does not exist any more (it expired: the process was stopped
  or starved longer than ``discovery.etcd.lease_ttl_s``; or it was revoked), or
* one of our ``serve_endpoint`` tasks ended while no stop was requested: Dynamo's runtime shut itself
  down (its keep-alive saw the lease gone, or it could not reach etcd for a whole TTL).

Then ``/health`` answers 503 ``{"status": "registration_lost", "reason": ...}`` (and the system server's
``/health`` 503 ``notready``), the runtime is shut down
as on SIGTERM (in-flight requests drain) and the process exits ``EXIT_REGISTRATION_LOST`` (3) so that its
supervisor (``dynamo-ext serve``) starts a fresh copy with a new lease. etcd that does not answer is not a
loss by itself (an etcd restart keeps the leases); Dynamo gives up after a whole TTL without etcd.

Logs go to stderr in one format per process (``dynamo_ext.logfmt``: Dynamo's JSON lines with
``DYN_LOGGING_JSONL``, else its text lines). Subclasses: ``decode.DecodeWorker`` (roles decode, agg),
``prefill.PrefillWorker``,
``router.RouterWorker``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable

from dynamo_ext import logfmt
from dynamo_ext.config import DynamoExtConfig
from dynamo_ext.discovery import EtcdStore, WorkerRecord, dynamo_env, encode_record
from dynamo_ext.discovery.records import PoolDescriptor as RecordPool
from dynamo_ext.discovery.records import worker_key
from dynamo_ext.metrics import MetricsServer, WorkerMetrics, make_worker_metrics, serve_http

from .observability import dynamo_labels, export_metrics, register_core_counters, system_url

log = logging.getLogger("dynamo_ext.workers")

# Component names Dynamo's planner and tools expect (notes §5): decode/agg under "backend".
COMPONENTS = {"agg": "backend", "decode": "backend", "prefill": "prefill", "router": "router"}
EXIT_REGISTRATION_LOST = 3
REGISTRATION_CHECK_S = 1.0  # how often a serving process checks its lease and its endpoints


@dataclass(frozen=True)
class WorkerArgs:
    role: str
    config: DynamoExtConfig
    model_dir: str
    index: int = 0
    metrics_port: int = 0
    device: str | None = None  # cpu | cuda:N; None: model.device (cuda -> cuda:0)
    drain_s: float | None = None  # None: workers.drain_s
    system_port: int | None = None  # Dynamo's system status server: None = DYN_SYSTEM_PORT, else 0; 0 = pick one

    @property
    def drain_timeout_s(self) -> float:
        return self.config.workers.drain_s if self.drain_s is None else self.drain_s


def apply_env_defaults(cfg: DynamoExtConfig) -> None:
    """Environment every Dynamo process needs; values already set (by the launcher) win."""
    d = cfg.discovery
    defaults = {
        "ETCD_ENDPOINTS": ",".join(d.etcd.endpoints),
        "NATS_SERVER": d.nats.url,
        "DYN_EVENT_PLANE": "nats",
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "DYN_EVENT_PLANE_HOST": "127.0.0.1",
        "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
        "DYN_SYSTEM_HOST": "127.0.0.1",
        "HF_HUB_OFFLINE": "1",
        "ETCD_LEASE_TTL": str(d.etcd.lease_ttl_s),
        "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": os.environ.get("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "upb"),
    }
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
    for k, v in dynamo_env(cfg).items():  # etcd/NATS TLS and credentials, as the runtime reads them
        os.environ.setdefault(k, v)


class WorkerProcess:
    role: str = ""

    def __init__(self, args: WorkerArgs) -> None:
        self.args = args
        self.cfg = args.config
        self.namespace = self.cfg.discovery.namespace
        self.component = COMPONENTS[args.role]
        self.rt: Any = None
        self.core: Any = None  # the serving core the role adapts (None until setup)
        self.store: EtcdStore | None = None
        self.metrics: WorkerMetrics | None = None
        self.http: MetricsServer | None = None
        self.stopping = False
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Future[Any]] = []
        self._task_names: list[str] = []
        self.instance_id = 0
        self.record_key = ""
        self.started_at = time.time()
        self.lost: str | None = None  # why our registration is gone (see the module docstring)
        self.exit_code = 0
        self.system_url: str | None = None  # Dynamo's system status server of this process, when it answers
        self._endpoint_names: dict[int, str] = {}

    # -- hooks --------------------------------------------------------------------------------------
    async def setup(self) -> Any:
        """Create endpoints and start serving; return the primary endpoint (its lease holds the record)."""
        raise NotImplementedError

    def record_fields(self) -> dict[str, Any]:
        return {}

    def json_paths(self) -> dict[str, Any]:
        """Extra GET paths of the metrics server (path -> callable returning JSON); the router adds /routes."""
        return {}

    def health(self) -> dict[str, Any]:
        status = "registration_lost" if self.lost else "stopping" if self.stopping else "ok"
        h: dict[str, Any] = {"status": status, "role": self.args.role, "instance_id": self.instance_id}
        if self.lost:
            h["reason"] = self.lost
        if self.system_url:
            h["system"] = self.system_url  # Dynamo's system status server of this process
        if self.core is not None:  # the serving core's state (serving.ServingWorker / RouterCore .health())
            h.update(self.core.health())
        h["status"] = status
        return h

    async def health_handler(self, request: Any, context: Any) -> AsyncIterator[dict[str, Any]]:
        """The ``health`` Dynamo endpoint: the same JSON as ``/health``."""
        yield self.health()

    async def teardown(self) -> None:
        pass

    # -- helpers ------------------------------------------------------------------------------------
    def spawn(self, aw: Awaitable[Any], name: str) -> asyncio.Future[Any]:
        fut = asyncio.ensure_future(aw)

        def _done(f: asyncio.Future[Any]) -> None:
            if not f.cancelled() and f.exception() is not None and not self.stopping:
                log.error("task %s failed: %r", name, f.exception())

        fut.add_done_callback(_done)
        self._tasks.append(fut)
        self._task_names.append(name)
        return fut

    def endpoint(self, name: str, component: str | None = None) -> Any:
        ep = self.rt.endpoint(f"{self.namespace}.{component or self.component}.{name}")
        if component is None or component == self.component:
            self._endpoint_names[id(ep)] = name
        return ep

    def _set_system_health(self, ready: bool) -> None:
        try:
            self.rt.set_health_status(ready)
        except Exception as e:  # noqa: BLE001 - the system server is optional
            log.debug("set_health_status(%s): %r", ready, e)

    async def wait_serving(self, ep: Any, timeout: float = 30.0) -> None:
        """Until our own instance of ``ep`` is visible in discovery (so the ready line tells the truth)."""
        client = await ep.client()
        t_end = time.monotonic() + timeout
        while self.instance_id not in client.instance_ids():
            if time.monotonic() > t_end:
                raise TimeoutError(f"endpoint not visible in discovery after {timeout} s")
            await asyncio.sleep(0.02)

    def request_stop(self) -> None:
        if self.stopping:
            return
        log.info("stop requested: shutting the runtime down (lease revoked)")
        self.stopping = True
        self._set_system_health(False)
        if self.store is not None and self.record_key:
            self.spawn(self._delete_record(), "delete-record")
        try:
            self.rt.shutdown()
        except Exception as e:  # noqa: BLE001
            log.warning("rt.shutdown failed: %s", e)
        self._stop.set()

    def registration_lost(self, reason: str) -> None:
        """Our lease or our runtime is gone: say so on /health, drain, exit EXIT_REGISTRATION_LOST."""
        if self.lost is not None or self.stopping:
            return
        self.lost = reason
        self.exit_code = EXIT_REGISTRATION_LOST
        log.error("registration lost: %s; exiting with status %d so that the launcher starts a fresh %s",
                  reason, EXIT_REGISTRATION_LOST, self.args.role)
        self.request_stop()

    async def watch_registration(self, interval: float = REGISTRATION_CHECK_S) -> None:
        """While serving: our lease still exists in etcd, and Dynamo still serves our endpoints."""
        assert self.store is not None
        while not self.stopping:
            await asyncio.sleep(interval)
            if self.stopping:
                return
            ended = [n for t, n in zip(self._tasks, self._task_names) if n.startswith("serve-") and t.done()]
            if ended:
                self.registration_lost(f"the Dynamo runtime stopped serving ({', '.join(ended)} ended while no stop "
                                       "was requested: its lease was lost or it could not reach etcd)")
                return
            try:
                ttl = await asyncio.wait_for(self.store.lease_ttl(self.instance_id), 3.0)
            except Exception as e:  # noqa: BLE001 - etcd unreachable (a restart keeps leases): not a loss yet
                log.debug("lease check: %r", e)
                continue
            if ttl <= 0:
                self.registration_lost(f"lease {self.instance_id:x} (our instance id) is gone from etcd: expired "
                                       "or revoked")
                return

    async def _delete_record(self) -> None:
        """Our record goes at once; the lease (Dynamo's instance, card) goes after the drain."""
        try:
            assert self.store is not None
            await asyncio.wait_for(self.store.delete(self.record_key), 2.0)
        except Exception as e:  # noqa: BLE001 - the lease removes it anyway
            log.warning("record delete failed (%r): it goes with the lease", e)

    # -- main ---------------------------------------------------------------------------------------
    async def main(self) -> int:
        from dynamo.runtime import DistributedRuntime  # noqa: PLC0415

        loop = asyncio.get_running_loop()
        self.rt = DistributedRuntime(loop, "etcd", "tcp", event_plane="nats")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        ep = await self.setup()
        self.instance_id = int(ep.connection_id())
        self.store = await EtcdStore.connect(os.environ["ETCD_ENDPOINTS"].split(",")[0])
        rec = WorkerRecord(namespace=self.namespace, component=self.component, role=self.args.role,
                           instance_id=self.instance_id, model=self.cfg.model.name, host=socket.gethostname(),
                           pid=os.getpid(), started_at=self.started_at, **self.record_fields())
        self.record_key = rec.key
        await self.store.put(rec.key, encode_record(rec), lease=self.instance_id)
        if self.metrics is None:
            self.metrics = make_worker_metrics(self.args.role, self.instance_id)
        self.metrics.info.labels(self.args.role, str(self.instance_id)).set(1)
        self._export_metrics(ep)
        try:
            self.http = serve_http(self.args.metrics_port, self.health, json_paths=self.json_paths())
        except OSError as e:
            if e.errno != errno.EADDRINUSE or not self.args.metrics_port:
                raise
            # the launcher picks a free port before the start; another listener (this process's Dynamo runtime
            # binds ephemeral ports) may have taken it since: any free port, the READY line says which
            log.warning("--metrics-port %d is taken (%s): serving metrics on a free port", self.args.metrics_port, e)
            self.http = serve_http(0, self.health, json_paths=self.json_paths())
        try:
            port = int(os.environ.get("DYN_SYSTEM_PORT") or -1)
        except ValueError:
            port = -1
        if port > 0:
            host = os.environ.get("DYN_SYSTEM_HOST") or "127.0.0.1"
            self.system_url = system_url("127.0.0.1" if host in ("0.0.0.0", "::") else host, port)
            if self.system_url is None:
                log.warning("Dynamo's system status server does not answer on %s:%d (see the runtime's log line "
                            "above: port taken?): metrics only on %s", host, port, self.http.url)
        ready = {"role": self.args.role, "instance_id": self.instance_id, "metrics": self.http.url}
        if self.system_url:
            ready["system"] = self.system_url
        self._set_system_health(True)
        # one write(2) of the whole line: the Rust logger shares the log and must not land inside it
        sys.stdout.flush()
        os.write(sys.stdout.fileno(), (logfmt.ready_line_text(ready) + "\n").encode())
        log.info("%s worker %d serving in namespace %s (record %s)", self.args.role, self.instance_id,
                 self.namespace, rec.key)
        self.spawn(self.watch_registration(), "watch-registration")
        await self._stop.wait()
        # Dynamo's graceful shutdown: serve_endpoint returns once in-flight requests finished (bounded)
        serving = [t for t, n in zip(self._tasks, self._task_names) if n.startswith("serve-")]
        if serving:
            drain_s = self.args.drain_timeout_s
            done, pending = await asyncio.wait(serving, timeout=drain_s)
            if pending:
                log.warning("%d endpoints still busy after %.0f s: exiting anyway", len(pending), drain_s)
        try:
            await asyncio.wait_for(self.teardown(), 5.0)
        except Exception as e:  # noqa: BLE001
            log.warning("teardown: %r", e)
        for t in self._tasks:
            t.cancel()
        if self.http is not None:
            self.http.close()
        return self.exit_code

    def _export_metrics(self, ep: Any) -> None:
        """Our series on Dynamo's system status server with Dynamo's labels (observability.py), and the
        counters read from the serving core (on both /metrics)."""
        name = self._endpoint_names.get(id(ep), "generate")
        labels = dynamo_labels(self.namespace, self.component, name, self.instance_id, self.cfg.model.name)
        try:
            register_core_counters(self)
        except Exception as e:  # noqa: BLE001 - metrics must not stop serving
            log.warning("core counters not exported: %r", e)
        try:
            export_metrics(ep, labels)
        except Exception as e:  # noqa: BLE001
            log.warning("metrics not appended to Dynamo's system status server (%r): only on %s", e,
                        f"--metrics-port {self.args.metrics_port}")


def record_pools(pools: list[Any]) -> list[RecordPool]:
    """Discovery's pool descriptors from transport KvPools."""
    return [RecordPool(kind=p.kind.value, addr=p.addr, nbytes=p.nbytes, device_id=p.device_id) for p in pools]


def stdout_logs_to_stderr() -> None:
    """Move every logging handler that writes to stdout or stderr with a format of its own (NIXL configures
    one, on stdout) to stderr in this process's format: stdout carries only the ready line."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stdout, sys.stderr):
                logfmt.adopt(h)


def setup_logging(role: str, index: int) -> None:
    """This process's one log format (``dynamo_ext.logfmt``); prometheus_client's ``*_created`` series off
    (Dynamo's own series have none)."""
    logfmt.configure()
    try:
        from prometheus_client import disable_created_metrics  # noqa: PLC0415

        disable_created_metrics()
    except ImportError:  # older prometheus_client
        pass


__all__ = ["COMPONENTS", "EXIT_REGISTRATION_LOST", "WorkerArgs", "WorkerProcess", "apply_env_defaults", "record_pools", "setup_logging",
           "worker_key"]
