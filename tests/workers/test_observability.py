"""Observable like Dynamo (issue 16.4-6), on a real disaggregated graph (frontend + router + 1 prefill + 1 decode,
tiny model) started by ``launch_graph`` with ``DYN_LOGGING_JSONL=1``, after one completion:

* every worker and router serves Dynamo's system status server (its URL in /health "system", on loopback):
  /live and /health 200 ``ready``; /metrics has Dynamo's ``dynamo_component_*`` series and our ``dynamo_ext_*``
  series beside them, each labelled dynamo_namespace / dynamo_component / dynamo_endpoint / worker_id (= the
  instance id in hex, as Dynamo writes it) / model;
* the values agree with the processes' own accounts: router decisions by reason == its /health decisions, KV
  transfer bytes by backend and path == the bytes the decode worker used == the bytes on its transfer log line,
  the prefill engine's prompt tokens == the request's prompt tokens;
* every metric name of every panel of the committed Grafana dashboard is exported by the graph's endpoints;
* every line the worker and router processes wrote (stdout and stderr share the log) parses as JSON, the ready
  line included (the launcher read instance ids and metrics URLs from it), and the KV transfer line carries
  request id, worker, peer, path, bytes and seconds.

Then a draining decode worker (SIGTERM with a stream running, no other decode worker to migrate to): our /health
503 ``stopping`` and Dynamo's system /health not 200 while /live stays 200, until it exits.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from dynamo_ext.launch import launch_graph
from dynamo_ext.launch.client import complete
from dynamo_ext.launch.infra import free_port

REPO = Path(__file__).resolve().parents[2]
PROMPT = ("The quick brown fox jumps over the lazy dog and keeps running through the forest until night falls "
          "and the stars come out over the quiet hills where nobody walks") * 2
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
DYNAMO_LABELS = ("dynamo_namespace", "dynamo_component", "dynamo_endpoint", "worker_id", "model")


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:
        return 0, repr(e)


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m and not line.startswith("#"):
            out.append((m[1], dict(LABEL.findall(m[2] or "")), float(m[3])))
    return out


def _families(text: str) -> set[str]:
    """Sample names, and every name a family declared with # TYPE can have (a labelled counter nobody has
    incremented yet has no sample: dynamo_ext_kv_transfer_errors_total)."""
    names = {s[0] for s in _samples(text)}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            fam = line.split()[2]
            names |= {fam, f"{fam}_total", f"{fam}_bucket", f"{fam}_sum", f"{fam}_count"}
    return names


def _total(samples, name: str, **match: str) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in match.items()))


def metric_names(promql: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers outside label matchers ``{...}`` and grouping
    clauses ``by (...)`` / ``without (...)`` (label names), and the first argument of ``label_values``."""
    q = re.sub(r"\{[^}]*\}", "", promql)
    q = re.sub(r"\b(by|without)\s*\([^)]*\)", "", q)
    q = re.sub(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,[^)]*\)", r"\1", q)
    return set(re.findall(r"\b(dynamo_[a-z0-9_]+)\b", q))


def _dashboard_metrics() -> dict[str, set[str]]:
    d = json.loads((REPO / "deploy/observability/dynamo-ext-dashboard.json").read_text())
    out: dict[str, set[str]] = {}
    for p in d["panels"]:
        for t in p["targets"]:
            out.setdefault(p["title"], set()).update(metric_names(t["expr"]))
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            out.setdefault(f"variable {v['name']}", set()).update(metric_names(v["definition"]))
    assert all(out.values()) and len(out) >= 10, out
    return out


