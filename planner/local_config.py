"""dynamo.yaml's `planner:` section -> the config file Dynamo's planner reads (for `dynamo-ext serve`).

    planner_config(cfg: DynamoExtConfig, metrics_urls=[...]) -> dict   # environment: virtual
    write_planner_config(path, cfg, metrics_urls) -> path               # YAML for PlannerProcess

Mapping (dynamo.yaml `planner:` -> Dynamo planner config / our plugin kwargs):

| dynamo.yaml                         | goes to                                                         |
|-------------------------------------|-----------------------------------------------------------------|
| interval_s                          | load_adjustment_interval_seconds (the tick)                      |
| min_/max_prefill, min_/max_decode   | SlaPropose and RatioLinkConstrain bounds                         |
| decode_prefill_ratio_min/_max       | RatioLinkConstrain min_ratio / max_ratio                         |
| cooldown_s                          | SlaPropose up_cooldown_s; down_cooldown_s = 2 x cooldown_s       |
| sla.ttft_ms, sla.itl_ms             | SlaPropose ttft_sla_s, itl_sla_s                                 |
| discovery.namespace                 | (DYN_NAMESPACE of the planner process, see PlannerProcess)       |
| model.name                          | model_name                                                       |

The other knobs keep the `PolicyConfig` defaults; edit the written file to tune them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dynamo_ext.config import DynamoExtConfig


def planner_config(cfg: DynamoExtConfig, metrics_urls: list[str] | None = None, backend: str = "mocker") -> dict[str, Any]:
    p = cfg.planner
    bounds = {"min_prefill": p.min_prefill, "max_prefill": p.max_prefill, "min_decode": p.min_decode, "max_decode": p.max_decode}
    return {
        "environment": "virtual",
        "backend": backend,
        "mode": "disagg" if cfg.disaggregated else "agg",
        "model_name": cfg.model.name,
        "optimization_target": "load",
        "enable_load_scaling": True,
        "enable_throughput_scaling": False,
        "decode_scale_up_kv_rate": 80,
        "decode_scale_down_kv_rate": 20,
        "prefill_scale_up_queue_tokens": 8192,
        "prefill_scale_down_queue_tokens": 512,
        "pre_deployment_sweeping_mode": "none",
        "load_adjustment_interval_seconds": int(round(p.interval_s)),
        "control_api_port": 0,
        "prefill_engine_num_gpu": 1,
        "decode_engine_num_gpu": 1,
        "plugin_registration": {"in_process_plugins": [
            {"module": "planner.dynamo_plugins", "class": "SlaPropose", "plugin_id": "dynamo-ext-sla-propose",
             "plugin_type": "propose", "priority": 5, "needs": ["observations.fpm", "observations.workers"],
             "kwargs": {**bounds, "ttft_sla_s": p.sla.ttft_ms / 1000.0, "itl_sla_s": p.sla.itl_ms / 1000.0,
                        "up_cooldown_s": p.cooldown_s, "down_cooldown_s": 2 * p.cooldown_s,
                        "metrics_urls": list(metrics_urls or [])}},
            {"module": "planner.dynamo_plugins", "class": "RatioLinkConstrain", "plugin_id": "dynamo-ext-ratio-links",
             "plugin_type": "constrain", "priority": 5, "needs": ["observations.workers"],
             "kwargs": {**bounds, "min_ratio": p.decode_prefill_ratio_min, "max_ratio": p.decode_prefill_ratio_max}},
        ]},
    }


def write_planner_config(path: Path, cfg: DynamoExtConfig, metrics_urls: list[str] | None = None) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(planner_config(cfg, metrics_urls), sort_keys=False))
    return path
