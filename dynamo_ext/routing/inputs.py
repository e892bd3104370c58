"""Inputs of the routing layer: what a request looks like and what each worker reports.

Protocol (who fills what)::

    router component (workers/)                       routing/
    ---------------------------                       --------
    tokenized request + block hashes   ->  RequestShape
    RadixTree/KvRouter overlap scores,
    worker load metrics, etcd records  ->  WorkerSnapshot (one per worker, per request:
                                           the overlap fields are this request's)
    topology/ TransportChoice + EWMA   ->  LinkTable (links.py)

Everything here is plain, immutable data: no clocks, no I/O. Validation happens once, when a value
is built, never inside ``decide``.

Units: tokens, blocks (``block_size`` tokens each), bytes, seconds, GB/s with GB = 1e9 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Role(str, Enum):
    """What a worker does. ``agg`` workers prefill and decode (they can be a decode target too)."""

    PREFILL = "prefill"
    DECODE = "decode"
    AGG = "agg"


class Tier(str, Enum):
    """Where a worker's cached copy of the request's prefix lives (kv/ tiers G1..G4)."""

    DEVICE = "device"
    HOST = "host"
    DISK = "disk"
    OBJECT = "object"


@dataclass(frozen=True, slots=True)
class RequestShape:
    """A request as routing sees it.

    ``block_hashes`` are Dynamo's hashes of the prompt's full blocks (kept for the caller's lookups
    and logs; the overlap per worker arrives already scored in ``WorkerSnapshot``).
    ``kv_bytes_per_token`` covers all layers, K and V, of one token in the serving layout.
    """

    prompt_tokens: int
    block_size: int
    kv_bytes_per_token: int
    block_hashes: tuple[int, ...] = ()
    expected_output_tokens: int = 0
    request_id: str = ""

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0:
            raise ValueError(f"prompt_tokens must be >= 0, got {self.prompt_tokens}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {self.block_size}")
        if self.kv_bytes_per_token <= 0:
            raise ValueError(f"kv_bytes_per_token must be > 0, got {self.kv_bytes_per_token}")
        if not isinstance(self.block_hashes, tuple):
            object.__setattr__(self, "block_hashes", tuple(self.block_hashes))

    @property
    def prompt_blocks(self) -> int:
        """Blocks the whole prompt occupies (the last one may be partial)."""
        return -(-self.prompt_tokens // self.block_size)

    @property
    def kv_bytes_per_block(self) -> int:
        return self.kv_bytes_per_token * self.block_size

    @property
    def prompt_kv_bytes(self) -> int:
        """Bytes a disaggregated hand-off moves: every block of the prompt, whole blocks."""
        return self.prompt_blocks * self.kv_bytes_per_block


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    """One worker, as the router sees it when routing one request.

    Load: ``queue_tokens`` / ``queued_requests`` waiting for prefill on this worker; ``shared_queue_tokens``
    waiting for prefill on the OTHER workers that share this worker's compute (the same GPU, or the same host
    CPUs): their prefills interleave with this worker's, so they delay it as if queued here (0: compute of its own);
    ``active_blocks`` / ``free_blocks`` of its device KV pool; ``prefill_tokens_per_s`` its measured
    prefill throughput; ``admission_delay_s`` its own estimate of how long a new decode request waits
    for a batch slot (decode and agg workers).

    This request: ``overlap_blocks`` of the prompt's leading blocks are cached on this worker, in
    ``overlap_tier``. ``onload_gb_per_s`` overrides the configured tier read speed for this worker.

    Compatibility: ``layout_key`` is the compatibility key of the worker's KvLayout (layers, KV
    heads, head dim, block size, dtype; memory order excluded). Pairs whose keys differ cannot move
    KV and are excluded. ``node`` (host identity) lets a LinkTable default same-node pairs.
    """

    worker_id: int
    role: Role
    prefill_tokens_per_s: float
    layout_key: str = ""
    queue_tokens: int = 0
    shared_queue_tokens: int = 0
    queued_requests: int = 0
    active_blocks: int = 0
    free_blocks: int = 0
    admission_delay_s: float = 0.0
    overlap_blocks: int = 0
    overlap_tier: Tier = Tier.DEVICE
    onload_gb_per_s: float | None = None
    healthy: bool = True
    node: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.role, Role):
            object.__setattr__(self, "role", Role(self.role))
        if not isinstance(self.overlap_tier, Tier):
            object.__setattr__(self, "overlap_tier", Tier(self.overlap_tier))
        for name in ("queue_tokens", "shared_queue_tokens", "queued_requests", "active_blocks", "free_blocks", "overlap_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"worker {self.worker_id}: {name} must be >= 0")
        if self.prefill_tokens_per_s < 0 or self.admission_delay_s < 0:
            raise ValueError(f"worker {self.worker_id}: throughput and admission delay must be >= 0")
        if self.onload_gb_per_s is not None and self.onload_gb_per_s <= 0:
            raise ValueError(f"worker {self.worker_id}: onload_gb_per_s must be > 0")

    @property
    def can_decode(self) -> bool:
        return self.role is not Role.PREFILL

    @property
    def total_blocks(self) -> int:
        return self.active_blocks + self.free_blocks

    @property
    def utilisation(self) -> float:
        """Share of the device pool in use (0 when the pool size is unknown)."""
        total = self.active_blocks + self.free_blocks
        return self.active_blocks / total if total else 0.0


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """Knobs of ``decide``; defaults suit one model on H100-class GPUs."""

    #: Prompts shorter than this prefill on the decode worker (no hand-off is worth its fixed cost).
    local_prefill_max_tokens: int = 256
    #: Whether decode/agg workers may prefill locally at all (conditional disaggregation).
    allow_local_prefill: bool = True
    #: Fixed cost per request already queued ahead (scheduling, first-step overheads).
    per_request_overhead_s: float = 0.0
    #: Read speed of a cached prefix by tier, GB/s, when the worker gives none.
    host_onload_gb_per_s: float = 20.0
    disk_onload_gb_per_s: float = 2.0
    object_onload_gb_per_s: float = 0.5
    #: Exclude decode targets without free blocks for the KV they would receive.
    require_decode_room: bool = True
    #: Charge on top of the TTFT estimate for the prefill compute an option adds (x its prefill seconds):
    #: the work later requests wait behind. 0 ranks by this request's TTFT alone; > 0 prefers reusing a
    #: cached prefix over recomputing it elsewhere when the TTFTs are close (the router passes
    #: router.work_weight).
    work_weight: float = 0.0

    def onload_gb_per_s(self, tier: Tier) -> float:
        if tier is Tier.HOST:
            return self.host_onload_gb_per_s
        if tier is Tier.DISK:
            return self.disk_onload_gb_per_s
        if tier is Tier.OBJECT:
            return self.object_onload_gb_per_s
        return float("inf")


__all__ = ["Role", "Tier", "RequestShape", "WorkerSnapshot", "RoutingConfig"]
