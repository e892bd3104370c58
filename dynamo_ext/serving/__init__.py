"""dynamo_ext.serving — the serving core, Dynamo-free (see README.md for the contract).

What a worker does and what a router does, whatever carries their requests. Two request planes adapt it:
``workers/`` (Dynamo endpoints, etcd records, NATS KV events) and ``bench/direct_worker.py`` +
``bench/serve_direct.py`` (JSON lines between processes, where the Dynamo runtime is not wanted). Neither
holds serving logic of its own.

    protocol.py       what crosses the wire: KvHandle, parse_request / BadRequest, error chunks,
                      migration_request / rerun_request / rerun_usage
    engine_runner.py  EngineRunner: one engine thread, step loop, per-request queues, waits for free blocks
    transports.py     WorkerTransports: every backend the topology supports, the KV pool registered once
                      with each, the backend select_transport picks per pull (fallback to the next);
                      PeerTransports: what a worker advertises
    worker.py         ServingWorker (+ WorkerPlane, WorkerSettings): prefill and hold, reap, release,
                      pull (prefix-aware, stale-handle check), decode stream, export / hand over
    router.py         RouterCore (+ RouterPlane, RouterSettings): snapshots, routing.decide,
                      LinkFeedback, WorkerMeter, migration plans; StreamSession per request

Imports no Dynamo and no network client (import-linter contract ``serving-dynamo-free``); torch only
inside ``ServingWorker.start_engine``.
"""

from __future__ import annotations

from .engine_runner import EngineRunner, Load, NoRoom
from .protocol import (BadRequest, KvHandle, error_chunk, handle_of, is_invalid, migration_request, parse_request,
                       rerun_request)
from .router import LinkFeedback, RouterCore, RouterPlane, RouterSettings, StreamSession, WorkerInfo
from .transports import PeerTransports, PullFailed, PullResult, TransportOptions, WorkerTransports, process_choice
from .worker import Draining, ServingWorker, StaleHandle, WorkerPlane, WorkerSettings, decode_peer_blob

__all__ = [
    "BadRequest", "Draining", "EngineRunner", "KvHandle", "LinkFeedback", "Load", "NoRoom", "PeerTransports",
    "PullFailed", "PullResult", "RouterCore", "RouterPlane", "RouterSettings", "ServingWorker", "StaleHandle",
    "StreamSession", "TransportOptions", "WorkerInfo", "WorkerPlane", "WorkerSettings", "WorkerTransports",
    "decode_peer_blob", "error_chunk", "handle_of", "is_invalid", "migration_request", "parse_request", "process_choice",
    "rerun_request",
]
