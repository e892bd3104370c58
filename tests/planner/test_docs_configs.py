"""The planner configs in deploy/planner-kubernetes.md and configs/planner.yaml validate with Dynamo's PlannerConfig."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

pytest.importorskip("dynamo.planner.config.planner_config", reason="needs dynamo-ext[planner] deps (see planner/README.md)")

from dynamo.planner.config.planner_config import PlannerConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_configs_planner_yaml_validates():
    c = PlannerConfig.model_validate(yaml.safe_load((ROOT / "configs/planner.yaml").read_text()))
    assert c.environment == "virtual"
    assert [s.class_ for s in c.plugin_registration.in_process_plugins] == ["SlaPropose", "RatioLinkConstrain"]


def test_kubernetes_doc_configs_validate():
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "deploy/planner-kubernetes.md").read_text(), re.S)
    route_a = yaml.safe_load(blocks[0])
    a = PlannerConfig.model_validate(route_a)
    assert a.environment == "kubernetes" and len(a.plugin_registration.in_process_plugins) == 2
    subst = {"<token from a Secret>": "tok", "<token>": "tok", "<ns>": "ns"}
    text_b = blocks[3]
    for k, v in subst.items():
        text_b = text_b.replace(k, v)
    base = {k: v for k, v in route_a.items() if k != "plugin_registration"}
    b = PlannerConfig.model_validate({**base, **yaml.safe_load(text_b)})
    assert [e.plugin_id for e in b.scheduling.external_plugins] == ["dynamo-ext-sla-propose", "dynamo-ext-ratio-links"]


def test_dynamo_yaml_planner_section_becomes_a_valid_planner_config(tmp_path):
    from dynamo_ext.config import load_config
    from planner.dynamo_plugins import RatioLinkConstrain, SlaPropose
    from planner.local_config import write_planner_config

    cfg = load_config(ROOT / "configs/disagg.yaml")
    path = write_planner_config(tmp_path / "planner.yaml", cfg, ["http://127.0.0.1:8000/metrics"])
    pc = PlannerConfig.model_validate(yaml.safe_load(path.read_text()))
    assert pc.environment == "virtual" and pc.mode == "disagg"
    propose, constrain = pc.plugin_registration.in_process_plugins
    sla = SlaPropose(**propose.kwargs)
    assert sla.policy.config.ttft_sla_s == cfg.planner.sla.ttft_ms / 1000 and sla.policy.config.up_cooldown_s == cfg.planner.cooldown_s
    rl = RatioLinkConstrain(**constrain.kwargs)
    assert (rl.config.min_ratio, rl.config.max_ratio) == (2.0, 3.0)
