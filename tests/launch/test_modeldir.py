"""launch/modeldir.py: the generated model directory is cached per (preset, seed, dtype, num_layers)."""

from __future__ import annotations

import json

from dynamo_ext.config import ModelConfig
from dynamo_ext.launch.modeldir import cached_dir, ensure_model_dir


def test_cache_key_has_the_layers(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAMO_EXT_CACHE", str(tmp_path))
    base = ModelConfig(preset="tiny")
    assert cached_dir(base) == tmp_path / "models" / "tiny-seed0-float32"  # unchanged without num_layers
    one = ModelConfig(preset="tiny", num_layers=1)
    three = ModelConfig(preset="tiny", num_layers=3, dtype="bfloat16")
    assert cached_dir(one).name == "tiny-seed0-float32-L1" and cached_dir(three).name == "tiny-seed0-bfloat16-L3"
    for m, layers, dtype in ((one, 1, "float32"), (three, 3, "bfloat16"), (base, 2, "float32")):
        d, how = ensure_model_dir(m)
        assert (d, how) == (cached_dir(m), "generated")
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["num_hidden_layers"] == layers and cfg["torch_dtype"] == dtype, cfg
        assert ensure_model_dir(m) == (d, "cached")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "tiny-seed0-bfloat16-L3", "tiny-seed0-float32", "tiny-seed0-float32-L1"]  # no temporary leftovers
