"""Dynamo planner plugins for dynamo_ext (see README.md). Pure policies: no KV bytes, no NIXL, no torch.

    signals      Signals (one tick of plain data)          policy       ScalingPolicy (PROPOSE logic)
    constraints  constrain() ratio + link domains          metrics_source  TTFT/ITL/KV/transfer windows
    dynamo_plugins  SlaPropose, RatioLinkConstrain (Dynamo plugin adapters; need dynamo.planner)
    grpc_server  the adapters over Dynamo's plugin gRPC     executor     PlannerExecutor for `environment: virtual`

Importing this package imports nothing of Dynamo.
"""
