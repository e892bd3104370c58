"""STAND-IN for NVIDIA's ``aisimulate_core`` (not installable here). Tests only; never shipped.

Dynamo 1.6's planner imports ``aisimulate_core.sdk`` at module level (``core/perf_model/ais_adapter.py``,
``engine_query.py``); without it even ``dynamo.planner.plugins.types`` fails to import. This package
provides just enough for those imports to succeed. The AIS perf model itself is *not* simulated:
``RustForwardPassPerfModel.best_available`` raises ``ImportError``, which the planner catches and logs
("Failed to initialize AIS engine perf model"), so throughput/SLA scaling that needs the AIS estimator
stays off. dynamo_ext's own plugins do not use it. With the real package installed, the same code runs
and this directory is simply not put on ``sys.path``. See planner/README.md, "aisimulate_core".
"""

STANDIN = True
