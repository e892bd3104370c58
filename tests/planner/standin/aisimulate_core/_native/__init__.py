"""STAND-IN for ``aisimulate_core._native`` (tests only): re-exports the raising stand-in model."""

from aisimulate_core.sdk import RustForwardPassPerfModel

__all__ = ["RustForwardPassPerfModel"]
