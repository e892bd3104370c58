"""What Dynamo 1.6.1's runtime does with its etcd / NATS TLS and credential variables (the evidence for what
``config.py`` accepts and refuses; discovery/README.md "TLS and credentials"). A bare ``DistributedRuntime`` in a
subprocess serves an endpoint and calls it, against etcd with client-cert-auth + auth enabled and nats-server
with TLS client verification + a token. If a Dynamo upgrade makes a refused row work, this test says so: lift the
refusal in config.py then."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from fixtures.secure_fixtures import mtls_etcd, pki, tls_nats  # noqa: F401 (fixtures)
from fixtures.secure_servers import NATS_TOKEN, ROOT_PASSWORD

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import asyncio, os
    async def main():
        from dynamo.runtime import DistributedRuntime
        rt = DistributedRuntime(asyncio.get_running_loop(), "etcd", "tcp", event_plane="nats")
        ep = rt.endpoint(f"dxtls{os.getpid()}.comp.ep")
        async def h(request, context):
            yield {"echo": request}
        asyncio.ensure_future(ep.serve_endpoint(h))
        c = await ep.client()
        await asyncio.wait_for(c.wait_for_instances(), 10)
        async for r in await c.round_robin("x"):
            print("REPLY", r.data(), flush=True)
        rt.shutdown()
    asyncio.run(main())
""")




def _run(env: dict[str, str]) -> tuple[bool, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "NATS_"))}
    base.update(DYN_TCP_RPC_HOST="127.0.0.1", DYN_TCP_RESPONSE_STREAM_HOST="127.0.0.1",
                DYN_EVENT_PLANE_HOST="127.0.0.1", DYN_EVENT_PLANE="nats", ETCD_STARTUP_CONNECT_TIMEOUT_SECONDS="3",
                NATS_STARTUP_CONNECT_TIMEOUT_SECONDS="3", **env)  # fmt: skip
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=base, capture_output=True, text=True, timeout=60)
    return "REPLY {'echo': 'x'}" in r.stdout, (r.stdout + r.stderr)[-600:]


def test_runtime_tls_and_credential_variables(mtls_etcd, tls_nats, pki):
    nats = {"NATS_SERVER": tls_nats.url, "NATS_TLS_CA_CERT_PATH": str(pki.ca), "NATS_AUTH_TOKEN": NATS_TOKEN,
            "NATS_TLS_CLIENT_CERT_PATH": str(pki.client_cert), "NATS_TLS_CLIENT_KEY_PATH": str(pki.client_key)}
    pem = {"ETCD_ENDPOINTS": mtls_etcd.url, "ETCD_AUTH_CA": pki.ca.read_text(),
           "ETCD_AUTH_CLIENT_CERT": pki.client_cert.read_text(), "ETCD_AUTH_CLIENT_KEY": pki.client_key.read_text()}
    ok, out = _run({**pem, **nats})
    assert ok, f"etcd TLS as PEM text + NATS TLS + token should work:\n{out}"
    paths = {**pem, "ETCD_AUTH_CA": str(pki.ca), "ETCD_AUTH_CLIENT_CERT": str(pki.client_cert),
             "ETCD_AUTH_CLIENT_KEY": str(pki.client_key)}  # fmt: skip
    ok, out = _run({**paths, **nats})
    assert not ok, "the runtime now reads ETCD_AUTH_* as paths: discovery.env.dynamo_env may pass paths"
    ok, out = _run({**pem, "ETCD_AUTH_USERNAME": "root", "ETCD_AUTH_PASSWORD": ROOT_PASSWORD, **nats})
    assert not ok, "the runtime now sends a password over TLS: config.EtcdConfig may accept username with tls"
    ok, out = _run({**pem, **nats, "NATS_SERVER": tls_nats.url.replace("tls://", "nats://")})
    assert not ok and "tls://" in out, out
