"""etcd/NATS: reused when reachable (never started), started on the configured loopback address when
absent; the record audit through etcd's JSON gateway."""

from __future__ import annotations

import base64
import json
import os
import urllib.request

import pytest

from dynamo_ext.launch import infra
from dynamo_ext.launch.supervisor import Supervisor


def test_reachable_servers_are_reused_not_started(etcd_server, nats_server, tmp_path):
    e = infra.ensure_etcd(["http://127.0.0.1:1", etcd_server.url], tmp_path, dict(os.environ))
    n = infra.ensure_nats(nats_server.url, tmp_path, dict(os.environ))
    assert e.reused and e.spec is None and e.url == etcd_server.url
    assert n.reused and n.spec is None


def test_absent_servers_are_started_on_the_configured_address_and_stopped(tmp_path):
    ep, np_ = infra.free_port(), infra.free_port()
    etcd_url, nats_url = f"http://127.0.0.1:{ep}", f"nats://127.0.0.1:{np_}"
    assert not infra.etcd_healthy(etcd_url) and not infra.nats_answers(nats_url)
    e = infra.ensure_etcd([etcd_url], tmp_path, dict(os.environ))
    n = infra.ensure_nats(nats_url, tmp_path, dict(os.environ))
    assert not e.reused and not n.reused and e.url == etcd_url
    sup = Supervisor(tmp_path / "logs")
    for p in (e, n):
        sup.start(p.spec)
    try:
        sup.wait_ready(30)
        assert infra.etcd_healthy(etcd_url) and infra.nats_answers(nats_url)
        assert (tmp_path / "etcd-data").is_dir()
    finally:
        sup.stop_all()
    assert sup.leftovers() == []
    assert not infra.etcd_healthy(etcd_url) and not infra.nats_answers(nats_url)


def test_non_loopback_or_taken_port_is_an_error(tmp_path):
    with pytest.raises(infra.InfraError, match="not a loopback address"):
        infra.ensure_etcd(["http://10.255.255.1:2379"], tmp_path, {})
    import socket

    with socket.socket() as s:  # a port that is listening but is not NATS (no INFO greeting)
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(infra.InfraError, match="taken by something else"):
            infra.ensure_nats(f"nats://127.0.0.1:{s.getsockname()[1]}", tmp_path, {})


def _gw(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_stale_records_and_revoke(etcd_server):
    url = etcd_server.url
    lease = int(_gw(url, "/v3/lease/grant", {"TTL": 60})["ID"])
    other = int(_gw(url, "/v3/lease/grant", {"TTL": 60})["ID"])
    keys = {f"v1/instances/ns1/backend/generate/{lease:x}": lease,
            f"dynamo_ext/v1/workers/ns1/decode/{lease}": lease,
            f"v1/instances/ns1/backend/generate/{other:x}": other, f"v1/instances/ns2/backend/generate/{lease:x}": lease}
    for k, lid in keys.items():
        _gw(url, "/v3/kv/put", {"key": _b64(k), "value": _b64("x"), "lease": str(lid)})
    stale = infra.stale_records(url, "ns1", {lease})
    assert sorted(k for k, _ in stale) == sorted(list(keys)[:2])
    assert all(lid == lease for _, lid in stale)
    assert infra.revoke_lease(url, lease)
    assert infra.stale_records(url, "ns1", {lease}) == []
    assert [k for k, _ in infra.etcd_keys(url, "v1/instances/ns1/")] == [f"v1/instances/ns1/backend/generate/{other:x}"]


def test_free_port_never_hands_out_the_same_port_twice(monkeypatch):
    """Two ports picked for one server (etcd's client and peer) were once equal in CI: the kernel gave the same
    ephemeral port to two binds in a row. free_port skips a port it handed out recently."""
    import socket as _socket

    from dynamo_ext.launch import infra

    ports = iter([41001, 41001, 41001, 41002])

    class FakeSocket:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def bind(self, addr):
            self.port = next(ports)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(infra, "_HANDED_OUT", type(infra._HANDED_OUT)(maxlen=8))
    monkeypatch.setattr(_socket, "socket", lambda *a, **kw: FakeSocket())
    assert [infra.free_port(), infra.free_port()] == [41001, 41002]
