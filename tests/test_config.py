"""dynamo.yaml schema and `dynamo-ext config check` (real CLI in a subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dynamo_ext.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
# configs/planner.yaml is Dynamo's planner config (another schema, tested in tests/planner)
EXAMPLES = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "planner.yaml")
# valid on any host; disagg_multinode.yaml names cluster TLS files (tests/test_config_security.py checks it with
# certificates of its own)
LOCAL_EXAMPLES = [p for p in EXAMPLES if p.name != "disagg_multinode.yaml"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dynamo_ext.cli", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("path", LOCAL_EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(path):
    cfg = load_config(path)
    assert cfg.workers.decode or cfg.workers.agg


def test_expected_example_files_exist():
    assert {p.name for p in EXAMPLES} >= {"agg.yaml", "disagg.yaml", "disagg_multinode.yaml"}


def test_disagg_defaults_one_prefill_two_decode():
    cfg = load_config(ROOT / "configs/disagg.yaml")
    assert cfg.disaggregated and cfg.workers.prefill.count == 1 and cfg.workers.decode.count == 2


def _errors(data) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    return e.value.lines


def test_unknown_key_named_with_suggestion():
    lines = _errors({"workers": {"agg": {"count": 1}}, "kv_transfer": {"timeout": 5}})
    assert len(lines) == 1
    assert lines[0].startswith("kv_transfer.timeout: unknown key")
    assert "did you mean 'timeout_ms'" in lines[0]


def test_unknown_nested_key_and_top_level():
    lines = _errors({"workers": {"prefil": {"count": 1}, "decode": {}}, "routr": {}})
    assert any(l.startswith("workers.prefil:") and "'prefill'" in l for l in lines)
    assert any(l.startswith("routr:") and "'router'" in l for l in lines)


def test_literal_lists_allowed_values():
    lines = _errors({"workers": {"agg": {}}, "kv_transfer": {"transport": "infiniband"}})
    assert lines == ["kv_transfer.transport: 'infiniband' is not allowed (allowed: 'auto', 'nvlink', 'pcie', 'rdma', 'shm' or 'tcp')"]


def test_range_is_reported():
    lines = _errors({"workers": {"agg": {"count": -1}}, "kv_transfer": {"timeout_ms": 1}})
    assert "workers.agg.count: -1 is out of range (allowed range: >= 0)" in lines
    assert "kv_transfer.timeout_ms: 1 is out of range (allowed range: >= 10)" in lines


def test_every_bad_key_reported_at_once():
    data = {
        "kv_transfer": {"backend": "ucx", "transport_threads": 0},
        "workers": {"decode": {"gpu_type": "v100", "tensor_parallel": 3}},
        "router": {"policy": "random"},
        "discovery": {"nats": {"url": "http://x"}, "namespace": "Bad NS"},
    }
    lines = _errors(data)
    keys = {l.split(":", 1)[0] for l in lines}
    assert keys == {
        "kv_transfer.backend", "kv_transfer.transport_threads", "workers.decode.gpu_type",
        "workers.decode.tensor_parallel", "router.policy", "discovery.nats.url", "discovery.namespace",
    }  # fmt: skip


def test_workers_required_and_cross_field_rules():
    assert _errors({}) == ["workers: required key is missing"]
    lines = _errors({"workers": {"prefill": {"count": 1}}})
    assert lines and lines[0].startswith("workers:") and "workers.decode" in lines[0]
    lines = _errors({"workers": {"agg": {}}, "planner": {"min_decode": 5, "max_decode": 2}})
    assert lines == ["planner: min_decode (5) > max_decode (2)"]


def test_cli_check_valid_exit_0():
    r = cli("config", "check", *map(str, LOCAL_EXAMPLES))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(": OK") == len(LOCAL_EXAMPLES)


def test_cli_check_invalid_exit_2_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"workers": {"prefil": {"count": 1}, "decode": {"count": "two"}}}))
    r = cli("config", "check", str(bad))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert any("workers.prefil: unknown key (did you mean 'prefill'?" in l for l in lines)
    assert any("workers.decode.count:" in l for l in lines)


def test_cli_check_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("workers: [1\n")
    r = cli("config", "check", str(bad), str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "invalid YAML" in r.stderr and "line 2" in r.stderr
    assert "cannot read file" in r.stderr


def test_cli_show_fills_defaults():
    r = cli("config", "show", str(ROOT / "configs/agg.yaml"))
    assert r.returncode == 0
    shown = yaml.safe_load(r.stdout)
    assert shown["kv_transfer"]["timeout_ms"] == 2000 and shown["planner"]["enabled"] is False


def test_model_num_layers_presets_only():
    cfg = parse_config({"workers": {"agg": {}}, "model": {"preset": "llama3-8b-shape", "num_layers": 8}})
    assert cfg.model.num_layers == 8
    assert parse_config({"workers": {"agg": {}}}).model.num_layers is None  # None: the preset's
    assert _errors({"workers": {"agg": {}}, "model": {"num_layers": 0}}) == [
        "model.num_layers: 0 is out of range (allowed range: >= 1)"]
    lines = _errors({"workers": {"agg": {}}, "model": {"path": "/models/x", "num_layers": 4}})
    assert len(lines) == 1 and lines[0].startswith("model.num_layers: ") and "model.path" in lines[0], lines


def test_a_cluster_config_checks_its_fields_without_this_hosts_files(tmp_path, monkeypatch):
    """configs/disagg_multinode.yaml names TLS files and a token variable of the cluster: `config check` fails here
    naming them; `--no-host-checks` validates fields and values only (what scripts/main.sh runs), and still fails
    on a wrong value."""
    monkeypatch.delenv("NATS_TOKEN", raising=False)
    path = str(ROOT / "configs/disagg_multinode.yaml")
    strict = cli("config", "check", path)
    assert strict.returncode == 2 and "no such file" in strict.stderr and "NATS_TOKEN" in strict.stderr
    loose = cli("config", "check", "--no-host-checks", path)
    assert loose.returncode == 0, loose.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(path).read().replace("policy: dynamo-ext", "policy: fastest", 1))
    wrong = cli("config", "check", "--no-host-checks", str(bad))
    assert wrong.returncode == 2 and "router" in wrong.stderr, wrong.stderr
    assert cli("config", "check", "--no-host-checks", "--connect", path).returncode == 2
