"""Can the configured etcd and NATS be used with the configured TLS and credentials? One line per problem,
naming the setting to fix, before any process tries (Dynamo's runtime would retry for
``ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS`` and then fail with a traceback).

Protocol
--------
* ``check_discovery(config, environ=None, timeout=3.0) -> list[str]``: ``config`` is a ``DynamoExtConfig``
  or its ``discovery`` section; ``[]`` when etcd and NATS both accept us. Synchronous, standard library
  only (``socket``, ``ssl``, ``urllib``); at most a few round trips per server.
* ``check_etcd(...)`` / ``check_nats(...)``: one server each. The lines start with the key to change:

  - ``discovery.etcd.endpoints: https://h:p does not answer (...)``
  - ``discovery.etcd.tls.ca_file: the certificate of https://h:p is not signed by <ca_file> (...)``
  - ``discovery.etcd.tls.cert_file: https://h:p refused the client certificate <cert_file> (...)``
  - ``discovery.etcd.password_env: etcd at http://h:p refused user 'u' with the password in $VAR (...)``
  - ``discovery.etcd: etcd at http://h:p requires authentication (...)``
  - ``discovery.nats.tls: nats://h:p requires TLS (...)``, ``discovery.nats.token_env: ... refused the token``

etcd: a TLS handshake and ``GET /health`` with the client certificate (TLS 1.3 servers report a refused
client certificate on the first read, so the request is what proves it); with a username, ``POST
/v3/auth/authenticate`` through etcd's JSON gateway; then a one-key read (``/v3/kv/range``, with the token)
that fails when auth is enabled and we are nobody. With a client certificate and no username, etcd takes the
user from the certificate's CN on gRPC only (its JSON gateway ignores the CN), so that read goes through
gRPC (``EtcdStore``, in a thread with a loop of its own). NATS: the plaintext ``INFO`` greeting, the TLS upgrade when
the server or the URL asks for it, then ``CONNECT`` (+ token) and ``PING``: ``PONG`` or ``-ERR``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

_CLIENT_CERT_ALERTS = ("BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_REQUIRED", "CERTIFICATE_UNKNOWN",
                       "HANDSHAKE_FAILURE", "DECRYPT_ERROR", "ACCESS_DENIED")  # fmt: skip


def _discovery(config: Any) -> Any:
    return getattr(config, "discovery", config)


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException):
        e = e.reason
    if isinstance(e, ssl.SSLCertVerificationError):
        return e.verify_message or str(e)
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _unwrap(e: BaseException) -> BaseException:
    return e.reason if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException) else e


def _tls_problem(e: BaseException, server: str, key: str, tls: Any) -> str | None:
    """A TLS failure as the line that names the setting, or None when it is not a TLS failure."""
    e = _unwrap(e)
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"{key}.ca_file: the certificate of {server} is not signed by {tls.ca_file} ({_reason(e)})"
    if isinstance(e, ssl.SSLError):
        text = f"{e.reason or ''} {e}".upper()
        if tls.cert_file is None and any(a in text for a in _CLIENT_CERT_ALERTS):
            return f"{key}.cert_file: {server} requires a client certificate (set cert_file and key_file)"
        if any(a in text for a in _CLIENT_CERT_ALERTS):
            return f"{key}.cert_file: {server} refused the client certificate {tls.cert_file} ({_reason(e)})"
        return f"{key}: TLS with {server} failed ({_reason(e)})"
    if isinstance(e, ConnectionResetError | BrokenPipeError) and tls is not None:
        # some servers drop the connection instead of sending an alert when they refuse a client certificate
        return f"{key}.cert_file: {server} closed the TLS connection (client certificate {tls.cert_file} refused?)"
    return None


def _ssl_context(tls: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    if tls.cert_file is not None:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _post(url: str, path: str, body: dict[str, Any], ctx: ssl.SSLContext | None, timeout: float,
          token: str | None = None) -> dict[str, Any]:  # fmt: skip
    """POST to etcd's JSON gateway; an error answer is returned as ``{"error": ...}`` (never raised)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = token
    req = urllib.request.Request(f"{url.rstrip('/')}{path}", data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
            return dict(json.loads(r.read() or b"{}"))
    except urllib.error.HTTPError as e:
        try:
            data = json.loads(e.read() or b"{}")
        except ValueError:
            data = {}
        return {"error": data.get("error") or data.get("message") or f"HTTP {e.code}"}


def check_etcd(config: Any, environ: Mapping[str, str] | None = None, timeout: float = 3.0) -> list[str]:
    env = os.environ if environ is None else environ
    etcd = _discovery(config).etcd
    url = etcd.endpoints[0]
    tls = etcd.tls
    ctx = _ssl_context(tls) if tls is not None else None
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout, context=ctx) as r:
            r.read()
    except urllib.error.HTTPError:
        pass  # it answered over HTTP(S): TLS and the client certificate are fine
    except (OSError, ValueError) as e:
        line = _tls_problem(e, url, "discovery.etcd.tls", tls) if tls is not None else None
        return [line or f"discovery.etcd.endpoints: {url} does not answer ({_reason(e)})"]
    token = None
    try:
        if etcd.username is not None:
            password = env.get(etcd.password_env or "", "")
            resp = _post(url, "/v3/auth/authenticate", {"name": etcd.username, "password": password}, ctx, timeout)
            if "error" in resp:
                err = str(resp["error"])
                if "not enabled" in err:
                    return [f"discovery.etcd.username: etcd at {url} has authentication disabled; remove username "
                            f"and password_env ({err})"]  # fmt: skip
                return [f"discovery.etcd.password_env: etcd at {url} refused user {etcd.username!r} with the "
                        f"password in ${etcd.password_env} ({err})"]  # fmt: skip
            token = str(resp.get("token") or "")
        elif tls is not None and tls.cert_file is not None:
            return _grpc_read(url, tls, timeout)  # the JSON gateway ignores the certificate's CN
        resp = _post(url, "/v3/kv/range", {"key": _b64("dynamo_ext/probe")}, ctx, timeout, token)
    except (OSError, ValueError) as e:
        return [f"discovery.etcd.endpoints: {url} stopped answering ({_reason(e)})"]
    err = str(resp.get("error") or "")
    if "user name is empty" in err or "invalid auth token" in err:
        return [f"discovery.etcd: etcd at {url} requires authentication: set username and password_env (http://), "
                f"or tls with a client certificate whose CN is an etcd user (https://) ({err})"]  # fmt: skip
    if err:
        who = f"user {etcd.username!r}" if etcd.username else "this client"
        return [f"discovery.etcd: etcd at {url} refused a read by {who} ({err})"]
    return []


