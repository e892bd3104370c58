"""Disaggregated graph: prefill and decode on separate workers, KV pulled by the decode worker.

    client -> frontend -> router (x router.replicas) -+-> prefill (x workers.prefill.count)
                                                      +-> decode  (x workers.decode.count) <= KV from prefill

Under ``router.policy: dynamo-kv`` there is no router process: prefill and decode workers register
themselves and the frontend routes with Dynamo's KV router (``frontend -> prefill, decode``).

    dynamo-ext serve graphs/disagg.py -f configs/disagg.yaml
"""

from dynamo_ext.launch.graph import Component, Graph

graph = Graph(
    name="disagg",
    description="prefill and decode pools; the decode worker pulls KV blocks from the prefill worker",
    components=(
        Component("prefill", role="prefill", count_key="workers.prefill.count"),
        Component("decode", role="decode", count_key="workers.decode.count", kv_from=("prefill",)),
        Component("router", role="router", count_key="router.replicas", depends_on=("prefill", "decode"),
                  policies=("dynamo-ext", "round-robin")),
        Component("frontend", role="frontend", depends_on=("router",)),
    ),
)
