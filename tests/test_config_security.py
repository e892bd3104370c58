"""dynamo.yaml fields that do not work yet are refused (naming the field), and discovery TLS/auth settings are
checked before anything starts: files exist and parse, secrets' environment variables are set, and only the
combinations Dynamo 1.6.1's runtime can use are accepted (dynamo_ext/discovery/README.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dynamo_ext.config import ConfigError, load_config, parse_config

sys.path.insert(0, str(Path(__file__).parent))
from fixtures.tls import make_pki  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _errors(data: dict) -> list[str]:
    data = {"workers": {"agg": {}}, **data}
    try:
        parse_config(data)
    except ConfigError as e:
        return e.lines
    return []


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls(pki, client: str = "client") -> dict:
    return {"ca_file": str(pki.ca), "cert_file": str(pki.dir / f"{client}.pem"), "key_file": str(pki.dir / f"{client}.key")}


# -- fields that exist but do nothing yet ---------------------------------------------------------------


@pytest.mark.parametrize("data, key", [
    ({"kv_transfer": {"metadata_server": "http://127.0.0.1:2379"}}, "kv_transfer.metadata_server"),
    ({"workers": {"agg": {"gpu_type": "h100_sxm5"}}}, "workers.agg.gpu_type"),
    ({"workers": {"prefill": {"gpu_type": "cpu"}, "decode": {}}}, "workers.prefill.gpu_type"),
    ({"workers": {"decode": {"tensor_parallel": 8}}}, "workers.decode.tensor_parallel"),
    ({"router": {"overlap_weight": 1.0}}, "router.overlap_weight"),
    ({"router": {"policy": "dynamo-kv", "replicas": 2}}, "router.replicas"),
    ({"discovery": {"nats": {"creds_file": "/etc/nats/user.creds"}}}, "discovery.nats.creds_file"),
])  # fmt: skip
def test_unsupported_field_refused_naming_it(data, key):
    lines = _errors(data)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{key}: not supported yet: "), lines


def test_supported_values_of_those_fields_pass():
    assert _errors({"workers": {"agg": {"tensor_parallel": 1}}}) == []
    assert _errors({"router": {"policy": "dynamo-ext", "replicas": 3}}) == []
    assert _errors({"router": {"policy": "dynamo-kv", "replicas": 1}}) == []


# -- TLS and auth settings ------------------------------------------------------------------------------


def test_missing_tls_files_named(tmp_path):
    lines = _errors({"discovery": {"etcd": {"endpoints": ["https://127.0.0.1:2379"], "tls": {
        "ca_file": str(tmp_path / "ca.pem"), "cert_file": str(tmp_path / "c.pem"), "key_file": str(tmp_path / "c.key")}}}})
    assert lines == [f"discovery.etcd.tls.ca_file: no such file: {tmp_path / 'ca.pem'}",
                     f"discovery.etcd.tls.cert_file: no such file: {tmp_path / 'c.pem'}",
                     f"discovery.etcd.tls.key_file: no such file: {tmp_path / 'c.key'}"]  # fmt: skip
    lines = _errors({"discovery": {"nats": {"url": "tls://127.0.0.1:4222", "tls": {"ca_file": str(tmp_path)}}}})
    assert lines == [f"discovery.nats.tls.ca_file: not a file: {tmp_path}"]


def test_unparsable_or_mismatched_pem_named(pki):
    lines = _errors({"discovery": {"etcd": {"endpoints": ["https://127.0.0.1:2379"],
                                            "tls": {**_tls(pki), "ca_file": str(pki.client_key)}}}})
    assert len(lines) == 1 and lines[0].startswith("discovery.etcd.tls.ca_file: ") and "not a PEM CA" in lines[0]
    lines = _errors({"discovery": {"etcd": {"endpoints": ["https://127.0.0.1:2379"],
                                            "tls": {**_tls(pki), "key_file": str(pki.rogue_key)}}}})
    assert len(lines) == 1 and lines[0].startswith("discovery.etcd.tls: key_file does not match cert_file"), lines


def test_secret_environment_variables_must_be_set(monkeypatch):
    monkeypatch.delenv("DX_TEST_ETCD_PW", raising=False)
    monkeypatch.delenv("DX_TEST_NATS_TOKEN", raising=False)
    data = {"discovery": {"etcd": {"username": "root", "password_env": "DX_TEST_ETCD_PW"},
                          "nats": {"token_env": "DX_TEST_NATS_TOKEN"}}}
    assert _errors(data) == [
        "discovery.etcd.password_env: environment variable DX_TEST_ETCD_PW (the etcd password) is not set",
        "discovery.nats.token_env: environment variable DX_TEST_NATS_TOKEN (the NATS token) is not set"]
    monkeypatch.setenv("DX_TEST_ETCD_PW", "pw")
    monkeypatch.setenv("DX_TEST_NATS_TOKEN", "tok")
    assert _errors(data) == []
    assert _errors({"discovery": {"etcd": {"username": "root"}}}) == [
        "discovery.etcd: username and password_env must be given together"]


def test_combinations_dynamo_cannot_use_are_refused(pki, monkeypatch):
    monkeypatch.setenv("DX_TEST_ETCD_PW", "pw")
    https = ["https://127.0.0.1:2379"]
    # a password over TLS: the runtime drops TLS when ETCD_AUTH_USERNAME is set
    lines = _errors({"discovery": {"etcd": {"endpoints": https, "tls": _tls(pki), "username": "root",
                                            "password_env": "DX_TEST_ETCD_PW"}}})
    assert len(lines) == 1 and lines[0].startswith("discovery.etcd: not supported yet: username/password_env "
                                                   "together with tls"), lines
    # TLS without a client certificate: the runtime needs the CA, the cert and the key
    lines = _errors({"discovery": {"etcd": {"endpoints": https, "tls": {"ca_file": str(pki.ca)}}}})
    assert len(lines) == 1 and lines[0].startswith("discovery.etcd: not supported yet: tls needs ca_file, "
                                                   "cert_file and key_file"), lines
    # scheme and tls must agree
    assert _errors({"discovery": {"etcd": {"endpoints": ["http://127.0.0.1:2379"], "tls": _tls(pki)}}}) == [
        "discovery.etcd: with tls every endpoint must be an https:// URL"]
    assert _errors({"discovery": {"etcd": {"endpoints": https}}}) == [
        "discovery.etcd: https://127.0.0.1:2379 needs tls (ca_file, cert_file, key_file)"]
    assert _errors({"discovery": {"nats": {"url": "nats://127.0.0.1:4222", "tls": {"ca_file": str(pki.ca)}}}}) == [
        "discovery.nats: with tls the url must use tls:// (Dynamo's runtime requires it), got 'nats://127.0.0.1:4222'"]
    assert _errors({"discovery": {"nats": {"url": "tls://127.0.0.1:4222"}}})[0].startswith(
        "discovery.nats: tls://127.0.0.1:4222 needs tls")
    # what works: etcd mTLS (user = certificate CN), NATS TLS (+ client cert) + token; etcd http + password
    monkeypatch.setenv("DX_TEST_NATS_TOKEN", "tok")
    assert _errors({"discovery": {"etcd": {"endpoints": https, "tls": _tls(pki)},
                                  "nats": {"url": "tls://127.0.0.1:4222", "token_env": "DX_TEST_NATS_TOKEN",
                                           "tls": _tls(pki)}}}) == []
    assert _errors({"discovery": {"etcd": {"username": "root", "password_env": "DX_TEST_ETCD_PW"},
                                  "nats": {"url": "tls://127.0.0.1:4222", "tls": {"ca_file": str(pki.ca)}}}}) == []


def test_multinode_example_valid_with_its_files(pki, tmp_path, monkeypatch):
    """configs/disagg_multinode.yaml names cluster paths; with certificates at those keys and NATS_TOKEN set it is
    valid, and `config check` on the file as committed names each missing file (one line each, exit 2)."""
    data = yaml.safe_load((ROOT / "configs/disagg_multinode.yaml").read_text())
    for section in ("etcd", "nats"):
        data["discovery"][section]["tls"] = _tls(pki)
    monkeypatch.setenv("NATS_TOKEN", "tok")
    cfg = parse_config(data)
    assert cfg.discovery.etcd.tls is not None and cfg.discovery.nats.tls is not None
    env = {k: v for k, v in __import__("os").environ.items() if k != "NATS_TOKEN"}
    r = subprocess.run([sys.executable, "-m", "dynamo_ext.cli", "config", "check",
                        str(ROOT / "configs/disagg_multinode.yaml")], capture_output=True, text=True, timeout=60,
                       env=env)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
    out = r.stdout + r.stderr
    for key in ("discovery.etcd.tls.ca_file: no such file", "discovery.nats.token_env: environment variable NATS_TOKEN"):
        assert key in out, out


def test_load_config_file_with_tls(pki, tmp_path):
    path = tmp_path / "tls.yaml"
    path.write_text(yaml.safe_dump({"workers": {"agg": {}}, "discovery": {
        "etcd": {"endpoints": ["https://127.0.0.1:2379"], "tls": _tls(pki)}}}))
    assert load_config(path).discovery.etcd.tls.cert_file == str(pki.client_cert)
