"""Graph + config -> the child processes of a launch (argv, environment, readiness), in start order.

Protocol
--------
* ``child_env(config, etcd_url, nats_url)``: the caller's environment plus what every Dynamo process
  needs on one host. Always set: every listener on loopback (:data:`LOOPBACK_ENV`: Dynamo's TCP request
  plane ``DYN_TCP_RPC_HOST``, its TCP response stream ``DYN_TCP_RESPONSE_STREAM_HOST``, its event plane
  ``DYN_EVENT_PLANE_HOST``, its system/metrics server ``DYN_SYSTEM_HOST``, UCX (NIXL)
  ``UCX_NET_DEVICES=lo``; our metrics server and TCP transport bind 127.0.0.1 themselves),
  ``DYN_EVENT_PLANE=nats``, ``ETCD_ENDPOINTS``, ``NATS_SERVER``, ``PYTHONUNBUFFERED=1`` (readiness lines
  reach the log at once), and the TLS / credential variables of ``discovery.*`` from
  :func:`dynamo_ext.discovery.env.dynamo_env` (inherited ones are dropped first: the config decides).
  Unless already set: ``HF_HUB_OFFLINE=1``, ``ETCD_LEASE_TTL=<discovery.etcd.lease_ttl_s>``. A secret or
  file that cannot be read raises :class:`~dynamo_ext.launch.infra.InfraError` (one line naming the key).
* ``plan_processes(graph, config, ...)``: for each active component (``Graph.plan``, dependencies
  first) and each index ``0..count-1`` one :class:`ChildSpec` named ``<component>-<index>``:
  - workers and routers: ``python -m dynamo_ext.workers --role R --config FILE --model-dir DIR
    --index N --metrics-port P --drain-s D [--device cuda:G]`` (a free port each; D = the stop timeout
    - 3 s when that is shorter than ``workers.drain_s``, so a worker's drain ends before our SIGKILL),
    ready on ``DYNAMO_EXT_READY``;
* ``assign_devices(plan, config, gpu_count)``: with ``model.device: cuda`` each engine worker gets one
  CUDA device: ``workers.<role>.gpu_ids`` in turn when given, else the ``gpu_count`` visible GPUs handed
  to the engine workers of all roles in start order, in turn (several workers share a GPU when there are
  fewer GPUs than workers). Routers and the frontend get none.
  - frontend: ``python -m dynamo.frontend --http-host H --http-port P --router-mode kv|round-robin
    --namespace NS`` (``kv`` under ``router.policy: dynamo-kv``, else it round-robins over our router
    replicas), ready when ``/v1/models`` lists ``model.name``; ``DYN_HTTP_BODY_LIMIT_MB`` from
    ``frontend.max_request_mb`` and ``DYN_MIGRATION_LIMIT`` from ``frontend.migration_limit`` (``frontend_env``).
* The command builders are the one source of every component's command line: ``worker_argv`` (workers and
  routers), ``frontend_argv``, ``drain_seconds``, and ``graph_env`` (the variables a graph adds, without the
  inherited environment). ``plan_processes`` (``dynamo-ext serve``), ``commands.py`` (``serve
  --print-commands``) and ``deploy.py`` (``deploy render``, the Kubernetes pods) all build from them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dynamo_ext.config import DynamoExtConfig
from dynamo_ext.discovery.env import FOREIGN_AUTH_KEYS, SECURITY_ENV_KEYS, DiscoverySettingError, dynamo_env

from .client import list_models
from .graph import Graph
from .infra import InfraError, free_port
from .supervisor import Child, ChildSpec, ReadyCheck, ready_line

READY_PREFIX = "DYNAMO_EXT_READY"


#: every host/bind variable of Dynamo 1.6.1's runtime (``strings dynamo/_core.abi3.so | grep -E '^DYN_|_HOST'``)
#: and UCX's network devices: a local graph listens on loopback only (tests/launch/test_loopback.py)
LOOPBACK_ENV = {
    "DYN_TCP_RPC_HOST": "127.0.0.1", "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
    "DYN_EVENT_PLANE_HOST": "127.0.0.1", "DYN_SYSTEM_HOST": "127.0.0.1", "UCX_NET_DEVICES": "lo",
}  # fmt: skip


#: set by graph_env unless the caller's environment already has them (child_env keeps an inherited value)
ENV_DEFAULTS = ("HF_HUB_OFFLINE", "ETCD_LEASE_TTL")


def graph_env(config: DynamoExtConfig, etcd_url: str, nats_url: str, *, loopback: bool = True) -> dict[str, str]:
    """The variables every process of a graph gets (discovery addresses, event plane, unbuffered output, offline
    hub, lease TTL; with ``loopback`` every listener on 127.0.0.1, :data:`LOOPBACK_ENV`), without the inherited
    environment and without TLS / credential variables."""
    env = dict(LOOPBACK_ENV) if loopback else {}
    env.update({"DYN_EVENT_PLANE": "nats", "ETCD_ENDPOINTS": etcd_url, "NATS_SERVER": nats_url,
                "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                "ETCD_LEASE_TTL": str(config.discovery.etcd.lease_ttl_s)})  # fmt: skip
    return env


def child_env(
    config: DynamoExtConfig, etcd_url: str, nats_url: str, base: dict[str, str] | None = None
) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for k in (*SECURITY_ENV_KEYS, *FOREIGN_AUTH_KEYS):
        env.pop(k, None)
    try:
        discovery = dynamo_env(config, env)
    except DiscoverySettingError as e:
        raise InfraError(str(e)) from None
    env.update({k: v for k, v in discovery.items() if k in SECURITY_ENV_KEYS})
    for k, v in graph_env(config, etcd_url, nats_url).items():
        if k in ENV_DEFAULTS:
            env.setdefault(k, v)
        else:
            env[k] = v
    return env


def frontend_base(host: str, port: int) -> str:
    client_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{client_host}:{port}"


def model_listed(base: str, model: str) -> ReadyCheck:
    def check(_child: Child) -> bool:
        return model in list_models(base, timeout=0.5)

    return check


ENGINE_ROLES = ("prefill", "decode", "agg")


def assign_devices(plan: list[tuple[str, int]], config: DynamoExtConfig, gpu_count: int) -> dict[tuple[str, int], str]:
    """``{(role, index): "cuda:N"}`` for the engine workers of ``plan`` ([(role, count)] in start order); empty
    on CPU. ValueError when a configured gpu id is not visible or no GPU is."""
    if config.model.device != "cuda":
        return {}
    if gpu_count < 1:
        raise ValueError("model.device is 'cuda' but no CUDA device is visible here")
    out: dict[tuple[str, int], str] = {}
    shared = 0
    for role, count in plan:
        if role not in ENGINE_ROLES:
            continue
        ids = getattr(config.workers, role).gpu_ids if getattr(config.workers, role, None) else None
        for i in range(count):
            if ids:
                g = ids[i % len(ids)]
                if g >= gpu_count:
                    raise ValueError(f"workers.{role}.gpu_ids: GPU {g} is not visible ({gpu_count} visible: "
                                     f"0..{gpu_count - 1})")
            else:
                g, shared = shared % gpu_count, shared + 1
            out[(role, i)] = f"cuda:{g}"
    return out


def worker_argv(role: str, *, python: str, config_path: str | Path, model_dir: str | Path, index: int,
                metrics_port: int, drain_s: float, device: str | None = None) -> list[str]:
    """A worker's or router's command line (``python -m dynamo_ext.workers``, workers/__main__.py)."""
    argv = [python, "-m", "dynamo_ext.workers", "--role", role, "--config", str(config_path),
            "--model-dir", str(model_dir), "--index", str(index), "--metrics-port", str(metrics_port),
            "--drain-s", f"{drain_s:g}"]  # fmt: skip
    if device is not None:
        argv += ["--device", device]
    return argv


def frontend_argv(config: DynamoExtConfig, *, python: str, host: str, port: int) -> list[str]:
    """Dynamo's frontend: ``--router-mode kv`` under ``router.policy: dynamo-kv`` (it routes to the workers
    itself), else ``round-robin`` over our router replicas."""
    mode = "kv" if config.router.policy == "dynamo-kv" else "round-robin"
    return [python, "-m", "dynamo.frontend", "--http-host", host, "--http-port", str(port),
            "--router-mode", mode, "--namespace", config.discovery.namespace]  # fmt: skip


def drain_seconds(config: DynamoExtConfig, stop_timeout: float) -> float:
    """How long a stopping worker drains: ``workers.drain_s``, cut to the stop timeout - 3 s (at least 1 s) so
    that the drain ends before the launcher's SIGKILL."""
    return min(config.workers.drain_s, max(1.0, stop_timeout - 3.0))


