"""Graph API: structure checks, config validation errors naming the key, start order, resolved links."""

from __future__ import annotations

import pytest

from dynamo_ext.config import parse_config
from dynamo_ext.launch.graph import Component, Graph, GraphError, load_graph

DISAGG = {"workers": {"prefill": {"count": 1}, "decode": {"count": 2}}, "router": {"policy": "dynamo-ext"}}
AGG = {"workers": {"agg": {"count": 2}}, "router": {"policy": "dynamo-kv"}}


def test_shipped_graphs_fit_shipped_configs():
    from dynamo_ext.config import load_config

    load_graph("graphs/disagg.py").validate(load_config("configs/disagg.yaml"))
    load_graph("graphs.agg").validate(load_config("configs/agg.yaml"))


def test_disagg_start_order_and_links():
    g = load_graph("graphs.disagg")
    cfg = parse_config(DISAGG)
    assert [(c.name, n) for c, n in g.plan(cfg)] == [("prefill", 1), ("decode", 2), ("router", 1), ("frontend", 1)]
    links = g.links(cfg)
    assert ("decode", "prefill", "kv") in links
    assert ("frontend", "router", "calls") in links and ("router", "decode", "calls") in links


def test_dynamo_kv_has_no_router_and_frontend_calls_workers():
    g = load_graph("graphs/disagg.py")
    cfg = parse_config({**DISAGG, "router": {"policy": "dynamo-kv"}})  # replicas > 1 is refused under dynamo-kv
    assert [c.name for c, _ in g.plan(cfg)] == ["prefill", "decode", "frontend"]
    assert {(a, b) for a, b, k in g.links(cfg) if k == "calls"} == {("frontend", "prefill"), ("frontend", "decode")}


def test_router_replicas_from_config():
    g = load_graph("graphs.agg")
    cfg = parse_config({"workers": {"agg": {"count": 1}}, "router": {"policy": "round-robin", "replicas": 3}})
    assert dict((c.name, n) for c, n in g.plan(cfg))["router"] == 3


def test_disagg_graph_needs_prefill_and_decode():
    g = load_graph("graphs.disagg")
    with pytest.raises(GraphError) as e:
        g.validate(parse_config(AGG))
    text = "\n".join(e.value.lines)
    assert "workers.prefill: required by graph 'disagg'" in text
    assert "workers.decode: required by graph 'disagg'" in text
    assert "workers.agg: not used by graph 'disagg'" in text


def test_zero_count_names_the_key():
    g = load_graph("graphs.disagg")
    cfg = parse_config({"workers": {"prefill": {"count": 0}, "decode": {"count": 1}}})
    assert g.errors(cfg) == ["workers.prefill.count: is 0; graph 'disagg' needs at least 1 prefill worker"]


def test_agg_graph_rejects_disagg_config():
    errs = load_graph("graphs/agg.py").errors(parse_config(DISAGG))
    assert errs[0].startswith("workers.agg: required by graph 'agg'")
    assert any(x.startswith("workers.prefill: not used") for x in errs)


def test_structure_errors():
    with pytest.raises(ValueError, match="unknown 'nope'"):
        Graph("g", (Component("a", "agg", depends_on=("nope",)),))
    with pytest.raises(ValueError, match="duplicate"):
        Graph("g", (Component("a", "agg"), Component("a", "decode")))
    with pytest.raises(ValueError, match="cycle"):
        Graph("g", (Component("a", "agg", depends_on=("b",)), Component("b", "router", depends_on=("a",))))


def test_load_graph_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_graph(str(tmp_path / "missing.py"))
    f = tmp_path / "empty.py"
    f.write_text("x = 1\n")
    with pytest.raises(ImportError, match="no module-level `graph`"):
        load_graph(str(f))
