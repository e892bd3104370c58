"""PeerInfo: what one transport endpoint tells another so the other can move bytes to/from it.

Protocol::

    owner:   info = backend.local_peer_info()          # agent name, NIXL metadata, pool descriptors
             blob = info.encode()                       # msgpack bytes (msgspec), never pickle
             -> etcd / discovery record / stdout of a probe peer
    other:   info = PeerInfo.decode(blob)               # validated: malformed -> MalformedPeerInfo
             backend.add_peer(info)                     # NIXL: add_remote_agent(info.agent_metadata)
             pool = info.pool("kv")                     # -> PoolDescriptor for RemotePool(info.agent_name, pool)

``backend`` names the backend that produced it ("nixl", "tcp", "local"); ``endpoint`` is the
``host:port`` of a TCP fallback server (empty for NIXL). Descriptors are plain integers.
"""

from __future__ import annotations

import msgspec

from .errors import TransferError
from .pool import PoolDescriptor

_MAX_BLOB = 16 << 20  # a PeerInfo is a few KiB; refuse absurd blobs before decoding


class MalformedPeerInfo(TransferError, ValueError):
    """A PeerInfo blob that is not valid msgpack of the expected shape."""


class PeerInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    agent_name: str
    backend: str
    agent_metadata: bytes = b""
    pools: list[PoolDescriptor] = []
    staging: PoolDescriptor | None = None
    host: str = "127.0.0.1"
    pid: int = 0
    endpoint: str = ""

    def encode(self) -> bytes:
        return msgspec.msgpack.encode(self)

    @classmethod
    def decode(cls, blob: bytes) -> "PeerInfo":
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise MalformedPeerInfo(f"PeerInfo must be bytes, got {type(blob).__name__}")
        if len(blob) > _MAX_BLOB:
            raise MalformedPeerInfo(f"PeerInfo blob of {len(blob)} bytes is larger than {_MAX_BLOB}")
        try:
            info = msgspec.msgpack.decode(blob, type=cls)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise MalformedPeerInfo(f"malformed PeerInfo: {e}") from None
        if not info.agent_name:
            raise MalformedPeerInfo("malformed PeerInfo: empty agent_name")
        try:
            for p in info.pools + ([info.staging] if info.staging else []):
                p.validate()
        except (ValueError, msgspec.ValidationError) as e:
            raise MalformedPeerInfo(f"malformed PeerInfo from {info.agent_name!r}: {e}") from None
        return info

    def pool(self, name: str) -> PoolDescriptor:
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(f"peer {self.agent_name!r} has no pool {name!r} (has {[p.name for p in self.pools]})")
