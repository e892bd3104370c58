"""dynamo_ext.topology — hardware facts -> a ``TransportChoice`` per worker pair; see README.md.

    collect_local_topology(gpu_index=None) -> NodeTopology      (collect.py; probes guarded)
    select_transport(a: Endpoint, b: Endpoint, force="auto") -> TransportChoice   (select.py; pure)
    LinkTable: expectations + measured EWMA + health/back-off; snapshot() is plain data (links.py)

Imports nothing of Dynamo; GPU libraries (pynvml, torch) only lazily inside probes.
"""

from .collect import collect_local_topology
from .links import LinkState, LinkTable
from .model import GpuInfo, HostInfo, NodeTopology, RdmaNic, RdmaPort, StorageInfo
from .select import (
    FORCES,
    KINDS,
    Endpoint,
    TransportChoice,
    allowed_transports,
    merge_env,
    nearest_nic,
    select_transport,
)

__all__ = [
    "FORCES", "KINDS", "Endpoint", "GpuInfo", "HostInfo", "LinkState", "LinkTable", "NodeTopology",
    "RdmaNic", "RdmaPort", "StorageInfo", "TransportChoice", "allowed_transports",
    "collect_local_topology", "merge_env", "nearest_nic", "select_transport",
]  # fmt: skip
