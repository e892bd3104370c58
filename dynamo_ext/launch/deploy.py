"""``dynamo-ext deploy render GRAPH -f CONFIG --image IMAGE``: a graph as Kubernetes manifests for Dynamo's operator.

Protocol
--------
``render(graph, config, config_text, image=..., name=..., namespace=None)`` returns ``[(file name, document)]``:

* ``configmap.yaml``: ConfigMap ``<name>-config`` with ``dynamo.yaml`` (the config file's text as given) and,
  with ``planner.enabled``, ``planner.yaml`` (``planner.local_config.planner_config`` with ``environment:
  kubernetes``); mounted read-only at ``/etc/dynamo-ext`` in every pod.
* ``dynamographdeployment.yaml``: a ``nvidia.com/v1beta1`` ``DynamoGraphDeployment`` named ``<name>`` whose
  ``spec.components`` are the graph's active components (``graph.plan``: prefill, decode | agg, router,
  frontend) plus, with ``planner.enabled``, ``planner``. Each component: ``name`` (the graph's component
  name), ``type`` (frontend -> ``frontend``; prefill / decode -> ``prefill`` / ``decode``, the types Dynamo's
  planner scales; agg and router -> ``worker``; planner -> ``planner``), ``replicas`` (the count the graph
  takes from the config: ``workers.<role>.count``, ``router.replicas``, 1), ``runtimeVersionOverride``
  (:data:`DYNAMO_VERSION`: our image's tag is not Dynamo's version), and a ``podTemplate`` whose container
  ``main`` runs the command ``dynamo-ext serve`` runs (``plan.worker_argv`` / ``plan.frontend_argv``,
  ``planner.executor.PlannerProcess.argv``) with ``python3``, the mounted config and the model link:

  - env: ``plan.graph_env`` without the loopback hosts (etcd/NATS from ``discovery``, ``DYN_EVENT_PLANE=nats``,
    ``ETCD_LEASE_TTL``, ...), ``DYN_NAMESPACE`` = ``discovery.namespace``, ``DYN_DISCOVERY_BACKEND=etcd``,
    ``DYN_REQUEST_PLANE=tcp``, Dynamo's listeners on the pod IP (``DYN_TCP_RPC_HOST``,
    ``DYN_TCP_RESPONSE_STREAM_HOST``, ``DYN_EVENT_PLANE_HOST`` = ``$(POD_IP)``), ``DYNAMO_EXT_DRAIN_S``; the
    frontend also ``plan.frontend_env``'s limits;
  - ports and probes with the names of Dynamo's operator: workers, routers and the planner serve Dynamo's system
    server on ``system`` (``DYN_SYSTEM_PORT`` = :data:`SYSTEM_PORT`, ``DYN_SYSTEM_HOST=0.0.0.0``; liveness
    ``/live``, readiness ``/health``, a startup probe on ``/live``); the frontend listens on
    ``0.0.0.0:<frontend.http_port>`` named ``http`` (liveness ``/live``, readiness ``/health``);
  - GPUs: ``nvidia.com/gpu`` = ``workers.<role>.tensor_parallel`` for engine workers under ``model.device:
    cuda`` (none on CPU, none for routers and the frontend);
  - the model (not in the planner pod): an init container ``model`` runs ``python -m
    dynamo_ext.launch.prepare_model`` (the same ``ensure_model_dir`` as ``serve``) into an ``emptyDir`` at
    ``/var/lib/dynamo-ext`` and links ``/var/lib/dynamo-ext/model``, the ``--model-dir`` of the main container;
  - the image: ``--image``; the planner pod ``--planner-image`` (deploy/Dockerfile's ``planner`` target, on
    Dynamo's planner image), default ``--image``;
  - non-root (uid/gid 1000, the image's user), ``terminationGracePeriodSeconds`` = drain + 10 s, pod labels
    ``app.kubernetes.io/{name,instance,component,part-of}``, annotation ``dynamo-ext/config-sha256`` (a config
    change rolls the pods).
* ``podmonitor.yaml``: a ``monitoring.coreos.com/v1`` ``PodMonitor`` ``<name>`` scraping ``/metrics`` on the
  ports ``http`` (frontend) and ``system`` (workers, routers, planner) of the pods labelled with ``<name>``.

Refused (:class:`DeployError`, one line per problem naming the key and what is allowed): what ``serve`` refuses
(config, graph), loopback etcd/NATS endpoints or frontend host (pods cannot share a loopback), discovery with
TLS or credentials (not rendered yet), ``workers.<role>.gpu_ids`` (the device plugin assigns GPUs),
``supervision`` (the kubelet restarts containers), ``kv_transfer.backend: fallback`` in a disaggregated graph
(its cma/tcp paths are loopback only), a forced same-host ``kv_transfer.transport`` (nvlink, pcie, shm) in a
disaggregated graph, ``planner.enabled`` without a decode component, an image without a
pinned tag or digest (or ``:latest``), a name that is not a DNS label.

``to_yaml(docs)`` is the multi-document YAML of ``render``; ``write_dir(docs, out)`` writes one file per document
plus a ``kustomization.yaml`` listing them (a kustomize base).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from dynamo_ext.config import DynamoExtConfig
from dynamo_ext.discovery.env import is_plain

from .graph import Graph
from .infra import LOOPBACK_HOSTS
from .plan import drain_seconds, frontend_argv, frontend_env, graph_env, worker_argv

API_VERSION = "nvidia.com/v1beta1"
KIND = "DynamoGraphDeployment"
#: the Dynamo release our workers are built against (pyproject: ai-dynamo-runtime==1.6.1; deploy/Dockerfile's base)
DYNAMO_VERSION = "1.6.1"
PYTHON = "python3"
CONFIG_DIR = "/etc/dynamo-ext"
MODEL_ROOT = "/var/lib/dynamo-ext"
MODEL_LINK = f"{MODEL_ROOT}/model"
#: Dynamo's operator: workers' system server on 9090 named "system", the frontend's HTTP port named "http"
SYSTEM_PORT = 9090
SYSTEM_PORT_NAME = "system"
HTTP_PORT_NAME = "http"
FRONTEND_SERVICE_PORT = 8000  # the operator's Service port for a frontend component (target: the "http" port)
RUN_AS = 1000  # the image's user (deploy/Dockerfile)
COMPONENT_TYPES = {"frontend": "frontend", "prefill": "prefill", "decode": "decode", "agg": "worker",
                   "router": "worker", "planner": "planner"}  # fmt: skip
ENGINE_ROLES = ("prefill", "decode", "agg")
SAME_HOST_TRANSPORTS = ("nvlink", "pcie", "shm")  # kv_transfer.transport values that only work within one host
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$")


class DeployError(Exception):
    """The config, graph or options cannot be rendered; ``lines`` names each problem."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("; ".join(lines))


