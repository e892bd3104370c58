"""A local graph listens on loopback only (issue 13.5): every listening socket of every process that
``launch_graph`` (= ``dynamo-ext serve``) starts — workers, router, Dynamo's frontend, their descendants, and
the etcd / nats-server it started — is bound to 127.0.0.1 or ::1, after a request moved KV between workers
(listeners that open lazily are open by then).

The test's own environment has the loopback variables removed and ``UCX_NET_DEVICES=all``, so what binds
loopback is ``launch.plan.child_env`` (``LOOPBACK_ENV``), not the test setup."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from dynamo_ext.launch import launch_graph
from dynamo_ext.launch.client import complete
from dynamo_ext.launch.infra import free_port
from dynamo_ext.launch.plan import LOOPBACK_ENV

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures.listeners import LOOPBACK, listening_sockets, process_tree  # noqa: E402

PROMPT = ("The quick brown fox jumps over the lazy dog and keeps running through the forest until night falls "
          "and the stars come out over the quiet hills where nobody walks") * 2  # > disagg_min_prompt_tokens


def test_every_listener_of_a_local_graph_is_loopback(tmp_path, monkeypatch):
    for k in (*LOOPBACK_ENV, "DYN_TCP_RESPONSE_STREAM_PORT", "DYN_SYSTEM_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("UCX_NET_DEVICES", "all")
    monkeypatch.setenv("DYNAMO_EXT_CACHE", str(tmp_path / "cache"))
    cfg = {
        "model": {"name": "dynamo-ext/tiny", "preset": "tiny", "block_size": 16},
        "workers": {"prefill": {"count": 1}, "decode": {"count": 1}},
        "router": {"policy": "dynamo-ext", "disagg_min_prompt_tokens": 16},
        "discovery": {"namespace": "loopback", "etcd": {"endpoints": [f"http://127.0.0.1:{free_port()}"]},
                      "nats": {"url": f"nats://127.0.0.1:{free_port()}"}},
    }
    with launch_graph("graphs/disagg.py", cfg, log_dir=tmp_path / "logs", ready_timeout=180) as g:
        resp = complete(g.base_url, g.model, PROMPT, 8)
        assert resp["usage"]["completion_tokens"] == 8
        moved = sum(1 for text in g.metrics(role="decode").values()
                    for line in text.splitlines()
                    if line.startswith("dynamo_ext_kv_transfer_bytes_total") and float(line.split()[-1]) > 0)
        assert moved, "the request was not disaggregated: KV transport listeners may not be exercised"
        pids = process_tree(os.getpid())
        found = listening_sockets(pids)
        names = {c.name for c in g.children}
    assert {"prefill-0", "decode-0", "router-0", "frontend"} <= names
    roles = {(lst.name.split()[2] if " -m " in f" {lst.name} " else lst.name.split()[0]) for lst in found}
    assert any("etcd" in r for r in roles) and any("nats-server" in r for r in roles), roles
    assert len(found) >= 8, found
    wide = [str(lst) for lst in found if lst.ip not in LOOPBACK]
    assert not wide, "listening beyond loopback:\n" + "\n".join(wide)


def test_child_env_loopback_and_discovery_settings(tmp_path, monkeypatch):
    """child_env: loopback variables always win over the caller's; the config's discovery TLS/credential
    variables replace inherited ones (a stale ETCD_AUTH_USERNAME would make Dynamo drop its TLS settings)."""
    from dynamo_ext.config import parse_config
    from dynamo_ext.launch.infra import InfraError
    from dynamo_ext.launch.plan import child_env
    from fixtures.tls import make_pki

    pki = make_pki(tmp_path / "pki")
    tls = {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
    monkeypatch.setenv("DX_TOKEN", "tok")
    cfg = parse_config({"workers": {"agg": {}}, "discovery": {
        "etcd": {"endpoints": ["https://127.0.0.1:2379"], "tls": tls},
        "nats": {"url": "tls://127.0.0.1:4222", "token_env": "DX_TOKEN", "tls": {"ca_file": str(pki.ca)}}}})
    base = {"DYN_TCP_RPC_HOST": "0.0.0.0", "UCX_NET_DEVICES": "mlx5_0:1", "ETCD_AUTH_USERNAME": "stale",
            "ETCD_AUTH_PASSWORD": "stale", "NATS_AUTH_CREDENTIALS_FILE": "/x", "NATS_TLS_CLIENT_CERT_PATH": "/y",
            "DX_TOKEN": "tok", "PATH": "/bin", "ETCD_LEASE_TTL": "45"}  # fmt: skip
    env = child_env(cfg, "https://127.0.0.1:2379", "tls://127.0.0.1:4222", base=base)
    assert {k: env[k] for k in LOOPBACK_ENV} == LOOPBACK_ENV
    for k in ("ETCD_AUTH_USERNAME", "ETCD_AUTH_PASSWORD", "NATS_AUTH_CREDENTIALS_FILE", "NATS_TLS_CLIENT_CERT_PATH"):
        assert k not in env, k
    assert env["ETCD_AUTH_CA"] == pki.ca.read_text() and env["ETCD_AUTH_CLIENT_CERT"] == pki.client_cert.read_text()
    assert env["NATS_TLS_CA_CERT_PATH"] == str(pki.ca) and env["NATS_AUTH_TOKEN"] == "tok"
    assert env["ETCD_LEASE_TTL"] == "45" and env["PATH"] == "/bin"  # the caller's TTL still wins
    # a secret that vanished after the config was checked: one line naming the key
    with pytest.raises(InfraError, match=r"^discovery\.nats\.token_env: environment variable DX_TOKEN is not set$"):
        child_env(cfg, "https://127.0.0.1:2379", "tls://127.0.0.1:4222", base={"PATH": "/bin"})
