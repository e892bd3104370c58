"""The second process of the transport tests: a transport peer that publishes its PeerInfo in etcd.

Run by tests/transport/conftest.py as
``python tests/transport/peer_proc.py --backend nixl|tcp --name N --layout JSON --etcd URL --key K``.
It is ``dynamo_ext.transport.probe``'s peer (JSON-line commands on stdin: fill, digest, notifs,
exit) plus one step: before reporting ready it puts ``PeerInfo.encode()`` under ``--key`` in etcd,
which is where the test reads it from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dynamo_ext.transport.peer import PeerInfo  # noqa: E402
from dynamo_ext.transport.probe import run_peer  # noqa: E402


async def publish_etcd(info: PeerInfo, args: argparse.Namespace) -> None:
    if not args.etcd:
        return
    from etcd3aio import Etcd3Client

    hostport = args.etcd.split("://", 1)[-1]
    async with Etcd3Client([hostport]) as c:
        await c.kv.put(args.key, info.encode(), timeout=10)


if __name__ == "__main__":
    sys.exit(run_peer(sys.argv[1:], publish=publish_etcd))
