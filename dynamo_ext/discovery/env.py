"""``discovery.*`` settings -> the environment variables Dynamo's runtime reads, and those variables -> the
client options of our own etcd / NATS adapters. The one place that knows the names.

Protocol
--------
* ``dynamo_env(config) -> dict[str, str]``: ``config`` is a ``DynamoExtConfig`` or its ``discovery`` section.
  Every variable below that the settings call for (absent ones are simply not in the dict):

  ===============================  ================================================================
  ``ETCD_ENDPOINTS``               ``discovery.etcd.endpoints``, comma-separated
  ``ETCD_LEASE_TTL``               ``discovery.etcd.lease_ttl_s``
  ``ETCD_AUTH_USERNAME``           ``discovery.etcd.username`` (``http://`` only)
  ``ETCD_AUTH_PASSWORD``           the value of ``$<discovery.etcd.password_env>``
  ``ETCD_AUTH_CA``                 the PEM **contents** of ``discovery.etcd.tls.ca_file``
  ``ETCD_AUTH_CLIENT_CERT``        the PEM contents of ``discovery.etcd.tls.cert_file``
  ``ETCD_AUTH_CLIENT_KEY``         the PEM contents of ``discovery.etcd.tls.key_file``
  ``NATS_SERVER``                  ``discovery.nats.url`` (``tls://`` with TLS: the runtime requires it)
  ``NATS_AUTH_TOKEN``              the value of ``$<discovery.nats.token_env>``
  ``NATS_TLS_CA_CERT_PATH``        ``discovery.nats.tls.ca_file`` (a path)
  ``NATS_TLS_CLIENT_CERT_PATH``    ``discovery.nats.tls.cert_file`` (a path)
  ``NATS_TLS_CLIENT_KEY_PATH``     ``discovery.nats.tls.key_file`` (a path)
  ===============================  ================================================================

  Names checked in Dynamo 1.6.1 (``strings dynamo/_core.abi3.so``, ``dynamo/frontend/main.py``) and by runs
  against etcd 3.4.23 / nats-server 2.9.10 requiring them (README here). Dynamo reads ``ETCD_AUTH_CA`` /
  ``_CLIENT_CERT`` / ``_CLIENT_KEY`` as PEM text (``Certificate::from_pem(value)``), not as paths: a path
  there makes the runtime time out connecting. When ``ETCD_AUTH_USERNAME`` and ``ETCD_AUTH_PASSWORD`` are
  both set it ignores the three TLS variables, so the schema never allows both (``config.EtcdConfig``).
  Raises :class:`DiscoverySettingError` (a ``ValueError``; its text starts with the setting's key) when a
  file cannot be read or a secret's variable is unset (``config`` checked both; this is a race).
* ``DISCOVERY_ENV_KEYS``: every variable ``dynamo_env`` may set. A launcher drops them from an inherited
  environment before adding ``dynamo_env``'s, so a stale ``ETCD_AUTH_USERNAME`` cannot switch TLS off.
* The other direction, for our adapters in a process that Dynamo's variables configure (a worker, the
  router): ``etcd_credentials(environ=None) -> EtcdCredentials`` (``EtcdStore.connect``'s default) and
  ``nats_options(environ=None) -> dict`` (keyword arguments of ``nats.connect``: ``tls``, ``token``;
  ``EventBus.connect`` and the KV indexer use it).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ETCD_ENDPOINTS = "ETCD_ENDPOINTS"
ETCD_LEASE_TTL = "ETCD_LEASE_TTL"
ETCD_AUTH_USERNAME = "ETCD_AUTH_USERNAME"
ETCD_AUTH_PASSWORD = "ETCD_AUTH_PASSWORD"
ETCD_AUTH_CA = "ETCD_AUTH_CA"
ETCD_AUTH_CLIENT_CERT = "ETCD_AUTH_CLIENT_CERT"
ETCD_AUTH_CLIENT_KEY = "ETCD_AUTH_CLIENT_KEY"
NATS_SERVER = "NATS_SERVER"
NATS_AUTH_TOKEN = "NATS_AUTH_TOKEN"
NATS_TLS_CA_CERT_PATH = "NATS_TLS_CA_CERT_PATH"
NATS_TLS_CLIENT_CERT_PATH = "NATS_TLS_CLIENT_CERT_PATH"
NATS_TLS_CLIENT_KEY_PATH = "NATS_TLS_CLIENT_KEY_PATH"

#: credential variables Dynamo 1.6.1 also reads that no discovery setting maps to: a launcher removes them
#: from an inherited environment too (they would change what the runtime sends)
FOREIGN_AUTH_KEYS = ("NATS_AUTH_USERNAME", "NATS_AUTH_PASSWORD", "NATS_AUTH_NKEY", "NATS_AUTH_CREDENTIALS_FILE",
                     "NATS_TLS_INSECURE")  # fmt: skip

DISCOVERY_ENV_KEYS = (
    ETCD_ENDPOINTS, ETCD_LEASE_TTL, ETCD_AUTH_USERNAME, ETCD_AUTH_PASSWORD, ETCD_AUTH_CA, ETCD_AUTH_CLIENT_CERT,
    ETCD_AUTH_CLIENT_KEY, NATS_SERVER, NATS_AUTH_TOKEN, NATS_TLS_CA_CERT_PATH, NATS_TLS_CLIENT_CERT_PATH,
    NATS_TLS_CLIENT_KEY_PATH,
)  # fmt: skip
#: the security subset (what a launcher replaces wholesale; endpoints and the TTL it sets itself)
SECURITY_ENV_KEYS = tuple(k for k in DISCOVERY_ENV_KEYS if k not in (ETCD_ENDPOINTS, ETCD_LEASE_TTL, NATS_SERVER))


class DiscoverySettingError(ValueError):
    """A discovery setting cannot be turned into the runtime's environment; the text starts with its key."""


