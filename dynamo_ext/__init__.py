"""dynamo_ext: disaggregated-serving extensions for NVIDIA Dynamo.

Layers (imports point down only; enforced by import-linter, see ``.importlinter``)::

    graphs/ configs/ deploy/   how a deployment is described and launched
    planner/                   Dynamo planner plugins (no KV bytes, no NIXL)
    dynamo_ext.cli             dynamo-ext serve | topology | bench | config | deploy
    dynamo_ext.workers         Dynamo components (the only layer that wires the others)
    dynamo_ext.routing         pure decisions
    dynamo_ext.engine          reference paged-KV engine
    dynamo_ext.kv              block hashing, pool, prefix cache, events, tiers
    dynamo_ext.topology        hardware facts -> TransportChoice per worker pair
    dynamo_ext.transport       NIXL and fallbacks: registration, plans, transfers
    dynamo_ext.discovery       etcd and NATS adapters
    dynamo_ext.config / metrics
"""

__version__ = "0.1.0"
