"""STAND-IN for ``aisimulate_core.sdk`` (tests only, never shipped; see ``aisimulate_core/__init__.py``).

Provides the two names Dynamo 1.6's planner imports at module level:
- ``ForwardPassPerfModelConfig``: a dataclass with the fields the planner passes
  (model, system, backend, worker_type, estimation_mode, tp, pp, estimator_config) and
  ``from_legacy_engine_config(...)`` returning an object whose ``estimator_config`` is ``{}``.
- ``RustForwardPassPerfModel``: ``best_available`` / ``normalize_config`` raise ``ImportError``
  ("stand-in"), so the planner falls back exactly as when the native model is unavailable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STANDIN = True


@dataclass
class ForwardPassPerfModelConfig:
    model: str = ""
    system: str = "unprofiled"
    backend: str = "vllm"
    worker_type: str = "decode"
    estimation_mode: str = "fpm_regression"
    tp: int = 1
    pp: int = 1
    estimator_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_legacy_engine_config(cls, legacy: dict[str, Any], worker_type: str, options: Any = None) -> "ForwardPassPerfModelConfig":
        return cls(
            model=str(legacy.get("model_name", "")),
            system=str(legacy.get("system_name", "unprofiled")),
            backend=str(legacy.get("backend", "vllm")),
            worker_type=worker_type,
            tp=int(legacy.get("tp_size", 1) or 1),
            pp=int(legacy.get("pp_size", 1) or 1),
        )

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


class RustForwardPassPerfModel:
    """No native AIS model in the stand-in: every constructor path raises ImportError."""

    @classmethod
    def best_available(cls, config: dict[str, Any]) -> "RustForwardPassPerfModel":
        raise ImportError("aisimulate_core stand-in: no native AIS forward-pass perf model")

    @staticmethod
    def normalize_config(config_json: str) -> str:
        raise ImportError("aisimulate_core stand-in: no native AIS forward-pass perf model")