def _cert_cn(path: str) -> str:
    try:
        subject = ssl._ssl._test_decode_cert(path)["subject"]  # type: ignore[attr-defined]
        return next(v for rdn in subject for k, v in rdn if k == "commonName")
    except Exception:  # noqa: BLE001 - only for the message
        return "?"


def _grpc_read(url: str, tls: Any, timeout: float) -> list[str]:
    """A one-key read over gRPC as the client certificate's user (etcd maps its CN to a user there)."""
    import asyncio  # noqa: PLC0415
    import concurrent.futures  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from .env import EtcdCredentials  # noqa: PLC0415
    from .etcd import DiscoveryError, EtcdAuthError, EtcdStore  # noqa: PLC0415

    creds = EtcdCredentials(ca=Path(tls.ca_file).read_bytes(), cert=Path(tls.cert_file).read_bytes(),
                            key=Path(tls.key_file).read_bytes())  # fmt: skip

    async def read() -> None:
        store = await EtcdStore.connect(url, credentials=creds, connect_timeout=timeout, op_timeout=timeout)
        await store.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a loop of its own, also under a running loop
        try:
            pool.submit(asyncio.run, read()).result(timeout + 5.0)
        except EtcdAuthError as e:
            m = re.search(r"etcdserver: [^()]*", str(e))
            detail = m.group(0).strip() if m else str(e)
            return [f"discovery.etcd.tls.cert_file: etcd at {url} does not let the certificate's user (CN "
                    f"{_cert_cn(tls.cert_file)!r}) read ({detail})"]  # fmt: skip
        except (DiscoveryError, OSError, TimeoutError, concurrent.futures.TimeoutError) as e:
            return [f"discovery.etcd.endpoints: {url} did not answer over gRPC ({_reason(e)})"]
    return []


def _nats_readline(sock: Any, limit: int = 65536) -> bytes:
    buf = b""
    while not buf.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionResetError("connection closed")
        buf += chunk
        if len(buf) > limit:
            raise ValueError("line too long")
    return buf


def check_nats(config: Any, environ: Mapping[str, str] | None = None, timeout: float = 3.0) -> list[str]:
    env = os.environ if environ is None else environ
    nats = _discovery(config).nats
    url = nats.url
    u = urlparse(url)
    host, port = u.hostname or "127.0.0.1", u.port or 4222
    tls = nats.tls
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        return [f"discovery.nats.url: {url} does not answer ({_reason(e)})"]
    sock: Any = raw
    try:
        raw.settimeout(timeout)
        line = _nats_readline(raw)
        if not line.startswith(b"INFO "):
            return [f"discovery.nats.url: {url} is not a NATS server (greeting {line[:40]!r})"]
        info = json.loads(line[5:])
        if info.get("tls_required") and tls is None:
            return [f"discovery.nats.tls: {url} requires TLS: use a tls:// url with tls.ca_file (and cert_file, "
                    "key_file if it verifies clients)"]  # fmt: skip
        if tls is not None:
            if not info.get("tls_required") and not info.get("tls_available"):
                return [f"discovery.nats.tls: {url} does not offer TLS; remove tls and use nats://"]
            try:
                sock = _ssl_context(tls).wrap_socket(raw, server_hostname=host)
            except (OSError, ValueError) as e:
                return [_tls_problem(e, url, "discovery.nats.tls", tls) or f"discovery.nats.tls: {_reason(e)}"]
        connect: dict[str, Any] = {"verbose": False, "pedantic": False, "tls_required": tls is not None,
                                   "name": "dynamo-ext-probe", "lang": "python", "version": "0", "protocol": 1}
        if nats.token_env is not None:
            connect["auth_token"] = env.get(nats.token_env, "")
        try:
            sock.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
            answer = _nats_readline(sock)
        except (OSError, ValueError) as e:
            if tls is not None:
                line_ = _tls_problem(e, url, "discovery.nats.tls", tls)
                if line_:
                    return [line_]
            return [f"discovery.nats.url: {url} closed the connection ({_reason(e)})"]
        if answer.startswith(b"PONG"):
            return []
        text = answer.decode(errors="replace").strip()
        if "authorization" in text.lower():
            if nats.token_env is not None:
                return [f"discovery.nats.token_env: {url} refused the token in ${nats.token_env} ({text})"]
            return [f"discovery.nats: {url} requires credentials: set token_env ({text})"]
        return [f"discovery.nats: {url} answered {text!r}"]
    except (OSError, ValueError) as e:
        return [f"discovery.nats.url: {url}: {_reason(e)}"]
    finally:
        sock.close()


def check_discovery(config: Any, environ: Mapping[str, str] | None = None, timeout: float = 3.0) -> list[str]:
    """Every problem of etcd and NATS with the configured TLS / credentials, one line each; ``[]``: usable."""
    return check_etcd(config, environ, timeout) + check_nats(config, environ, timeout)
