"""Writes ``dynamo-ext-dashboard.json`` (Grafana dashboard JSON, schema 39) next to this file.

    .venv/bin/python deploy/observability/make_dashboard.py [--check]

The JSON is committed; ``--check`` exits 1 when the committed file differs from what this script writes
(``tests/test_observability_assets.py`` runs the same comparison). Every query reads series that a
disaggregated dynamo_ext graph exports: our ``dynamo_ext_*`` series from each worker's and router's Dynamo
system status server (``DYN_SYSTEM_PORT``: labels ``dynamo_namespace``, ``dynamo_component``,
``dynamo_endpoint``, ``worker_id``, ``model``) and Dynamo's frontend's ``dynamo_frontend_*`` series (its HTTP
port). Written as plain JSON (no dashboard SDK dependency).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("dynamo-ext-dashboard.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
NS = 'dynamo_namespace=~"$namespace"'
MODEL = 'model=~"$model"'
RI = "[$__rate_interval]"


def ttft_mean(metric: str, sel: str) -> str:
    return f"sum(rate({metric}_sum{{{sel}}}{RI})) / sum(rate({metric}_count{{{sel}}}{RI}))"


# (title, unit, description, [(expr, legend)], width)
PANELS: list[tuple[str, str, str, list[tuple[str, str]], int]] = [
    ("KV transfer throughput by path and backend", "GBs",
     "GB/s of KV pulled by decode workers (transport metrics), per memory path (host->host, device->device, ...) "
     "and transport backend (nixl, cma, cuda_ipc, tcp).",
     [(f"sum by (path, backend) (rate(dynamo_ext_kv_transfer_bytes_total{{{NS}}}{RI})) / 1e9", "{{path}} {{backend}}")],
     12),
    ("KV transfer time by path and backend", "s",
     "Mean wall time of one KV transfer (pull), and its p99.",
     [(f"sum by (path, backend) (rate(dynamo_ext_kv_transfer_seconds_sum{{{NS}}}{RI})) / "
       f"sum by (path, backend) (rate(dynamo_ext_kv_transfer_seconds_count{{{NS}}}{RI}))", "mean {{path}} {{backend}}"),
      (f"histogram_quantile(0.99, sum by (le, path, backend) (rate(dynamo_ext_kv_transfer_seconds_bucket{{{NS}}}{RI})))",
       "p99 {{path}} {{backend}}")],
     12),
    ("KV transfer share of TTFT", "percentunit",
     "Mean KV pull time / mean time to first token at the frontend: the part of TTFT spent moving KV between "
     "prefill and decode workers (requests prefilled locally count in TTFT but have no pull).",
     [(f"({ttft_mean('dynamo_ext_kv_transfer_seconds', NS)}) / "
       f"({ttft_mean('dynamo_frontend_time_to_first_token_seconds', MODEL)})", "transfer / TTFT")],
     8),
    ("Time to first token", "s",
     "Frontend TTFT percentiles (Dynamo's dynamo_frontend_time_to_first_token_seconds), and the router's own "
     "(arrival at the router -> first token back).",
     [(f"histogram_quantile(0.5, sum by (le) (rate(dynamo_frontend_time_to_first_token_seconds_bucket{{{MODEL}}}{RI})))",
       "p50 frontend"),
      (f"histogram_quantile(0.99, sum by (le) (rate(dynamo_frontend_time_to_first_token_seconds_bucket{{{MODEL}}}{RI})))",
       "p99 frontend"),
      (f'histogram_quantile(0.5, sum by (le) (rate(dynamo_ext_worker_ttft_seconds_bucket{{{NS}, dynamo_component="router"}}'
       f"{RI})))", "p50 router")],
     8),
    ("Time per output token", "s",
     "Inter-token latency at the frontend (dynamo_frontend_inter_token_latency_seconds) and the decode workers' "
     "TPOT per request.",
     [(f"histogram_quantile(0.5, sum by (le) (rate(dynamo_frontend_inter_token_latency_seconds_bucket{{{MODEL}}}{RI})))",
       "p50 ITL frontend"),
      (f"histogram_quantile(0.99, sum by (le) (rate(dynamo_frontend_inter_token_latency_seconds_bucket{{{MODEL}}}{RI})))",
       "p99 ITL frontend"),
      (f'histogram_quantile(0.5, sum by (le) (rate(dynamo_ext_worker_tpot_seconds_bucket{{{NS}, dynamo_component="backend"}}'
       f"{RI})))", "p50 TPOT decode")],
     8),
    ("Prefix cache hit rate", "percentunit",
     "Prompt tokens served from an engine's prefix cache / prompt tokens prefilled, from the engines' own counters "
     "(prefill workers, and decode or aggregated workers that prefill locally); and for pulls, the prompt tokens a "
     "decode worker found in its own cache and did not read / the pulled handles' prompt tokens.",
     [(f"sum by (dynamo_component) (rate(dynamo_ext_engine_prefill_cached_tokens_total{{{NS}}}{RI})) / "
       f"sum by (dynamo_component) (rate(dynamo_ext_engine_prefill_prompt_tokens_total{{{NS}}}{RI}))",
       "prefill {{dynamo_component}}"),
      (f"sum (rate(dynamo_ext_engine_pull_cached_tokens_total{{{NS}}}{RI})) / "
       f"sum (rate(dynamo_ext_engine_pull_prompt_tokens_total{{{NS}}}{RI}))", "pull (decode)")],
     8),
    ("Routing decisions by reason", "reqps",
     "dynamo_ext router: why each request went where it went (routing.decide's reason).",
     [(f"sum by (reason) (rate(dynamo_ext_router_decisions_total{{{NS}}}{RI}))", "{{reason}}")],
     8),
    ("Migrations and local prefills", "short",
     "Running requests moved to another decode worker (router: move = KV pulled, recompute, rebalance) and decode "
     "workers' local prefills by reason (a failed or skipped pull).",
     [(f"sum by (kind) (increase(dynamo_ext_router_migrations_total{{{NS}}}{RI}))", "migration {{kind}}"),
      (f"sum by (reason) (increase(dynamo_ext_worker_local_prefill_total{{{NS}}}{RI}))", "local prefill {{reason}}")],
     8),
    ("KV cache usage", "percentunit",
     "Share of each engine worker's KV blocks in use.",
     [(f'max by (dynamo_component, worker_id) (dynamo_ext_kv_cache_usage_perc{{{NS}, dynamo_component!="router"}})',
       "{{dynamo_component}} {{worker_id}}")],
     8),
    ("Queue depth", "short",
     "Requests waiting for admission in each engine, and requests running.",
     [(f'sum by (dynamo_component, worker_id) (dynamo_ext_worker_queue_length{{{NS}, dynamo_component!="router"}})',
       "waiting {{dynamo_component}} {{worker_id}}"),
      (f'sum by (dynamo_component, worker_id) (dynamo_ext_worker_running_requests{{{NS}, dynamo_component!="router"}})',
       "running {{dynamo_component}} {{worker_id}}")],
     8),
    ("Held KV handles (prefill)", "short",
     "Prefilled KV waiting to be pulled by a decode worker.",
     [(f'sum by (worker_id) (dynamo_ext_worker_held_kv_handles{{{NS}, dynamo_component="prefill"}})', "{{worker_id}}")],
     8),
    ("KV transfer errors", "short",
     "Failed KV transfers by backend and error type, and pulls whose KV was not used by outcome.",
     [(f"sum by (backend, error) (increase(dynamo_ext_kv_transfer_errors_total{{{NS}}}{RI}))", "{{backend}} {{error}}"),
      (f'sum by (outcome) (increase(dynamo_ext_worker_kv_pulls_total{{{NS}, outcome!="ok"}}{RI}))', "pull {{outcome}}")],
     8),
    ("Requests by component and outcome", "reqps",
     "Requests finished by our router and workers (dynamo_ext_worker_requests_total), and Dynamo's own per-endpoint "
     "request counter (dynamo_component_requests_total) beside them.",
     [(f"sum by (dynamo_component, outcome) (rate(dynamo_ext_worker_requests_total{{{NS}}}{RI}))",
       "{{dynamo_component}} {{outcome}}"),
      (f'sum by (dynamo_component) (rate(dynamo_component_requests_total{{{NS}, dynamo_endpoint=~"generate|prefill"}}{RI}))',
       "dynamo {{dynamo_component}}")],
     8),
]


def panel(pid: int, x: int, y: int, title: str, unit: str, desc: str, targets: list[tuple[str, str]], w: int) -> dict[str, Any]:
    return {
        "id": pid, "type": "timeseries", "title": title, "description": desc, "datasource": DS,
        "gridPos": {"h": 8, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 0}},
                        "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
                    for i, (expr, legend) in enumerate(targets)],
    }


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": DS, "definition": query,
            "query": {"query": query, "refId": f"{name}-values"}, "refresh": 2, "includeAll": True, "multi": True,
            "allValue": ".*", "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1}


def dashboard() -> dict[str, Any]:
    panels, x, y, pid = [], 0, 0, 1
    for title, unit, desc, targets, w in PANELS:
        if x + w > 24:
            x, y = 0, y + 8
        panels.append(panel(pid, x, y, title, unit, desc, targets, w))
        x, pid = x + w, pid + 1
    return {
        "uid": "dynamo-ext-disagg", "title": "dynamo_ext: disaggregated serving",
        "description": "KV transfer, TTFT/TPOT, prefix hits, routing decisions, migrations, KV usage and queues of a "
                       "dynamo_ext graph (deploy/observability/README.md).",
        "tags": ["dynamo", "dynamo_ext", "disaggregated"], "editable": True, "graphTooltip": 1,
        "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-30m", "to": "now"},
        "timezone": "", "fiscalYearStartMonth": 0, "liveNow": False, "annotations": {"list": []}, "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "regex": ""},
            variable("namespace", "Dynamo namespace", "label_values(dynamo_ext_worker_info, dynamo_namespace)"),
            variable("model", "Model", "label_values(dynamo_ext_worker_info, model)"),
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        same = OUT.exists() and OUT.read_text() == text
        print(f"{OUT}: {'up to date' if same else 'differs from make_dashboard.py: run it'}")
        return 0 if same else 1
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(PANELS)} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