def check_image(image: str) -> list[str]:
    ref = image.rsplit("/", 1)[-1]
    if "@sha256:" in image:
        return []
    if ":" not in ref:
        return [f"--image {image}: no tag; pin a tag or a digest (for example {image}:0.1.0)"]
    if ref.endswith(":latest"):
        return [f"--image {image}: 'latest' is not a pinned tag; use a version tag or a digest"]
    return []


def problems(graph: Graph, config: DynamoExtConfig, *, image: str, name: str) -> list[str]:
    """What keeps ``config`` (already valid for ``graph``) from running as pods; empty when it can."""
    out = check_image(image)
    if not _DNS_LABEL.match(name):
        out.append(f"--name {name!r}: a DNS label of at most 40 characters (a-z, 0-9, '-'; the operator appends "
                   "component names)")
    d = config.discovery
    for key, url in [*((f"discovery.etcd.endpoints[{i}]", u) for i, u in enumerate(d.etcd.endpoints)),
                     ("discovery.nats.url", d.nats.url)]:  # fmt: skip
        if (urlparse(url).hostname or "") in LOOPBACK_HOSTS:
            out.append(f"{key}: {url} is a loopback address, which pods cannot share; use the cluster's service "
                       "(Dynamo's platform chart: http://dynamo-platform-etcd.dynamo-system:2379, "
                       "nats://dynamo-platform-nats.dynamo-system:4222; deploy/k8s/configs/)")
    if config.frontend.http_host in (*LOOPBACK_HOSTS, ""):
        out.append(f"frontend.http_host: {config.frontend.http_host!r} listens on the pod's loopback only; use "
                   "0.0.0.0 (the operator's Service targets the pod IP)")
    if not is_plain(config):
        out.append("discovery: TLS or credentials are not rendered yet (etcd tls/username, nats tls/token_env); "
                   "use plain discovery inside the cluster network, or add the Secret mounts by a kustomize patch")
    for role in ENGINE_ROLES:
        pool = getattr(config.workers, role)
        if pool is not None and pool.gpu_ids is not None:
            out.append(f"workers.{role}.gpu_ids: Kubernetes' device plugin assigns GPUs to pods (each pod sees its "
                       "own as cuda:0); remove the key")
    if "supervision" in config.model_fields_set:
        out.append("supervision: applies to dynamo-ext serve; on Kubernetes the kubelet restarts containers "
                   "(restartPolicy Always, liveness probe on /live); remove the section")
    roles = {c.role for c, _n in graph.plan(config)}
    if config.kv_transfer.backend == "fallback" and {"prefill", "decode"} <= roles:
        out.append("kv_transfer.backend: 'fallback' moves KV over loopback only (its cma and tcp paths bind "
                   "127.0.0.1), and prefill and decode run in different pods; use nixl")
    if config.kv_transfer.transport in SAME_HOST_TRANSPORTS and {"prefill", "decode"} <= roles:
        out.append(f"kv_transfer.transport: {config.kv_transfer.transport!r} forces a same-host path, and nothing "
                   "places the prefill and decode pods on one node; use auto (picked per pair), rdma or tcp")
    if config.planner.enabled and "decode" not in roles:
        out.append(f"planner.enabled: graph {graph.name!r} has no decode component to scale (use graphs/disagg.py, "
                   "or set planner.enabled: false)")
    return out


