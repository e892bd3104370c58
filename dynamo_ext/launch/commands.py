"""``dynamo-ext serve GRAPH -f CONFIG --print-commands``: the graph as plain shell lines, runnable by hand.

Protocol
--------
``print_commands(graph, config, ...)`` checks the config and the graph like ``serve`` (problems one per line,
exit 2), resolves the model directory like ``serve`` (``modeldir.ensure_model_dir``: generated, imported or
reused; progress on stderr) and prints to stdout, in start order:

1. the prerequisites: ``etcd`` and ``nats-server`` on the configured loopback addresses (``infra.etcd_argv`` /
   ``infra.nats_argv``, data under ``$TMPDIR/dynamo-ext-<namespace>-<etcd port>/``); a comment says when one
   already answers there, and a server on another host is only named;
2. the workers and routers of the graph, dependencies first (``graph.plan``), each
   ``env VAR=... python -m dynamo_ext.workers --role R ... &`` (``plan.worker_argv``; ``--metrics-port 0``:
   the worker picks a free port and prints it in its ``DYNAMO_EXT_READY ... metrics=<url>`` line);
3. the frontend (``plan.frontend_argv`` with ``plan.frontend_env``), ready when ``/v1/models`` lists
   ``model.name``.

Every line carries the same variables ``dynamo-ext serve`` gives its children (``plan.graph_env``: loopback
hosts, ``ETCD_ENDPOINTS``, ``NATS_SERVER``, ``DYN_EVENT_PLANE=nats``, ...; ``DYNAMO_EXT_DRAIN_S``), shell-quoted,
ending in `` &``; comment lines start with ``#``. What serve does around the processes is not printed: the
supervision (restarts), the readiness wait, the etcd record audit, and the planner's executor (with
``planner.enabled`` a comment says the counts stay fixed). Discovery with TLS or credentials is refused
(exit 2): the lines would carry secrets.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path
from typing import TextIO
from urllib.parse import urlparse

from dynamo_ext.config import ConfigError, DynamoExtConfig, load_config
from dynamo_ext.discovery.env import is_plain

from . import infra
from .graph import Graph, GraphError, load_graph
from .modeldir import ModelDirError, ensure_model_dir
from .plan import (assign_devices, drain_seconds, frontend_argv, frontend_base, frontend_env, graph_env,
                   worker_argv)  # fmt: skip


class CommandsError(Exception):
    def __init__(self, message: str, code: int = 2) -> None:
        self.code = code
        super().__init__(message)


def shell_line(env: dict[str, str], argv: list[str], background: bool = True) -> str:
    """``env K=V ... argv`` shell-quoted (``shlex.split`` gives back ``["env", "K=V", ..., *argv]``; no ``env``
    word without variables)."""
    words = (["env", *(f"{k}={v}" for k, v in env.items())] if env else []) + list(argv)
    return " ".join(shlex.quote(w) for w in words) + (" &" if background else "")


def load_checked(graph_spec: str, config_path: str) -> tuple[Graph, DynamoExtConfig]:
    """Config + graph, checked as ``dynamo-ext serve`` checks them; :class:`CommandsError` lists the problems."""
    try:
        config = load_config(config_path)
        graph = load_graph(graph_spec)
        graph.validate(config)
    except ConfigError as e:
        raise CommandsError(f"{e.source}: invalid config:\n" + "\n".join(f"  {line}" for line in e.lines)) from None
    except GraphError as e:
        raise CommandsError(f"{config_path} does not fit graph {e.graph!r}:\n"
                            + "\n".join(f"  {x}" for x in e.lines)) from None  # fmt: skip
    except (ImportError, OSError, SyntaxError) as e:
        raise CommandsError(f"cannot load graph {graph_spec!r}: {e}") from None
    return graph, config


def _server_lines(config: DynamoExtConfig, workdir: Path) -> list[str]:
    lines: list[str] = []
    etcd_url = config.discovery.etcd.endpoints[0]
    nats_url = config.discovery.nats.url
    for what, url, default_port in (("etcd", etcd_url, 2379), ("nats-server", nats_url, 4222)):
        u = urlparse(url)
        host, port = u.hostname or "127.0.0.1", u.port or default_port
        if host not in infra.LOOPBACK_HOSTS:
            lines.append(f"# {what}: the one at {url} (not on this host; start nothing here)")
            continue
        answering = infra.etcd_healthy(url) if what == "etcd" else infra.nats_answers(url)
        if answering:
            lines.append(f"# {what} already answers at {url}: skip the next line")
        exe = _which_or_name(what)
        if what == "etcd":
            argv = infra.etcd_argv(exe, host, port, workdir / "etcd-data", infra.free_port())
        else:
            argv = infra.nats_argv(exe, host, port, workdir / "jetstream")
        lines.append(shell_line({}, argv))
    return lines


def _which_or_name(name: str) -> str:
    try:
        return infra.which(name)
    except infra.InfraError:
        return name


def render_commands(graph: Graph, config: DynamoExtConfig, *, config_path: Path, model_dir: Path,
                    port: int | None = None, stop_timeout: float = 10.0, python: str = sys.executable,
                    gpu_count: int = 0, header: str = "") -> list[str]:  # fmt: skip
    """The lines (comments included) for ``graph`` under ``config``; :class:`CommandsError` for discovery with
    TLS or credentials, or a CUDA config without enough visible GPUs."""
    if not is_plain(config):
        raise CommandsError("discovery: --print-commands prints plain commands, but discovery.etcd / discovery.nats "
                            "use TLS or credentials (the lines would carry secrets and PEM text); run dynamo-ext "
                            "serve, which sets those variables itself")  # fmt: skip
    port = port or config.frontend.http_port
    host = config.frontend.http_host
    etcd_urls = ",".join(config.discovery.etcd.endpoints)
    env = graph_env(config, etcd_urls, config.discovery.nats.url)
    drain_s = drain_seconds(config, stop_timeout)
    env["DYNAMO_EXT_DRAIN_S"] = f"{drain_s:g}"
    planned = graph.plan(config)
    try:
        devices = assign_devices([(c.role, n) for c, n in planned], config, gpu_count)
    except ValueError as e:
        raise CommandsError(str(e)) from None
    etcd_port = urlparse(config.discovery.etcd.endpoints[0]).port or 2379
    workdir = Path(tempfile.gettempdir()) / f"dynamo-ext-{config.discovery.namespace}-{etcd_port}"
    lines = [f"# {header}" if header else "# dynamo-ext serve --print-commands",
             f"# {graph.describe(config)}",
             f"# model directory: {model_dir}",
             "# 1. prerequisites"]  # fmt: skip
    lines += _server_lines(config, workdir)
    lines.append("# 2. workers and routers (each prints 'DYNAMO_EXT_READY role=... instance_id=... metrics=...' "
                 "when it serves)")  # fmt: skip
    frontend: list[str] = []
    for comp, count in planned:
        for i in range(count):
            if comp.role == "frontend":
                argv = frontend_argv(config, python=python, host=host, port=port)
                frontend.append(shell_line(frontend_env(config, env), argv))
                continue
            argv = worker_argv(comp.role, python=python, config_path=config_path, model_dir=model_dir, index=i,
                               metrics_port=0, drain_s=drain_s, device=devices.get((comp.role, i)))
            lines.append(shell_line(env, argv))
    base = frontend_base(host, port)
    lines.append(f"# 3. frontend (ready when {base}/v1/models lists {config.model.name})")
    lines += frontend
    if config.planner.enabled and any(c.role == "decode" for c, _n in planned):
        lines.append("# planner.enabled: the planner's decisions are applied by dynamo-ext serve's executor, not by "
                     "these lines: worker counts stay as printed")  # fmt: skip
    lines.append(f"# try: curl -s {base}/v1/completions -H 'Content-Type: application/json' "
                 f"-d '{{\"model\": \"{config.model.name}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'")
    lines.append("# stop: SIGTERM in reverse order (kill %N ... kill %1): workers drain their in-flight requests "
                 f"for up to {drain_s:g} s and leave discovery")  # fmt: skip
    return lines


def print_commands(graph_spec: str, config_path: str, *, port: int | None = None, model_dir: str | None = None,
                   stop_timeout: float = 10.0, python: str = sys.executable, out: TextIO | None = None,
                   err: TextIO | None = None) -> int:  # fmt: skip
    """The CLI: 0 printed, 2 bad config / graph / model directory / discovery."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        graph, config = load_checked(graph_spec, config_path)
        gpu_count = 0
        if config.model.device == "cuda":
            from .serve import visible_gpu_count  # noqa: PLC0415 - torch only for CUDA configs

            gpu_count = visible_gpu_count()
        try:
            mdir, how = ensure_model_dir(config.model, model_dir,
                                         progress=lambda s: print(f"[serve] {s}", file=err, flush=True))
        except ModelDirError as e:
            raise CommandsError(str(e)) from None
        except (ImportError, OSError, ValueError) as e:
            raise CommandsError(f"cannot generate or import the model directory for preset "
                                f"{config.model.preset!r}: {e}") from None  # fmt: skip
        header = f"dynamo-ext serve {graph_spec} -f {config_path} --print-commands (model directory {how})"
        lines = render_commands(graph, config, config_path=Path(config_path).resolve(), model_dir=mdir, port=port,
                                stop_timeout=stop_timeout, python=python, gpu_count=gpu_count, header=header)
    except CommandsError as e:
        print(f"dynamo-ext serve: {e}", file=err, flush=True)
        return e.code
    print("\n".join(lines), file=out, flush=True)
    return 0


__all__ = ["CommandsError", "load_checked", "print_commands", "render_commands", "shell_line"]
