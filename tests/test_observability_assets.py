"""Observability pieces without a graph: the committed Grafana dashboard is what its generator writes, the
Prometheus config passes promtool, the log formats (JSON lines under DYN_LOGGING_JSONL, Rust's text layout
otherwise) and the readiness line in both forms as the launcher parses it, /live and /health of our metrics
server, counters read at scrape time. The graph-level checks (system port, labels, every dashboard metric
present, every log line JSON) are in tests/workers/test_observability.py."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from dynamo_ext import logfmt
from dynamo_ext.launch.supervisor import ready_line
from dynamo_ext.metrics import CountersCollector, MetricsServer

REPO = Path(__file__).resolve().parents[1]
OBS = REPO / "deploy" / "observability"


def _load_generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_dashboard", OBS / "make_dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_dashboard_is_the_generators_output_and_well_formed():
    gen = _load_generator()
    committed = (OBS / "dynamo-ext-dashboard.json").read_text()
    assert committed == gen.render(), "run: .venv/bin/python deploy/observability/make_dashboard.py"
    d = json.loads(committed)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) == len(gen.PANELS) >= 10
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            assert t["datasource"]["uid"] == "${datasource}"
    names = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "namespace", "model"} <= names
    # the panels the issue asks for
    titles = " | ".join(p["title"] for p in d["panels"]).lower()
    for want in ("throughput by path and backend", "share of ttft", "time to first token", "time per output token",
                 "prefix cache hit rate", "decisions by reason", "migrations", "kv cache usage", "queue depth"):
        assert want in titles, want


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (Debian: apt-get install --no-install-recommends prometheus)")
def test_prometheus_config_passes_promtool():
    r = subprocess.run(["promtool", "check", "config", str(OBS / "prometheus.yml")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "SUCCESS" in r.stdout + r.stderr, r.stdout + r.stderr


def _record(logger: str, msg: str, *args, level=logging.INFO, exc=None, **extra) -> logging.LogRecord:
    rec = logging.getLogger(logger).makeRecord(logger, level, "/x/y.py", 12, msg, args, exc, extra=extra or None)
    return rec


def test_json_line_has_dynamo_schema_and_extra_fields():
    f = logfmt.JsonLineFormatter()
    line = f.format(_record("dynamo_ext.serving.worker", "kv transfer received: bytes=%d", 172032, request_id="r-1",
                            worker="decode-7", peer=5, path="host->host", bytes=172032, seconds=0.00027))
    obj = json.loads(line)
    assert "\n" not in line
    assert obj["level"] == "INFO" and obj["target"] == "dynamo_ext.serving.worker"
    assert obj["message"] == "kv transfer received: bytes=172032"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", obj["time"]), obj["time"]
    assert (obj["request_id"], obj["worker"], obj["peer"], obj["path"], obj["bytes"], obj["seconds"]) == \
        ("r-1", "decode-7", 5, "host->host", 172032, 0.00027)
    assert json.loads(f.format(_record("x", "careful", level=logging.WARNING)))["level"] == "WARN"  # Rust's word
    try:
        raise ValueError("boom")
    except ValueError:
        rec = _record("x", "failed", level=logging.ERROR, exc=sys.exc_info())
    out = json.loads(f.format(rec))
    assert out["level"] == "ERROR" and out["message"].startswith("failed\nTraceback") and "ValueError: boom" in out["message"]


def test_text_line_is_rusts_compact_layout_without_colour():
    line = logfmt.TextLineFormatter().format(_record("dynamo_ext.workers", "stop requested"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z  INFO dynamo_ext\.workers: stop requested", line), line
    assert "\x1b" not in line


def test_switch_and_level_follow_dynamos_variables():
    assert logfmt.jsonl_enabled({"DYN_LOGGING_JSONL": "1"}) and logfmt.jsonl_enabled({"DYN_LOGGING_JSONL": "true"})
    assert not logfmt.jsonl_enabled({}) and not logfmt.jsonl_enabled({"DYN_LOGGING_JSONL": "0"})
    assert logfmt.log_level({"DYN_LOG": "debug"}) == logging.DEBUG
    assert logfmt.log_level({"DYN_LOG": "warn,dynamo_runtime=debug"}) == logging.WARNING
    assert logfmt.log_level({"DYN_LOG": "debug", "DYNAMO_EXT_LOG_LEVEL": "ERROR"}) == logging.ERROR
    assert logfmt.log_level({}) == logging.INFO


class _Child:
    def __init__(self, lines):
        self._lines, self.ready_info = lines, {}

    def new_lines(self):
        return self._lines


@pytest.mark.parametrize("jsonl", [False, True])
def test_ready_line_both_forms_parse_in_the_launcher(monkeypatch, jsonl):
    if jsonl:
        monkeypatch.setenv("DYN_LOGGING_JSONL", "1")
    else:
        monkeypatch.delenv("DYN_LOGGING_JSONL", raising=False)
    fields = {"role": "decode", "instance_id": 6656217184252256524, "metrics": "http://127.0.0.1:38565/metrics",
              "system": "http://127.0.0.1:25883"}
    text = logfmt.ready_line_text(fields)
    assert text.startswith("{") == jsonl
    if jsonl:
        assert json.loads(text)["message"].startswith("DYNAMO_EXT_READY role=decode ")
    for line in (text, "half a line of another writer " + text):  # stdout and stderr share the log
        child = _Child(["noise", line])
        assert ready_line("DYNAMO_EXT_READY")(child)
        assert child.ready_info == {k: str(v) for k, v in fields.items()}
    # a JSON log line that merely mentions the prefix elsewhere is not a ready line
    other = json.dumps({"time": "t", "level": "INFO", "target": "x", "message": "waiting for DYNAMO_EXT_READY"})
    assert not ready_line("DYNAMO_EXT_READY")(_Child([other]))


def test_configure_writes_one_json_object_per_line_to_fd2(monkeypatch, tmp_path):
    """configure() in a child process with DYN_LOGGING_JSONL: its log records, a warning and an uncaught
    exception all come out on stderr as JSON lines."""
    code = ("import logging, warnings; from dynamo_ext import logfmt; logfmt.configure(); "
            "logging.getLogger('dynamo_ext.t').info('hello %s', 'there', extra={'request_id': 'r9'}); "
            "warnings.warn('careful'); raise RuntimeError('uncaught')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                       env={"DYN_LOGGING_JSONL": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 1
    objs = [json.loads(ln) for ln in r.stderr.splitlines()]
    assert [o["level"] for o in objs] == ["INFO", "WARN", "ERROR"], r.stderr
    assert objs[0]["message"] == "hello there" and objs[0]["request_id"] == "r9"
    assert "careful" in objs[1]["message"] and "RuntimeError: uncaught" in objs[2]["message"]


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_metrics_server_live_always_health_503_unless_ok():
    state = {"status": "ok"}
    srv = MetricsServer("127.0.0.1", 0, lambda: dict(state), registry=CollectorRegistry())
    try:
        base = srv.url.rsplit("/", 1)[0]
        assert _get(base + "/health") == (200, {"status": "ok"})
        for status in ("stopping", "registration_lost"):
            state["status"] = status
            assert _get(base + "/health") == (503, {"status": status})
            code, live = _get(base + "/live")
            assert code == 200 and live["status"] == "live"
    finally:
        srv.close()


def test_counters_collector_reads_at_scrape_time_and_skips_failing_sources():
    reg = CollectorRegistry()
    decisions: dict[str, int] = {}

    def broken():
        raise LookupError("not ready")

    reg.register(CountersCollector([("dx_decisions", "d", "reason", lambda: dict(decisions)),
                                    ("dx_broken", "b", "", broken),
                                    ("dx_tokens", "t", "", lambda: {"": 7})]))
    decisions["disagg_cheaper"] = 3
    text = generate_latest(reg).decode()
    assert 'dx_decisions_total{reason="disagg_cheaper"} 3.0' in text and "dx_tokens_total 7.0" in text
    assert "dx_broken" not in text
    decisions["local_cheaper"] = 1
    assert reg.get_sample_value("dx_decisions_total", {"reason": "local_cheaper"}) == 1