def _k8s_env(env: dict[str, str]) -> list[dict[str, Any]]:
    return [{"name": k, "value": v} for k, v in env.items()]


def _labels(name: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "dynamo-ext", "app.kubernetes.io/instance": name,
            "app.kubernetes.io/component": component, "app.kubernetes.io/part-of": "dynamo-ext"}  # fmt: skip


def _probe(path: str, port: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "timeoutSeconds": 4,
            "failureThreshold": failures}  # fmt: skip


def _probes(port: str) -> dict[str, Any]:
    return {"startupProbe": _probe("/live", port, 5, 120),  # up to 10 min: engine load, registration
            "livenessProbe": _probe("/live", port, 10, 3),
            "readinessProbe": _probe("/health", port, 5, 3)}  # fmt: skip


def _pod_env(config: DynamoExtConfig, drain_s: float, system_port: bool) -> dict[str, str]:
    """The variables of a graph process in a pod (the local graph_env without the loopback hosts)."""
    env = {"DYN_NAMESPACE": config.discovery.namespace, "DYN_DISCOVERY_BACKEND": "etcd", "DYN_REQUEST_PLANE": "tcp"}
    env.update(graph_env(config, ",".join(config.discovery.etcd.endpoints), config.discovery.nats.url,
                         loopback=False))  # fmt: skip
    for k in ("DYN_TCP_RPC_HOST", "DYN_TCP_RESPONSE_STREAM_HOST", "DYN_EVENT_PLANE_HOST"):
        env[k] = "$(POD_IP)"
    if system_port:
        env.update({"DYN_SYSTEM_HOST": "0.0.0.0", "DYN_SYSTEM_PORT": str(SYSTEM_PORT)})
    env["DYNAMO_EXT_DRAIN_S"] = f"{drain_s:g}"
    return env