def test_disagg_graph_observable_like_dynamo(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAMO_EXT_CACHE", str(tmp_path / "cache"))
    ns = "obsv"
    cfg = {
        "model": {"name": "dynamo-ext/tiny", "preset": "tiny", "block_size": 16},
        "workers": {"prefill": {"count": 1}, "decode": {"count": 1}, "migrate_on_drain": False},
        "router": {"policy": "dynamo-ext", "disagg_min_prompt_tokens": 16},
        "discovery": {"namespace": ns, "etcd": {"endpoints": [f"http://127.0.0.1:{free_port()}"]},
                      "nats": {"url": f"nats://127.0.0.1:{free_port()}"}},
    }
    with launch_graph("graphs/disagg.py", cfg, log_dir=tmp_path / "logs", ready_timeout=180,
                      env={"DYN_LOGGING_JSONL": "1"}) as g:
        resp = complete(g.base_url, g.model, PROMPT, 8)
        assert resp["usage"]["completion_tokens"] == 8
        workers = {c.role: c for c in g.children if c.role in ("prefill", "decode", "router")}
        assert set(workers) == {"prefill", "decode", "router"}
        # the launcher parsed the JSON ready lines
        assert all(c.instance_id and c.metrics_url.startswith("http://127.0.0.1:") for c in workers.values())
        time.sleep(0.6)  # one load tick of the engine workers' gauges

        texts, health = {}, {}
        for role, c in workers.items():
            base = c.metrics_url.rsplit("/", 1)[0]
            code, body = _get(base + "/health")
            assert code == 200, body
            health[role] = json.loads(body)
            assert _get(base + "/live")[0] == 200
            sysurl = health[role].get("system")
            assert sysurl and sysurl.startswith("http://127.0.0.1:"), health[role]
            for path in ("/live", "/health"):
                code, body = _get(sysurl + path)
                assert code == 200 and json.loads(body)["status"] == "ready", (role, path, body)
            code, texts[role] = _get(sysurl + "/metrics")
            assert code == 200
            samples = _samples(texts[role])
            component = {"router": "router", "prefill": "prefill", "decode": "backend"}[role]
            endpoint = "prefill" if role == "prefill" else "generate"
            want = {"dynamo_namespace": ns, "dynamo_component": component, "dynamo_endpoint": endpoint,
                    "worker_id": format(c.instance_id, "x"), "model": g.model}
            ours = [(n, lab) for n, lab, _ in samples if n.startswith("dynamo_ext_")]
            assert len(ours) > 20, role
            for n, lab in ours:
                assert {k: lab.get(k) for k in DYNAMO_LABELS} == want, (role, n, lab)
            # Dynamo's own series of the same process, same identity labels
            theirs = [lab for n, lab, _ in samples if n == "dynamo_component_requests_total"
                      and lab.get("dynamo_endpoint") == endpoint]
            assert theirs and all(lab["worker_id"] == want["worker_id"] and lab["dynamo_component"] == component
                                  for lab in theirs), (role, theirs)

        r = _samples(texts["router"])
        routed = {lab["reason"]: v for n, lab, v in r if n == "dynamo_ext_router_decisions_total"}
        assert sum(routed.values()) == 1 and routed == health["router"]["decisions"], (routed, health["router"])
        assert {lab["kind"] for n, lab, _ in r if n == "dynamo_ext_router_migrations_total"} == \
            {"move", "recompute", "rebalance"}

        d = _samples(texts["decode"])
        by_route = {(lab["backend"], lab["path"]): v for n, lab, v in d if n == "dynamo_ext_kv_transfer_bytes_total"}
        used = _total(d, "dynamo_ext_worker_kv_pulled_bytes_total")
        assert used > 0 and sum(by_route.values()) == used, (by_route, used)
        assert _total(d, "dynamo_ext_kv_cache_usage_perc") >= 0 and any(n == "dynamo_ext_worker_queue_length"
                                                                        for n, _, _ in d)
        assert _total(d, "dynamo_ext_engine_pulls_total") == 1
        assert _total(d, "dynamo_ext_engine_pull_prompt_tokens_total") == resp["usage"]["prompt_tokens"]
        p = _samples(texts["prefill"])
        assert _total(p, "dynamo_ext_engine_prefill_prompt_tokens_total") == resp["usage"]["prompt_tokens"]
        assert _total(p, "dynamo_ext_engine_prefills_total") == 1

        # every metric of every dashboard panel is exported by this graph
        code, front = _get(g.base_url + "/metrics")
        assert code == 200
        exported = set().union(*(_families(t) for t in texts.values()), _families(front))
        missing = {title: sorted(m - exported) for title, m in _dashboard_metrics().items() if m - exported}
        assert not missing, missing

        # logs: every line of the worker and router processes is a JSON object
        for role, c in workers.items():
            lines = [ln for ln in c.log_path.read_text(errors="replace").splitlines() if ln.strip()]
            bad = []
            for ln in lines:
                try:
                    assert isinstance(json.loads(ln), dict)
                except (ValueError, AssertionError):
                    bad.append(ln)
            assert len(lines) > 10 and not bad, (role, bad[:5])
        moved = [json.loads(ln) for ln in workers["decode"].log_path.read_text().splitlines()
                 if "kv transfer received" in ln]
        assert len(moved) == 1, moved
        t = moved[0]
        assert t["peer"] == workers["prefill"].instance_id and t["request_id"] and t["worker"].startswith("decode-")
        assert (t["backend"], t["path"]) in by_route and t["bytes"] == used and 0 < t["seconds"] < 10, t

        # draining: SIGTERM to the only decode worker while it streams (migration off): not ready, still live
        dec = workers["decode"]
        base = dec.metrics_url.rsplit("/", 1)[0]
        sysurl = health["decode"]["system"]
        body = json.dumps({"model": g.model, "prompt": "drain", "max_tokens": 1500, "ignore_eos": True}).encode()
        done: list = []

        def _stream() -> None:
            req = urllib.request.Request(g.base_url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                done.append(json.loads(r.read()))

        th = threading.Thread(target=_stream, daemon=True)
        th.start()
        t_end = time.monotonic() + 30
        while time.monotonic() < t_end and json.loads(_get(base + "/health")[1]).get("running", 0) < 1:
            time.sleep(0.02)
        os.kill(dec.pid, signal.SIGTERM)
        seen = []
        while time.monotonic() < t_end:
            code, h = _get(base + "/health", timeout=1)
            if code == 0:  # exited
                break
            seen.append((code, json.loads(h).get("status"), _get(base + "/live", timeout=1)[0],
                         _get(sysurl + "/health", timeout=1)[0]))
            time.sleep(0.05)
        th.join(timeout=60)
        draining = [s for s in seen if s[1] == "stopping"]
        assert draining, seen
        assert all(code == 503 and live == 200 and sys_health != 200 for code, _, live, sys_health in draining), seen
        assert done and done[0]["usage"]["completion_tokens"] == 1500  # the stream drained, not cut