def frontend_env(config: DynamoExtConfig, env: dict[str, str]) -> dict[str, str]:
    """The frontend's environment: the graph's, plus its request body limit (``frontend.max_request_mb``) and
    stream migration limit (``frontend.migration_limit``)."""
    return {**env, "DYN_HTTP_BODY_LIMIT_MB": str(config.frontend.max_request_mb),
            "DYN_MIGRATION_LIMIT": str(config.frontend.migration_limit)}


def plan_processes(
    graph: Graph, config: DynamoExtConfig, *, config_path: Path, model_dir: Path, port: int, env: dict[str, str],
    python: str = sys.executable, tolerate_exits: bool = False, stop_timeout: float = 10.0, gpu_count: int = 0,
) -> list[ChildSpec]:  # fmt: skip
    specs: list[ChildSpec] = []
    host = config.frontend.http_host
    planned = graph.plan(config)
    devices = assign_devices([(c.role, n) for c, n in planned], config, gpu_count)
    drain_s = drain_seconds(config, stop_timeout)
    for comp, count in planned:
        for i in range(count):
            name = f"{comp.name}-{i}" if count > 1 or comp.role != "frontend" else comp.name
            if comp.role == "frontend":
                argv = frontend_argv(config, python=python, host=host, port=port)
                ready = model_listed(frontend_base(host, port), config.model.name)
                specs.append(ChildSpec(name, argv, frontend_env(config, env), component=comp.name, ready=ready,
                                       stop_timeout=stop_timeout))  # fmt: skip
                continue
            argv = worker_argv(comp.role, python=python, config_path=config_path, model_dir=model_dir, index=i,
                               metrics_port=free_port(), drain_s=drain_s, device=devices.get((comp.role, i)))
            specs.append(ChildSpec(name, argv, env, component=comp.name, ready=ready_line(READY_PREFIX),
                                   tolerate_exit=tolerate_exits, stop_timeout=stop_timeout))  # fmt: skip
    return specs