def _pod_template(*, name: str, component: str, image: str, argv: list[str], env: dict[str, str],
                  port_name: str, port: int, gpus: int, config_hash: str, grace_s: int,
                  model: bool = True) -> dict[str, Any]:  # fmt: skip
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]
    if model:
        mounts.append({"name": "model", "mountPath": MODEL_ROOT})
    main: dict[str, Any] = {
        "name": "main",
        "image": image,
        "command": argv[:3],
        "args": argv[3:],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}, *_k8s_env(env)],
        "ports": [{"name": port_name, "containerPort": port, "protocol": "TCP"}],
        **_probes(port_name),
        "volumeMounts": mounts,
    }
    if gpus:
        main["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    init = {
        "name": "model",
        "image": image,
        "command": [PYTHON, "-m", "dynamo_ext.launch.prepare_model"],
        "args": ["--config", f"{CONFIG_DIR}/dynamo.yaml", "--link", MODEL_LINK],
        "env": _k8s_env({"DYNAMO_EXT_CACHE": f"{MODEL_ROOT}/cache", "HF_HUB_OFFLINE": "1"}),
        "volumeMounts": mounts,
    }
    spec: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS},
        "terminationGracePeriodSeconds": grace_s,
    }
    if model:
        spec["initContainers"] = [init]
    spec["containers"] = [main]
    spec["volumes"] = [{"name": "config", "configMap": {"name": f"{name}-config"}}]
    if model:
        spec["volumes"].append({"name": "model", "emptyDir": {}})
    return {"metadata": {"labels": _labels(name, component), "annotations": {"dynamo-ext/config-sha256": config_hash}},
            "spec": spec}


