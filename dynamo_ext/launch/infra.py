"""etcd and NATS for a local launch: reuse what answers, start what is absent, audit records afterwards.

Protocol
--------
* ``etcd_healthy(url)``: ``GET <url>/health`` answers ``"health":"true"``. ``nats_answers(url)``: a TCP
  connect to the NATS port receives the server's ``INFO {...}`` greeting within 1 s.
* ``ensure_etcd(urls, workdir)`` / ``ensure_nats(url, workdir)`` return a :class:`ServerPlan`:
  ``reused`` (something already answers at the configured address; it is never stopped), or a
  :class:`~dynamo_ext.launch.supervisor.ChildSpec` that starts ``etcd`` / ``nats-server`` on that exact
  loopback address with its data under ``workdir``, ready when the probe answers. An address that is not
  loopback and does not answer raises :class:`InfraError` (we only start servers for this host). Their
  command lines come from ``etcd_argv`` / ``nats_argv`` (also printed by ``serve --print-commands``).
* Records audit through etcd's v3 JSON gateway (no gRPC client needed): ``etcd_keys(url, prefix)``
  lists keys under a prefix; ``stale_records(url, namespace, instance_ids)`` lists the keys under
  :data:`WORKER_PREFIXES` that belong to the given instances (Dynamo names them by the lease id in hex,
  our worker records by the decimal instance id; instance id == lease id); ``revoke_lease(url, id)``
  drops a lease and every key on it.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import shutil
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from dynamo_ext.discovery.env import etcd_is_plain, nats_is_plain
from dynamo_ext.discovery.probe import check_etcd, check_nats

from .supervisor import ChildSpec

# where the records of a namespace's processes live (Dynamo's instances and model cards, ours)
WORKER_PREFIXES = ("v1/instances/{ns}/", "v1/mdc/{ns}/", "dynamo_ext/v1/workers/{ns}/")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class InfraError(Exception):
    pass


@dataclass
class ServerPlan:
    name: str
    url: str
    reused: bool
    spec: ChildSpec | None = None


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    u = urlparse(url)
    return u.hostname or "127.0.0.1", u.port or default_port


def etcd_healthy(url: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as r:
            return b'"health":"true"' in r.read()
    except (OSError, ValueError):
        return False


def nats_answers(url: str, timeout: float = 1.0) -> bool:
    host, port = _host_port(url, 4222)
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(5).startswith(b"INFO")
    except OSError:
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        # like the servers themselves: TIME_WAIT leftovers of a previous run do not make a port busy
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


_HANDED_OUT: "collections.deque[int]" = collections.deque(maxlen=1024)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, never one this process handed out recently: the kernel may give the same
    ephemeral port to two binds in a row once the first socket is closed, and two ports picked for one server
    (etcd's client and peer ports) were once the same ("bind: address already in use", a CI run)."""
    for _ in range(64):
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            break
    _HANDED_OUT.append(port)
    return port


