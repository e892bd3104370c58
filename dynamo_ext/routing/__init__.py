"""dynamo_ext.routing: pure routing and migration decisions (see README.md for the layer contract).

Plain data in, decisions out; no I/O, no clock, no NIXL/torch/network/Dynamo imports (import-linter).

    inputs.py          RequestShape, WorkerSnapshot, RoutingConfig, Role, Tier
    links.py           LinkInfo, LinkTable (pair links with same-node / default fallbacks)
    ttft_model.py      the TTFT terms of one option (side cost, local, pair)
    selector.py        decide() -> Decision; estimate_all() (unpruned reference)
    decision.py        Decision, Option, Terms, Exclusion, reasons, NoCandidateError
    migration.py       plan_migrations() -> [Move | Recompute | Wait]
    link_estimator.py  LinkEstimator: EWMA GB/s per pair, failure back-off, probes
    throughput.py      WorkerMeter: measured prefill tok/s, decode step s, queued uncached tokens per worker
    pending.py         PendingPrefixes: prefixes routed to a worker whose KV events have not arrived yet
"""

from .selector import decide, estimate_all
from .decision import (
    Decision,
    DecisionReason,
    Exclusion,
    ExclusionReason,
    NoCandidateError,
    Option,
    OptionKind,
    Terms,
)
from .inputs import RequestShape, Role, RoutingConfig, Tier, WorkerSnapshot
from .link_estimator import LinkEstimator
from .pending import PendingPrefixes
from .links import LinkInfo, LinkTable
from .migration import (
    MigrationAction,
    MigrationConfig,
    MigrationReason,
    MigrationTerms,
    Move,
    Recompute,
    RunningRequest,
    Wait,
    plan_migrations,
)

__all__ = [
    "Decision", "DecisionReason", "Exclusion", "ExclusionReason", "LinkEstimator", "LinkInfo", "LinkTable",
    "MigrationAction", "MigrationConfig", "MigrationReason", "MigrationTerms", "Move", "NoCandidateError",
    "Option", "PendingPrefixes", "OptionKind", "Recompute", "RequestShape", "Role", "RoutingConfig", "RunningRequest", "Terms",
    "Tier", "Wait", "WorkerSnapshot", "decide", "estimate_all", "plan_migrations",
]