def render(graph: Graph, config: DynamoExtConfig, config_text: str, *, image: str, name: str,
           namespace: str | None = None, source: str = "", planner_image: str | None = None,
           ) -> list[tuple[str, dict[str, Any]]]:  # fmt: skip
    """The documents of a deployment (the planner pod runs ``planner_image``, default ``image``);
    :class:`DeployError` lists what cannot be rendered."""
    bad = problems(graph, config, image=image, name=name)
    if planner_image is not None:
        bad += [line.replace("--image", "--planner-image") for line in check_image(planner_image)]
        if not config.planner.enabled:
            bad.append("--planner-image: planner.enabled is false in the config: no planner pod to run it")
    if bad:
        raise DeployError(bad)
    config_hash = hashlib.sha256(config_text.encode()).hexdigest()[:16]
    drain_s = config.workers.drain_s
    grace_s = int(drain_s + 10.5)
    drain_s = drain_seconds(config, grace_s)
    meta = {"namespace": namespace} if namespace else {}
    components: list[dict[str, Any]] = []
    common = {"name": name, "image": image, "config_hash": config_hash, "grace_s": grace_s}
    for comp, count in graph.plan(config):
        if comp.role == "frontend":
            port = config.frontend.http_port
            argv = frontend_argv(config, python=PYTHON, host="0.0.0.0", port=port)
            env = frontend_env(config, _pod_env(config, drain_s, system_port=False))
            pod = _pod_template(component=comp.name, argv=argv, env=env, port_name=HTTP_PORT_NAME, port=port, gpus=0,
                                **common)  # fmt: skip
        else:
            argv = worker_argv(comp.role, python=PYTHON, config_path=f"{CONFIG_DIR}/dynamo.yaml",
                               model_dir=MODEL_LINK, index=0, metrics_port=0, drain_s=drain_s)  # fmt: skip
            pool = getattr(config.workers, comp.role, None) if comp.role in ENGINE_ROLES else None
            gpus = pool.tensor_parallel if pool is not None and config.model.device == "cuda" else 0
            pod = _pod_template(component=comp.name, argv=argv, env=_pod_env(config, drain_s, system_port=True),
                                port_name=SYSTEM_PORT_NAME, port=SYSTEM_PORT, gpus=gpus, **common)  # fmt: skip
        components.append({"name": comp.name, "type": COMPONENT_TYPES[comp.role], "replicas": count,
                           "runtimeVersionOverride": DYNAMO_VERSION, "podTemplate": pod})  # fmt: skip
    data = {"dynamo.yaml": config_text}
    if config.planner.enabled:
        from planner.executor import PlannerProcess  # noqa: PLC0415 - only for planner configs
        from planner.local_config import planner_config  # noqa: PLC0415

        frontend = next(c.name for c, _n in graph.plan(config) if c.role == "frontend")
        metrics = f"http://{name}-{frontend}:{FRONTEND_SERVICE_PORT}/metrics"  # the operator's Service name
        pcfg = {**planner_config(config, [metrics]), "environment": "kubernetes"}
        data["planner.yaml"] = yaml.safe_dump(pcfg, sort_keys=False)
        argv = PlannerProcess(Path(f"{CONFIG_DIR}/planner.yaml"), config.discovery.namespace, python=PYTHON).argv()
        pod = _pod_template(component="planner", argv=argv, env=_pod_env(config, drain_s, system_port=True),
                            port_name=SYSTEM_PORT_NAME, port=SYSTEM_PORT, gpus=0, model=False,
                            **{**common, "image": planner_image or image})  # fmt: skip
        components.append({"name": "planner", "type": "planner", "replicas": 1,
                           "runtimeVersionOverride": DYNAMO_VERSION, "podTemplate": pod})  # fmt: skip
    labels = {"app.kubernetes.io/name": "dynamo-ext", "app.kubernetes.io/instance": name,
              "app.kubernetes.io/part-of": "dynamo-ext"}  # fmt: skip
    annotations = {"dynamo-ext/graph": graph.name, "dynamo-ext/dynamo-version": DYNAMO_VERSION}
    if source:
        annotations["dynamo-ext/rendered-from"] = source
    cm = {"apiVersion": "v1", "kind": "ConfigMap",
          "metadata": {"name": f"{name}-config", **meta, "labels": labels}, "data": data}  # fmt: skip
    dgd = {"apiVersion": API_VERSION, "kind": KIND,
           "metadata": {"name": name, **meta, "labels": labels, "annotations": annotations},
           "spec": {"components": components}}  # fmt: skip
    pm = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
          "metadata": {"name": name, **meta, "labels": labels},
          "spec": {"selector": {"matchLabels": {"app.kubernetes.io/instance": name,
                                                "app.kubernetes.io/part-of": "dynamo-ext"}},
                   "podMetricsEndpoints": [{"port": HTTP_PORT_NAME, "path": "/metrics", "interval": "15s"},
                                           {"port": SYSTEM_PORT_NAME, "path": "/metrics", "interval": "15s"}]}}  # fmt: skip
    return [("configmap.yaml", cm), ("dynamographdeployment.yaml", dgd), ("podmonitor.yaml", pm)]


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # every value written out in full (no &id001 / *id001)
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(doc: dict[str, Any]) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120, allow_unicode=True)


def to_yaml(docs: list[tuple[str, dict[str, Any]]], header: str = "") -> str:
    head = "".join(f"# {line}\n" for line in header.splitlines())
    return head + "---\n".join(dump(d) for _f, d in docs)


def write_dir(docs: list[tuple[str, dict[str, Any]]], out: Path, header: str = "") -> list[Path]:
    """One file per document plus ``kustomization.yaml``; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    head = "".join(f"# {line}\n" for line in header.splitlines())
    written = []
    for fname, doc in docs:
        (out / fname).write_text(head + dump(doc))
        written.append(out / fname)
    kust = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [f for f, _d in docs]}  # fmt: skip
    (out / "kustomization.yaml").write_text(head + dump(kust))
    written.append(out / "kustomization.yaml")
    return written
