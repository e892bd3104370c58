"""A worker's metrics and health where Dynamo's are: its system status server, with Dynamo's labels.

Dynamo 1.6.1's runtime serves, per process, a system status server on ``DYN_SYSTEM_HOST``:``DYN_SYSTEM_PORT``
(off when the port is unset or -1): ``/metrics`` (its ``dynamo_component_*`` series, labelled
``dynamo_namespace``, ``dynamo_component``, ``dynamo_endpoint``, ``worker_id``), ``/health`` and ``/live``
(both 200 ``{"status": "ready"}`` only after ``DistributedRuntime.set_health_status(True)``, 503
``notready`` before and after ``set_health_status(False)`` or ``shutdown()``). A Python component adds its own
series with ``Endpoint.metrics.register_prometheus_expfmt_callback(callback)`` (``dynamo._core``,
``prometheus_metrics.pyi``: the text the callback returns is appended to ``/metrics`` at each scrape) and
``register_prometheus_typed_callback`` (the same families for the OTLP export); Dynamo's own engines (vLLM,
SGLang, TRT-LLM) do it through ``dynamo.common.utils.prometheus.register_engine_metrics_callback``, which this
module uses. Measured on 1.6.1: the appended series carry exactly the labels injected here.

Who calls what (``runtime.WorkerProcess.main``)::

    pick_system_port(host)                      before the runtime exists: --system-port 0 -> a free port
                                                below 32768 (1.6.1 parses DYN_SYSTEM_PORT as i16)
    labels = dynamo_labels(ns, component, endpoint, instance id, model)
    export_metrics(primary endpoint, labels)    our dynamo_ext_* series, labelled, on the system port (our own
                                                /metrics on --metrics-port keeps the plain series)
    register_core_counters(worker)              decisions / migrations (router), prefix-cache counters (engines)
    system_url(port)                            the system server answers (probe), else None
    rt.set_health_status(True)                  at the ready line; False on stop / lost registration

Labels added to every ``dynamo_ext_*`` series: ``dynamo_namespace`` (discovery.namespace),
``dynamo_component`` (``backend`` | ``prefill`` | ``router``), ``dynamo_endpoint`` (the primary endpoint:
``generate``, ``prefill`` for prefill workers), ``worker_id`` (instance id in hex, as the runtime writes it),
``model`` and ``model_name`` (model.name) — the set Dynamo's ``register_engine_metrics_callback`` injects.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import urllib.request
from typing import TYPE_CHECKING, Any, Callable

from prometheus_client import REGISTRY, CollectorRegistry

from dynamo_ext.metrics import CountersCollector

if TYPE_CHECKING:
    from .runtime import WorkerProcess

log = logging.getLogger("dynamo_ext.workers")

PREFIX = "dynamo_ext_"
#: Dynamo 1.6.1 reads DYN_SYSTEM_PORT as a signed 16-bit integer (``invalid value ... expected i16 for key
#: "SYSTEM_PORT"`` for 36987): system ports are below 32768; also below Linux's ephemeral range (32768-60999)
SYSTEM_PORT_RANGE = (20000, 32767)
#: RouterCore.decisions keys that are migrations, not routing decisions -> migration kind
MIGRATION_KEYS = {"migrate_move": "move", "migrate_recompute": "recompute", "rebalance_move": "rebalance"}


def pick_system_port(host: str = "127.0.0.1", tries: int = 50) -> int:
    """A port in ``SYSTEM_PORT_RANGE`` that ``host`` can bind now (the runtime binds it a moment later)."""
    lo, hi = SYSTEM_PORT_RANGE
    for _ in range(tries):
        port = random.randint(lo, hi)
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}..{hi} on {host} after {tries} tries")


def dynamo_labels(namespace: str, component: str, endpoint: str, instance_id: int, model: str) -> dict[str, str]:
    return {"dynamo_namespace": namespace, "dynamo_component": component, "dynamo_endpoint": endpoint,
            "worker_id": format(int(instance_id), "x"), "model": model, "model_name": model}


def export_metrics(ep: Any, labels: dict[str, str], registry: CollectorRegistry = REGISTRY) -> None:
    """Append our ``dynamo_ext_*`` series, with ``labels``, to the runtime's ``/metrics`` (system status
    server) and OTLP export, at each scrape."""
    from dynamo.common.utils.prometheus import register_engine_metrics_callback  # noqa: PLC0415

    register_engine_metrics_callback(ep, registry, metric_prefix_filters=[PREFIX], inject_custom_labels=labels)


def register_core_counters(w: "WorkerProcess", registry: CollectorRegistry = REGISTRY) -> CountersCollector:
    """Counters read from the serving core at each scrape: a router's decisions by reason and migrations by
    kind (``RouterCore.decisions``), an engine worker's prefix-cache counters (``EngineRunner.counters``)."""

    def core() -> Any:
        if w.core is None:
            raise LookupError("no serving core yet")
        return w.core

    def decisions() -> dict[str, float]:
        return {k: v for k, v in core().decisions.items() if k not in MIGRATION_KEYS}

    def migrations() -> dict[str, float]:
        d = core().decisions
        return {kind: d.get(key, 0) for key, kind in MIGRATION_KEYS.items()}

    def engine(key: str) -> Callable[[], dict[str, float]]:
        def read() -> dict[str, float]:
            runner = getattr(core(), "runner", None)
            if runner is None:
                raise LookupError("no engine")
            return {"": runner.counters()[key]}
        return read

    if w.args.role == "router":
        fams = [("dynamo_ext_router_decisions", "Routing decisions of this router by reason (routing.decide's "
                 "reason: short_prompt, disagg_cheaper, local_cheaper, no_prefill_workers, ...; round-robin: "
                 "disagg, local)", "reason", decisions),
                ("dynamo_ext_router_migrations", "Running requests this router moved to another decode worker, by "
                 "kind: move (KV pulled), recompute (prompt + streamed tokens prefilled again), rebalance (a "
                 "planned move off an overloaded worker)", "kind", migrations)]
    else:
        fams = [("dynamo_ext_engine_prefill_prompt_tokens", "Prompt tokens this engine prefilled (its own counter)",
                 "", engine("prefill_prompt_tokens")),
                ("dynamo_ext_engine_prefill_cached_tokens", "Of those, tokens served from this engine's prefix cache "
                 "(prefix hit rate = rate(cached) / rate(prompt))", "", engine("prefill_cached_tokens")),
                ("dynamo_ext_engine_prefills", "Prefills this engine ran", "", engine("prefills")),
                ("dynamo_ext_engine_pull_prompt_tokens", "Prompt tokens of the KV handles this engine pulled",
                 "", engine("pull_prompt_tokens")),
                ("dynamo_ext_engine_pull_cached_tokens", "Of those, tokens found in this engine's own prefix cache "
                 "(not read: the prefix-aware pull's hits)", "", engine("pull_cached_tokens")),
                ("dynamo_ext_engine_pulls", "KV pulls of this engine", "", engine("pulls"))]
    c = CountersCollector(fams)
    registry.register(c)
    return c


def system_url(host: str, port: int, timeout: float = 1.0) -> str | None:
    """``http://host:port`` when Dynamo's system status server answers there (its ``/live`` JSON has
    ``uptime``), else None (the runtime logs why: e.g. the port was taken)."""
    h = f"[{host}]" if ":" in host else host
    url = f"http://{h}:{port}"
    try:
        with urllib.request.urlopen(f"{url}/live", timeout=timeout) as r:
            body = r.read()
    except urllib.error.HTTPError as e:  # 503 notready: it is there
        body = e.read()
    except Exception:  # noqa: BLE001
        return None
    try:
        return url if "uptime" in json.loads(body) else None
    except ValueError:
        return None


__all__ = ["MIGRATION_KEYS", "PREFIX", "SYSTEM_PORT_RANGE", "dynamo_labels", "export_metrics", "pick_system_port",
           "register_core_counters", "system_url"]
