"""dynamo_ext.kv — blocks: Dynamo-compatible hashing, pool and prefix cache, KV events, tiers.

See README.md in this folder for the layer's contract. Imports nothing of Dynamo; the indexer
(``kv.indexer``) and tiers (``kv.tiers``) are imported from their modules.
"""

from .events import DynamoKvEventSink, KvEventSink, NullKvEventSink, RecordingKvEventSink
from .hashing import block_hashes
from .pool import BlockPool, DoubleFree, OutOfBlocks, PoolError, PoolStats

__all__ = [
    "BlockPool",
    "DoubleFree",
    "DynamoKvEventSink",
    "KvEventSink",
    "NullKvEventSink",
    "OutOfBlocks",
    "PoolError",
    "PoolStats",
    "RecordingKvEventSink",
    "block_hashes",
]
