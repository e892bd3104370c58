"""Test helper process: send Dynamo requests to an endpoint, print the results as one JSON line.

``python tests/workers/dyn_client.py ENDPOINT [--instance ID]`` reads a JSON list of requests on stdin
and prints ``[[chunk, ...], ...]`` (one list of chunks per request, sent concurrently). A call that
raises gives ``[{"exception": "...", "type": "<its class name>"}]``. Run in its own process so each test gets a fresh runtime.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys


async def main() -> None:
    from dynamo.runtime import DistributedRuntime

    p = argparse.ArgumentParser()
    p.add_argument("endpoint")
    p.add_argument("--instance", type=int, default=None)
    a = p.parse_args()
    reqs = json.loads(sys.stdin.read())
    rt = DistributedRuntime(asyncio.get_running_loop(), "etcd", "tcp", event_plane="nats")
    c = await rt.endpoint(a.endpoint).client()
    await asyncio.wait_for(c.wait_for_instances(), 30)

    async def one(req):
        out = []
        try:
            stream = await (c.direct(req, a.instance) if a.instance is not None else c.round_robin(req))
            async for item in stream:
                out.append(item.data())
        except Exception as e:  # noqa: BLE001
            out.append({"exception": str(e), "type": type(e).__name__})
        return out

    res = await asyncio.gather(*(one(r) for r in reqs))
    print(json.dumps(res), flush=True)
    rt.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.flush()
    import os

    os._exit(0)
