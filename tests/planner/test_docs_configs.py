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
