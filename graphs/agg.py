"""Aggregated graph: every worker does prefill and decode.

    client -> frontend -> router (x router.replicas) -> agg (x workers.agg.count)

Under ``router.policy: dynamo-kv`` there is no router process: the workers register the model and
the frontend routes to them with Dynamo's KV router (``frontend -> agg``).

    dynamo-ext serve graphs/agg.py -f configs/agg.yaml
"""

from dynamo_ext.launch.graph import Component, Graph

graph = Graph(
    name="agg",
    description="aggregated workers behind the frontend (and our router unless router.policy is dynamo-kv)",
    components=(
        Component("agg", role="agg", count_key="workers.agg.count"),
        Component("router", role="router", count_key="router.replicas", depends_on=("agg",),
                  policies=("dynamo-ext", "round-robin")),
        Component("frontend", role="frontend", depends_on=("router",)),
    ),
)