def which(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        raise InfraError(f"`{name}` not found on PATH: install it (scripts/bootstrap.sh installs etcd and nats-server)")
    return path


def _check_startable(what: str, url: str, host: str, port: int) -> None:
    if host not in LOOPBACK_HOSTS:
        raise InfraError(f"{what} at {url} does not answer, and it is not a loopback address we could start it on")
    if not _port_free("127.0.0.1" if host == "localhost" else host, port):
        raise InfraError(f"{what} at {url} does not answer, but port {port} is taken by something else")


def _secure(what: str, url: str, discovery: Any, plain: Callable[[Any], bool], check: Callable[[Any], list[str]]
            ) -> ServerPlan | None:
    """A config with TLS or credentials: never start a server, use the configured one if it accepts us."""
    if discovery is None or plain(discovery):
        return None
    problems = check(discovery)
    if problems:
        raise InfraError(problems[0])
    return ServerPlan(what, url, reused=True)


def ensure_etcd(urls: list[str], workdir: Path, env: dict[str, str], discovery: Any = None) -> ServerPlan:
    secure = _secure("etcd", urls[0], discovery, etcd_is_plain, check_etcd)
    if secure is not None:
        return secure
    for url in urls:
        if etcd_healthy(url):
            return ServerPlan("etcd", url, reused=True)
    url = urls[0]
    host, port = _host_port(url, 2379)
    _check_startable("etcd", url, host, port)
    argv = etcd_argv(which("etcd"), host, port, workdir / "etcd-data", free_port())
    client = f"http://{host}:{port}"
    spec = ChildSpec("etcd", argv, env, ready=lambda _c: etcd_healthy(client), stop_timeout=5.0)
    return ServerPlan("etcd", client, reused=False, spec=spec)


def etcd_argv(etcd: str, host: str, port: int, data_dir: Path, peer_port: int) -> list[str]:
    """A one-member etcd serving clients on ``http://host:port`` (peers on loopback)."""
    client, peer = f"http://{host}:{port}", f"http://127.0.0.1:{peer_port}"
    return [
        etcd, "--name", "dynamo-ext", "--data-dir", str(data_dir),
        "--listen-client-urls", client, "--advertise-client-urls", client,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"dynamo-ext={peer}", "--log-level", "warn",
    ]  # fmt: skip


def nats_argv(nats_server: str, host: str, port: int, store_dir: Path) -> list[str]:
    """nats-server with JetStream (Dynamo's event plane and object store need it)."""
    return [nats_server, "-a", host, "-p", str(port), "-js", "-sd", str(store_dir)]


def ensure_nats(url: str, workdir: Path, env: dict[str, str], discovery: Any = None) -> ServerPlan:
    secure = _secure("nats", url, discovery, nats_is_plain, check_nats)
    if secure is not None:
        return secure
    if nats_answers(url):
        return ServerPlan("nats", url, reused=True)
    host, port = _host_port(url, 4222)
    _check_startable("nats-server", url, host, port)
    argv = nats_argv(which("nats-server"), host, port, workdir / "jetstream")
    spec = ChildSpec("nats", argv, env, ready=lambda _c: nats_answers(url), stop_timeout=5.0)
    return ServerPlan("nats", url, reused=False, spec=spec)


# -- etcd JSON gateway ---------------------------------------------------------------------


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _prefix_end(prefix: str) -> bytes:
    b = bytearray(prefix.encode())
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"


def _gateway(url: str, path: str, body: dict[str, object], timeout: float = 3.0) -> dict[str, object]:
    req = urllib.request.Request(
        f"{url.rstrip('/')}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return dict(json.loads(r.read() or b"{}"))


def etcd_keys(url: str, prefix: str) -> list[tuple[str, int]]:
    """``(key, lease id)`` for every key under ``prefix``."""
    resp = _gateway(url, "/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix))})
    out = []
    for kv in resp.get("kvs", []) or []:  # type: ignore[union-attr]
        out.append((base64.b64decode(kv["key"]).decode(errors="replace"), int(kv.get("lease", 0) or 0)))
    return out


def revoke_lease(url: str, lease_id: int) -> bool:
    try:
        _gateway(url, "/v3/lease/revoke", {"ID": str(lease_id)})
        return True
    except urllib.error.HTTPError:  # already gone
        return False


def stale_records(url: str, namespace: str, instance_ids: set[int]) -> list[tuple[str, int]]:
    """Keys under the worker prefixes that belong to ``instance_ids`` (by lease, hex or decimal name)."""
    names = {f"{i:x}" for i in instance_ids} | {str(i) for i in instance_ids}
    found = []
    for p in WORKER_PREFIXES:
        for key, lease in etcd_keys(url, p.format(ns=namespace)):
            if lease in instance_ids or any(part in names for part in key.split("/")):
                found.append((key, lease))
    return found
