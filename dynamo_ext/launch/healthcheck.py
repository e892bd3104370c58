"""``python -m dynamo_ext.launch.healthcheck``: the container image's HEALTHCHECK (deploy/Dockerfile).

Exit 0 when ``/live`` answers 200 on 127.0.0.1 at Dynamo's system port (``DYN_SYSTEM_PORT``, default 9090: a
worker, a router, the planner) or at the frontend's HTTP port (``DYN_HTTP_PORT``, default 8000), else 1. Kubernetes
ignores an image's HEALTHCHECK: the rendered pods probe the same paths themselves (launch/deploy.py).
"""

from __future__ import annotations

import os
import sys
import urllib.request


def live(port: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/live", timeout=timeout) as r:
            return int(r.status) == 200
    except (OSError, ValueError):
        return False


def main() -> int:
    ports = (os.environ.get("DYN_SYSTEM_PORT", "9090"), os.environ.get("DYN_HTTP_PORT", "8000"))
    return 0 if any(live(p) for p in ports) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
