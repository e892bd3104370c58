"""The dynamo.yaml router fields reach the router core (``workers.router.router_settings``): each field read,
a wrong value refused with the field's name. (What each setting does is tested on the core: tests/serving/.)"""

from __future__ import annotations

import pytest

from dynamo_ext.config import ConfigError, parse_config
from dynamo_ext.workers.router import router_settings

BASE = {"workers": {"prefill": {"count": 1}, "decode": {"count": 1}}}


def test_router_fields_reach_the_core(model_dir):
    router = {"policy": "dynamo-ext", "local_prefill": False, "work_weight": 0.5, "pending_ttl_s": 2.0,
              "shared_compute": True, "disagg_min_prompt_tokens": 7}
    s = router_settings(parse_config({**BASE, "router": router}), str(model_dir))
    assert (s.local_prefill, s.work_weight, s.pending_ttl_s, s.shared_compute, s.disagg_min_prompt_tokens) == \
        (False, 0.5, 2.0, True, 7)
    default = router_settings(parse_config(BASE), str(model_dir))
    assert (default.local_prefill, default.work_weight, default.pending_ttl_s, default.shared_compute) == \
        (True, 0.0, 0.0, False)


def test_a_wrong_shared_compute_value_names_the_field():
    with pytest.raises(ConfigError, match="shared_compute"):
        parse_config({**BASE, "router": {"shared_compute": "sometimes"}})