def _discovery(config: Any) -> Any:
    return getattr(config, "discovery", config)


def _pem(path: str, key: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DiscoverySettingError(f"{key}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _secret(var: str, key: str, environ: Mapping[str, str]) -> str:
    value = environ.get(var)
    if not value:
        raise DiscoverySettingError(f"{key}: environment variable {var} is not set")
    return value


def dynamo_env(config: Any, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment Dynamo's runtime (and our adapters) need for ``config``'s ``discovery`` section; secrets
    named by ``password_env`` / ``token_env`` are read from ``environ`` (default ``os.environ``)."""
    env_in = os.environ if environ is None else environ
    d = _discovery(config)
    etcd, nats = d.etcd, d.nats
    out = {
        ETCD_ENDPOINTS: ",".join(etcd.endpoints),
        ETCD_LEASE_TTL: str(etcd.lease_ttl_s),
        NATS_SERVER: nats.url,
    }
    if etcd.username is not None:
        out[ETCD_AUTH_USERNAME] = etcd.username
        out[ETCD_AUTH_PASSWORD] = _secret(etcd.password_env, "discovery.etcd.password_env", env_in)
    if etcd.tls is not None:
        for var, attr in ((ETCD_AUTH_CA, "ca_file"), (ETCD_AUTH_CLIENT_CERT, "cert_file"),
                          (ETCD_AUTH_CLIENT_KEY, "key_file")):  # fmt: skip
            path = getattr(etcd.tls, attr)
            if path is not None:
                out[var] = _pem(path, f"discovery.etcd.tls.{attr}")
    if nats.token_env is not None:
        out[NATS_AUTH_TOKEN] = _secret(nats.token_env, "discovery.nats.token_env", env_in)
    if nats.tls is not None:
        for var, attr in ((NATS_TLS_CA_CERT_PATH, "ca_file"), (NATS_TLS_CLIENT_CERT_PATH, "cert_file"),
                          (NATS_TLS_CLIENT_KEY_PATH, "key_file")):  # fmt: skip
            path = getattr(nats.tls, attr)
            if path is not None:
                out[var] = str(path)
    return out


def etcd_is_plain(config: Any) -> bool:
    """etcd without TLS and without credentials: the only kind of etcd ``serve`` may start itself."""
    etcd = _discovery(config).etcd
    return etcd.tls is None and etcd.username is None


def nats_is_plain(config: Any) -> bool:
    """NATS without TLS and without credentials: the only kind of nats-server ``serve`` may start itself."""
    nats = _discovery(config).nats
    return nats.tls is None and nats.token_env is None and nats.creds_file is None


def is_plain(config: Any) -> bool:
    return etcd_is_plain(config) and nats_is_plain(config)


# -- the same variables, read back by our adapters ---------------------------------------------------------------


@dataclass(frozen=True)
class EtcdCredentials:
    """What our etcd client sends: TLS material (PEM bytes) and/or a user with a password."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    username: str | None = None
    password: str | None = None

    @property
    def tls(self) -> bool:
        return self.ca is not None

    def __repr__(self) -> str:  # never print secrets
        return (f"EtcdCredentials(tls={self.tls}, client_cert={self.cert is not None}, "
                f"username={self.username!r}, password={'***' if self.password else None})")  # fmt: skip


def etcd_credentials(environ: Mapping[str, str] | None = None) -> EtcdCredentials:
    """From ``ETCD_AUTH_*`` as Dynamo reads them: a username + password, else the TLS triple (PEM text; a path
    is accepted too, for hand-written environments), else nothing."""
    env = os.environ if environ is None else environ
    user, password = env.get(ETCD_AUTH_USERNAME), env.get(ETCD_AUTH_PASSWORD)
    if user and password is not None:
        return EtcdCredentials(username=user, password=password)

    def material(var: str) -> bytes | None:
        v = env.get(var)
        if not v:
            return None
        if "-----BEGIN" in v:
            return v.encode()
        return Path(v).read_bytes()

    ca, cert, key = material(ETCD_AUTH_CA), material(ETCD_AUTH_CLIENT_CERT), material(ETCD_AUTH_CLIENT_KEY)
    if ca is not None and cert is not None and key is not None:
        return EtcdCredentials(ca=ca, cert=cert, key=key)
    return EtcdCredentials()


def nats_tls_context(ca_file: str, cert_file: str | None = None, key_file: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    if cert_file is not None:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def nats_options(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments of ``nats.connect`` from ``NATS_TLS_*`` / ``NATS_AUTH_TOKEN`` (empty when unset)."""
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    ca = env.get(NATS_TLS_CA_CERT_PATH)
    if ca:
        out["tls"] = nats_tls_context(ca, env.get(NATS_TLS_CLIENT_CERT_PATH) or None,
                                      env.get(NATS_TLS_CLIENT_KEY_PATH) or None)  # fmt: skip
    token = env.get(NATS_AUTH_TOKEN)
    if token:
        out["token"] = token
    return out
