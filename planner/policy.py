"""Propose policy: prefill and decode replica targets from queue, KV usage, TTFT/ITL vs SLA, transfer share.

Pure: `ScalingPolicy.step(signals) -> Proposal`. Plain dataclasses in and out, time comes in as
`signals.t`, no I/O, no Dynamo. One policy object per planner (it keeps hysteresis state).

Per tick and per role the policy votes UP, DOWN or HOLD, then applies, in this order:

0. Start-up: for `startup_hold_s` after the policy starts it makes no decision at all (the adapter
   REJECTs the tick, so neither our plugin nor Dynamo's builtins scale): workers are still
   registering, and a target computed from ready=0 would tear down what the launcher started.
1. Don't chase a moving target: while a previous decision has not landed (`scaling_in_progress`,
   or ready replicas differ from our last target) it holds. When the deployment's desired count
   (`expected_*`) differs from our last target, a later stage changed our decision (e.g. CONSTRAIN
   clamped it to the ratio): that count becomes the target instead of waiting for ours.
2. Cold start (dynamo#12430): after a role's ready count changes, or when the policy starts, its
   latency and KV samples are ignored for `warmup_s` (new workers have cold caches and first-call
   costs); latency from fewer than `min_requests` requests in the window is ignored too.
3. Votes:
   - prefill UP: queue per prefill worker > `queue_high`, or TTFT/SLA > `high` while the KV
     transfer share of TTFT is below `transfer_share_high` (prefill compute or queueing is slow).
   - decode UP: KV usage > `kv_high`, ITL/SLA > `high`, decode queue per worker > `queue_high`, or
     TTFT/SLA > `high` with transfer share >= `transfer_share_high` (the KV pull dominates TTFT:
     more prefill workers would not help; more decode workers spread the pulls over more links).
   - DOWN only if the load *projected onto one worker fewer* (x n/(n-1)) stays below
     `headroom` x the UP threshold, and KV usage is below `kv_low`; this projection is what stops
     the 2 <-> 1 oscillation (dynamo PR #9294): a role is never shrunk into a state that would vote UP.
     Shrinking under traffic needs evidence (TTFT for prefill, KV usage or ITL for decode); with no
     such metric a role only shrinks through the zero-traffic rule.
4. Hysteresis: UP needs `up_ticks` consecutive UP votes, DOWN `down_ticks`; any other vote resets.
5. Cool-down: after a change of a role, no UP for `up_cooldown_s`, no DOWN for `down_cooldown_s`.
6. Zero traffic (dynamo#6985): `idle_ticks` ticks with no requests and empty queues set both roles
   to their minimum in one decision (once neither is in its down cool-down), even though latency
   metrics are absent.
7. Step: DOWN is -1; UP is +1, or up to `max_step_up` when the worst pressure ratio is large.

The ratio and link-domain bounds are not applied here; `planner.constraints` does that (CONSTRAIN stage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from planner.signals import Signals


class Vote(str, Enum):
    UP = "up"
    DOWN = "down"
    HOLD = "hold"


@dataclass(frozen=True)
class PolicyConfig:
    min_prefill: int = 1
    max_prefill: int = 8
    min_decode: int = 1
    max_decode: int = 16
    ttft_sla_s: float = 0.5
    itl_sla_s: float = 0.05
    high: float = 0.9  # latency / SLA above which a role is under pressure
    kv_high: float = 0.8
    kv_low: float = 0.4
    queue_high: float = 2.0  # waiting requests per worker
    transfer_share_high: float = 0.5
    headroom: float = 0.8  # shrink only if projected load on n-1 workers < headroom x UP threshold
    up_ticks: int = 2
    down_ticks: int = 4
    idle_ticks: int = 3
    up_cooldown_s: float = 30.0
    down_cooldown_s: float = 120.0
    warmup_s: float = 60.0
    min_requests: float = 5.0
    max_step_up: int = 2
    landing_timeout_s: float = 300.0  # give up waiting for a decision to land after this
    startup_hold_s: float = 60.0  # after the policy starts: no decisions while workers register

    def __post_init__(self) -> None:
        if not (0 <= self.min_prefill <= self.max_prefill) or not (0 <= self.min_decode <= self.max_decode):
            raise ValueError("need 0 <= min <= max for prefill and decode")
        if self.kv_low >= self.kv_high:
            raise ValueError("kv_low must be < kv_high")
        if self.up_ticks < 1 or self.down_ticks < 1 or self.idle_ticks < 1 or self.max_step_up < 1:
            raise ValueError("up_ticks, down_ticks, idle_ticks and max_step_up must be >= 1")


@dataclass(frozen=True)
class Proposal:
    prefill: int
    decode: int
    changed: bool
    reason: str
    no_decision: bool = False  # start-up hold: the whole tick must not scale anything (adapter: REJECT)


@dataclass
class _RoleState:
    target: int | None = None
    last_ready: int | None = None
    ready_changed_at: float | None = None
    changed_at: float | None = None
    up_run: int = 0
    down_run: int = 0


@dataclass
class PolicyState:
    prefill: _RoleState = field(default_factory=_RoleState)
    decode: _RoleState = field(default_factory=_RoleState)
    idle_run: int = 0
    started_at: float | None = None
    live: bool = False  # past the start-up hold


@dataclass(frozen=True)
class _RoleVote:
    vote: Vote
    severity: float  # worst pressure / threshold (>1 means over)
    why: str


def _proj(n: int) -> float:
    """Factor by which per-worker load grows if one of n workers goes away."""
    return n / (n - 1) if n > 1 else math.inf


class ScalingPolicy:
    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()
        self.state = PolicyState()

    # ---- signal hygiene -------------------------------------------------------------------

    def _warm(self, rs: _RoleState, t: float) -> bool:
        c = self.config
        since = rs.ready_changed_at if rs.ready_changed_at is not None else self.state.started_at
        return since is None or t - since >= c.warmup_s

    def _enough(self, s: Signals) -> bool:
        return s.requests is None or s.requests >= self.config.min_requests

    # ---- votes ----------------------------------------------------------------------------

    def _vote_prefill(self, s: Signals, n: int, warm: bool) -> _RoleVote:
        c = self.config
        q = s.prefill_queue / max(n, 1)
        ttft = s.ttft_s / c.ttft_sla_s if (warm and self._enough(s) and s.ttft_s is not None) else None
        transfer_bound = s.transfer_share is not None and s.transfer_share >= c.transfer_share_high
        if n == 0 and s.prefill_queue > 0:
            return _RoleVote(Vote.UP, 2.0, f"prefill queue {s.prefill_queue:g} with no prefill worker")
        if q > c.queue_high:
            return _RoleVote(Vote.UP, q / c.queue_high, f"prefill queue {q:.2f}/worker > {c.queue_high:g}")
        if ttft is not None and ttft > c.high and not transfer_bound:
            return _RoleVote(Vote.UP, ttft / c.high, f"TTFT {s.ttft_s:.3f}s > {c.high:g}x SLA {c.ttft_sla_s:g}s")
        p = _proj(n)
        q_ok = s.prefill_queue == 0 or (n > 1 and s.prefill_queue / (n - 1) <= c.queue_high * c.headroom)
        ttft_ok = ttft is None or ttft * p < c.high * c.headroom
        # Shrinking needs evidence: an empty queue alone may just mean the workers keep up.
        if n > 0 and ttft is not None and q_ok and ttft_ok and warm:
            return _RoleVote(Vote.DOWN, 0.0, "prefill load fits on one worker fewer")
        return _RoleVote(Vote.HOLD, 0.0, "prefill within band")

    def _vote_decode(self, s: Signals, n: int, warm: bool) -> _RoleVote:
        c = self.config
        q = s.decode_queue / max(n, 1)
        kv = s.kv_usage if warm else None
        itl = s.itl_s / c.itl_sla_s if (warm and self._enough(s) and s.itl_s is not None) else None
        ttft = s.ttft_s / c.ttft_sla_s if (warm and self._enough(s) and s.ttft_s is not None) else None
        transfer_bound = s.transfer_share is not None and s.transfer_share >= c.transfer_share_high
        if kv is not None and kv > c.kv_high:
            return _RoleVote(Vote.UP, kv / c.kv_high, f"KV usage {kv:.2f} > {c.kv_high:g}")
        if itl is not None and itl > c.high:
            return _RoleVote(Vote.UP, itl / c.high, f"ITL {s.itl_s:.4f}s > {c.high:g}x SLA {c.itl_sla_s:g}s")
        if q > c.queue_high:
            return _RoleVote(Vote.UP, q / c.queue_high, f"decode queue {q:.2f}/worker > {c.queue_high:g}")
        if ttft is not None and ttft > c.high and transfer_bound:
            return _RoleVote(Vote.UP, ttft / c.high,
                             f"TTFT {s.ttft_s:.3f}s over SLA with {s.transfer_share:.0%} in KV transfer")
        p = _proj(n)
        kv_ok = kv is None or (kv < c.kv_low and kv * p < c.kv_high * c.headroom)
        itl_ok = itl is None or itl * p < c.high * c.headroom
        q_ok = s.decode_queue == 0 or (n > 1 and s.decode_queue / (n - 1) <= c.queue_high * c.headroom)
        evidence = kv is not None or itl is not None
        if n > 0 and evidence and kv_ok and itl_ok and q_ok and warm:
            return _RoleVote(Vote.DOWN, 0.0, "decode load fits on one worker fewer")
        return _RoleVote(Vote.HOLD, 0.0, "decode within band")

    # ---- one role -------------------------------------------------------------------------

    def _apply(self, rs: _RoleState, v: _RoleVote, t: float, lo: int, hi: int, role: str) -> tuple[int, str]:
        c = self.config
        assert rs.target is not None
        cur = rs.target
        if v.vote is Vote.UP:
            rs.up_run += 1
            rs.down_run = 0
        elif v.vote is Vote.DOWN:
            rs.down_run += 1
            rs.up_run = 0
        else:
            rs.up_run = rs.down_run = 0
            return cur, f"{role}: hold ({v.why})"
        since = math.inf if rs.changed_at is None else t - rs.changed_at
        if v.vote is Vote.UP:
            if cur >= hi:
                return cur, f"{role}: at max {hi} ({v.why})"
            if rs.up_run < c.up_ticks:
                return cur, f"{role}: up pending {rs.up_run}/{c.up_ticks} ({v.why})"
            if since < c.up_cooldown_s:
                return cur, f"{role}: up cooling down {since:.0f}/{c.up_cooldown_s:g}s ({v.why})"
            step = 1
            if v.severity > 1.0 and cur > 0:
                step = max(1, min(c.max_step_up, math.ceil(cur * (v.severity - 1.0))))
            new = min(hi, cur + step)
        else:
            if cur <= lo:
                return cur, f"{role}: at min {lo}"
            if rs.down_run < c.down_ticks:
                return cur, f"{role}: down pending {rs.down_run}/{c.down_ticks} ({v.why})"
            if since < c.down_cooldown_s:
                return cur, f"{role}: down cooling down {since:.0f}/{c.down_cooldown_s:g}s"
            new = max(lo, cur - 1)
        rs.target, rs.changed_at, rs.up_run, rs.down_run = new, t, 0, 0
        return new, f"{role}: {cur} -> {new} ({v.why})"

    def _observe_ready(self, rs: _RoleState, ready: int, t: float) -> None:
        if rs.last_ready is not None and ready != rs.last_ready:
            rs.ready_changed_at = t
            if rs.target == rs.last_ready:
                # Not waiting for a decision of ours: the CONSTRAIN stage, an operator or a crash moved
                # the count. Start from reality.
                rs.target = ready
        rs.last_ready = ready
        if rs.target is None:
            rs.target = ready

    # ---- tick -----------------------------------------------------------------------------

    def step(self, s: Signals) -> Proposal:
        c, st = self.config, self.state
        if st.started_at is None:
            st.started_at = s.t
        self._observe_ready(st.prefill, s.ready_prefill, s.t)
        self._observe_ready(st.decode, s.ready_decode, s.t)
        if s.t - st.started_at < c.startup_hold_s:
            # Workers may still be registering (ready counts climbing from 0): follow them, decide nothing.
            st.prefill.target, st.decode.target = s.ready_prefill, s.ready_decode
            left = c.startup_hold_s - (s.t - st.started_at)
            return Proposal(s.ready_prefill, s.ready_decode, False, f"start-up hold, {left:.0f}s left", no_decision=True)
        if not st.live:  # first tick after the hold: start from what registered
            st.live = True
            st.prefill.target, st.decode.target = s.ready_prefill, s.ready_decode
        for rs, exp in ((st.prefill, s.expected_prefill), (st.decode, s.expected_decode)):
            # Our last decision was changed downstream (CONSTRAIN clamped it, or another plugin won the
            # merge): the deployment's desired count is the truth, don't wait for ours to land.
            if exp is not None and rs.changed_at is not None and exp != rs.target and not s.scaling_in_progress:
                rs.target = exp
        # Bring an initial target inside [min, max] (counts as a change for cool-down purposes only
        # when it moves).
        for rs, lo, hi in ((st.prefill, c.min_prefill, c.max_prefill), (st.decode, c.min_decode, c.max_decode)):
            assert rs.target is not None
            clamped = min(hi, max(lo, rs.target))
            if clamped != rs.target:
                rs.target, rs.changed_at = clamped, s.t
        p0, d0 = st.prefill.target, st.decode.target
        assert p0 is not None and d0 is not None

        for rs, ready in ((st.prefill, s.ready_prefill), (st.decode, s.ready_decode)):
            # A decision that never lands (a worker failed to start) must not freeze the policy:
            # after landing_timeout_s the observed count becomes the target again.
            if rs.changed_at is not None and ready != rs.target and s.t - rs.changed_at >= c.landing_timeout_s:
                rs.target = ready
        p0, d0 = st.prefill.target, st.decode.target
        if s.scaling_in_progress or (st.prefill.changed_at is not None and s.ready_prefill != p0) or (
            st.decode.changed_at is not None and s.ready_decode != d0
        ):
            return Proposal(p0, d0, False, "previous decision not landed yet: hold")

        idle = s.prefill_queue == 0 and s.decode_queue == 0 and (
            s.requests == 0
            or (s.requests is None and not s.kv_usage and s.ttft_s is None and s.itl_s is None)
        )
        st.idle_run = st.idle_run + 1 if idle else 0
        if st.idle_run >= c.idle_ticks and (p0 > c.min_prefill or d0 > c.min_decode):
            # Both roles go to their minimum in ONE decision (once neither is cooling down), so the
            # ratio constraint sees (min_prefill, min_decode) and not a half-shrunk pair it must undo.
            roles = ((st.prefill, c.min_prefill, "prefill"), (st.decode, c.min_decode, "decode"))
            for rs, _, _ in roles:
                rs.up_run = rs.down_run = 0
            waits = [(role, s.t - rs.changed_at) for rs, lo, role in roles
                     if rs.target is not None and rs.target > lo and rs.changed_at is not None
                     and s.t - rs.changed_at < c.down_cooldown_s]
            if waits:
                why = ", ".join(f"{r} {w:.0f}/{c.down_cooldown_s:g}s" for r, w in waits)
                return Proposal(p0, d0, False, f"zero traffic for {st.idle_run} ticks; down cooling down: {why}")
            for rs, lo, _ in roles:
                if rs.target is not None and rs.target > lo:
                    rs.target, rs.changed_at = lo, s.t
            p1, d1 = st.prefill.target, st.decode.target
            assert p1 is not None and d1 is not None
            return Proposal(p1, d1, True, f"zero traffic for {st.idle_run} ticks: ({p0}, {d0}) -> ({p1}, {d1})")
        if idle:
            st.prefill.up_run = st.decode.up_run = 0
            return Proposal(p0, d0, False, f"idle {st.idle_run}/{c.idle_ticks} ticks")

        pv = self._vote_prefill(s, p0, self._warm(st.prefill, s.t))
        dv = self._vote_decode(s, d0, self._warm(st.decode, s.t))
        p1, pr = self._apply(st.prefill, pv, s.t, c.min_prefill, c.max_prefill, "prefill")
        d1, dr = self._apply(st.decode, dv, s.t, c.min_decode, c.max_decode, "decode")
        return Proposal(p1, d1, (p1, d1) != (p0, d0), f"{pr}; {dr}")
