"""Our discovery adapters against etcd and nats-server that require TLS and credentials (real servers,
certificates made by openssl in a temporary directory): the settings reach the adapters through the same
environment variables Dynamo's runtime reads (``discovery.env``)."""

from __future__ import annotations

import asyncio
import time

import pytest

from dynamo_ext.config import parse_config
from dynamo_ext.discovery import EtcdAuthError, EtcdCredentials, EtcdStore, EventBus, dynamo_env, etcd_credentials
from dynamo_ext.discovery.env import nats_options, nats_tls_context
from dynamo_ext.discovery.nats import NatsUnavailable
from fixtures.secure_fixtures import mtls_etcd, password_etcd, pki, tls_nats  # noqa: F401 (fixtures)
from fixtures.secure_servers import NATS_TOKEN, ROOT_PASSWORD




def _config(pki, etcd_url: str, nats_url: str, *, tls_etcd: bool = True, **nats_extra) -> object:
    etcd = {"endpoints": [etcd_url]}
    if tls_etcd:
        etcd["tls"] = {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
    else:
        etcd.update(username="root", password_env="DX_TEST_ETCD_PW")
    nats = {"url": nats_url, "token_env": "DX_TEST_NATS_TOKEN",
            "tls": {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}}
    nats.update(nats_extra)
    return parse_config({"workers": {"agg": {}}, "discovery": {"etcd": etcd, "nats": nats}})


@pytest.fixture
def secrets(monkeypatch):
    monkeypatch.setenv("DX_TEST_ETCD_PW", ROOT_PASSWORD)
    monkeypatch.setenv("DX_TEST_NATS_TOKEN", NATS_TOKEN)


def test_dynamo_env_maps_every_setting(pki, secrets):
    cfg = _config(pki, "https://127.0.0.1:1", "tls://127.0.0.1:2")
    env = dynamo_env(cfg)
    assert env["ETCD_ENDPOINTS"] == "https://127.0.0.1:1" and env["NATS_SERVER"] == "tls://127.0.0.1:2"
    # Dynamo 1.6.1 reads the etcd TLS variables as PEM text (a path makes its connect time out)
    assert env["ETCD_AUTH_CA"] == pki.ca.read_text() and env["ETCD_AUTH_CLIENT_KEY"] == pki.client_key.read_text()
    assert env["ETCD_AUTH_CLIENT_CERT"].startswith("-----BEGIN CERTIFICATE")
    assert "ETCD_AUTH_USERNAME" not in env and "ETCD_AUTH_PASSWORD" not in env
    assert env["NATS_TLS_CA_CERT_PATH"] == str(pki.ca) and env["NATS_TLS_CLIENT_KEY_PATH"] == str(pki.client_key)
    assert env["NATS_AUTH_TOKEN"] == NATS_TOKEN and env["ETCD_LEASE_TTL"] == "30"
    env = dynamo_env(_config(pki, "http://127.0.0.1:1", "tls://127.0.0.1:2", tls_etcd=False))
    assert (env["ETCD_AUTH_USERNAME"], env["ETCD_AUTH_PASSWORD"]) == ("root", ROOT_PASSWORD)
    assert not any(k.startswith("ETCD_AUTH_C") for k in env)
    # read back by our adapters
    creds = etcd_credentials(env)
    assert (creds.username, creds.password, creds.tls) == ("root", ROOT_PASSWORD, False)
    assert ROOT_PASSWORD not in repr(creds)
    opts = nats_options(env)
    assert opts["token"] == NATS_TOKEN and opts["tls"].verify_mode.name == "CERT_REQUIRED"


async def test_etcd_store_mutual_tls_with_auth_enabled(mtls_etcd, pki, secrets, ns, monkeypatch):
    """Client certificate CN=root on an etcd with auth enabled: the store is root (no password sent)."""
    env = dynamo_env(_config(pki, mtls_etcd.url, "tls://127.0.0.1:1"))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    async with await EtcdStore.connect(mtls_etcd.url, connect_timeout=5) as store:  # credentials from the env
        lease = await store.grant_lease(5)
        await store.put(f"{ns}/a", b"1", lease=lease)
        w = await store.watch_prefix(f"{ns}/")
        await store.put(f"{ns}/b", b"2")
        ev = await asyncio.wait_for(w.__anext__(), 5)
        assert (ev.kind, ev.key, ev.value) == ("put", f"{ns}/b", b"2")
        assert await store.get(f"{ns}/a") == b"1" and await store.lease_ttl(lease.id) > 0
        await w.aclose()


async def test_etcd_store_rogue_client_certificate_fails_fast(mtls_etcd, pki):
    rogue = EtcdCredentials(ca=pki.ca.read_bytes(), cert=pki.rogue_cert.read_bytes(), key=pki.rogue_key.read_bytes())
    t = time.monotonic()
    with pytest.raises(Exception) as ei:
        await EtcdStore.connect(mtls_etcd.url, credentials=rogue, connect_timeout=2)
    assert time.monotonic() - t < 10
    assert "EtcdUnavailable" in type(ei.value).__name__


async def test_etcd_store_password_and_token_lost_in_restart(password_etcd, ns):
    creds = EtcdCredentials(username="root", password=ROOT_PASSWORD)
    async with await EtcdStore.connect(password_etcd.url, credentials=creds, connect_timeout=5) as store:
        await store.put(f"{ns}/k", b"v")
        password_etcd.restart()  # simple tokens live in memory: ours is invalid afterwards
        assert await store.get(f"{ns}/k") == b"v"  # authenticated again on "invalid auth token"
    t = time.monotonic()
    with pytest.raises(EtcdAuthError, match="refused user 'root'"):
        await EtcdStore.connect(password_etcd.url, credentials=EtcdCredentials(username="root", password="wrong"),
                                connect_timeout=5)  # fmt: skip
    assert time.monotonic() - t < 3, "a wrong password is not retried"
    with pytest.raises(EtcdAuthError):  # auth is on: no credentials, no access
        await EtcdStore.connect(password_etcd.url, credentials=EtcdCredentials(), connect_timeout=3)


async def test_event_bus_tls_and_token(tls_nats, pki, secrets, ns, monkeypatch):
    env = dynamo_env(_config(pki, "https://127.0.0.1:1", tls_nats.url))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    async with await EventBus.connect(tls_nats.url, connect_timeout=5) as bus:  # options from the env
        sub = await bus.subscribe(f"{ns}.x")
        await bus.publish(f"{ns}.x", b"hello")
        assert (await sub.next(timeout=5)).data == b"hello"
    tls = nats_tls_context(str(pki.ca), str(pki.client_cert), str(pki.client_key))
    t = time.monotonic()
    with pytest.raises(NatsUnavailable, match="refused"):
        await EventBus.connect(tls_nats.url, connect_timeout=5, options={"tls": tls, "token": "wrong"})
    assert time.monotonic() - t < 4, "a wrong token is not retried for the whole connect budget"
    rogue = nats_tls_context(str(pki.ca), str(pki.rogue_cert), str(pki.rogue_key))
    with pytest.raises(NatsUnavailable):
        await EventBus.connect(tls_nats.url, connect_timeout=3, options={"tls": rogue, "token": NATS_TOKEN})
