"""Constrain policy: decode:prefill ratio bounds and fast-link domains (pure, no Dynamo).

`constrain(proposed, current, config, domains) -> Constrained` returns the feasible (prefill,
decode) pair closest to the proposal, and the AT_LEAST / AT_MOST bounds that turn Dynamo's
merged proposal into it (Dynamo's CONSTRAIN stage only accepts AT_LEAST / AT_MOST; SET is dropped).

Rules, applied in this order:

1. Min/max replicas per role.
2. Link domains. A `LinkDomain` is a set of worker slots (GPUs or TP groups) joined by a fast
   link (NVLink / one RDMA fabric island / one host). A decode worker may only be *added* in a
   domain that already runs a prefill worker and has a free slot, because it pulls its KV from a
   prefill worker over that link. So: decode <= current decode + free slots of domains that hold
   a prefill worker. Existing decode workers are never removed by this rule. No domains given =
   no link rule.
3. Ratio bounds (default 2:1 to 3:1 decode:prefill), only while both roles are > 0 (prefill = 0
   means decode workers prefill locally). When decode/prefill > max_ratio the policy *adds
   prefill* (ceil(decode / max_ratio)) if max_prefill allows, else caps decode; when it is
   < min_ratio it *adds decode* if max_decode and the link cap allow, else caps prefill. Growing
   the missing side first keeps the capacity the PROPOSE stage asked for.
   With min_ratio=2, min_decode=1 and min_prefill=1 the effective decode minimum is 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RatioConfig:
    min_ratio: float = 2.0
    max_ratio: float = 3.0
    min_prefill: int = 1
    max_prefill: int = 8
    min_decode: int = 1
    max_decode: int = 16

    def __post_init__(self) -> None:
        if not 0 < self.min_ratio <= self.max_ratio:
            raise ValueError(f"need 0 < min_ratio <= max_ratio, got {self.min_ratio}, {self.max_ratio}")
        if not (0 <= self.min_prefill <= self.max_prefill) or not (0 <= self.min_decode <= self.max_decode):
            raise ValueError("need 0 <= min <= max for prefill and decode")


@dataclass(frozen=True)
class LinkDomain:
    name: str
    slots: int
    prefill: int = 0  # prefill workers placed in this domain now
    decode: int = 0  # decode workers placed in this domain now

    @property
    def free(self) -> int:
        return max(0, self.slots - self.prefill - self.decode)


@dataclass(frozen=True)
class Constrained:
    prefill: int
    decode: int
    prefill_at_least: int | None = None
    prefill_at_most: int | None = None
    decode_at_least: int | None = None
    decode_at_most: int | None = None
    reasons: list[str] = field(default_factory=list)
    feasible: bool = True


def decode_link_cap(domains: list[LinkDomain], current_decode: int) -> int:
    """Most decode workers reachable over fast links: current ones + free slots next to a prefill worker."""
    return current_decode + sum(d.free for d in domains if d.prefill > 0)


def constrain(
    proposed_prefill: int | None,
    proposed_decode: int | None,
    current_prefill: int,
    current_decode: int,
    config: RatioConfig | None = None,
    domains: list[LinkDomain] | None = None,
) -> Constrained:
    c = config or RatioConfig()
    why: list[str] = []
    p0 = current_prefill if proposed_prefill is None else proposed_prefill
    d0 = current_decode if proposed_decode is None else proposed_decode
    p = min(c.max_prefill, max(c.min_prefill, p0))
    d = min(c.max_decode, max(c.min_decode, d0))
    if (p, d) != (p0, d0):
        why.append(f"replica bounds: ({p0},{d0}) -> ({p},{d})")

    d_cap = c.max_decode
    if domains:
        link_cap = decode_link_cap(domains, current_decode)
        d_cap = min(d_cap, max(link_cap, current_decode))
        if d > d_cap:
            why.append(f"link domains: decode {d} -> {d_cap} (only {d_cap - current_decode} free slot(s) next to a prefill worker)")
            d = d_cap

    feasible = True
    if p > 0 and d > 0:
        for _ in range(8):
            if d > c.max_ratio * p:
                need_p = math.ceil(d / c.max_ratio - 1e-9)
                if need_p <= c.max_prefill:
                    why.append(f"ratio {d}/{p} > {c.max_ratio:g}: prefill {p} -> {need_p}")
                    p = need_p
                else:
                    new_d = math.floor(c.max_ratio * p + 1e-9)
                    why.append(f"ratio {d}/{p} > {c.max_ratio:g} and prefill at max: decode {d} -> {new_d}")
                    d = new_d
            elif d < c.min_ratio * p:
                need_d = math.ceil(c.min_ratio * p - 1e-9)
                if need_d <= d_cap:
                    why.append(f"ratio {d}/{p} < {c.min_ratio:g}: decode {d} -> {need_d}")
                    d = need_d
                else:
                    new_p = max(c.min_prefill, 1, math.floor(d / c.min_ratio + 1e-9))
                    if new_p == p:
                        why.append(f"ratio {d}/{p} < {c.min_ratio:g} cannot be met within bounds")
                        feasible = False
                        break
                    why.append(f"ratio {d}/{p} < {c.min_ratio:g} and decode capped at {d_cap}: prefill {p} -> {new_p}")
                    p = new_p
            else:
                break
        else:  # pragma: no cover - the loop converges in <= 3 rounds for valid configs
            feasible = False

    return Constrained(
        prefill=p,
        decode=d,
        prefill_at_least=p if p > p0 else None,
        prefill_at_most=p if p < p0 else None,
        decode_at_least=d if d > d0 else None,
        decode_at_most=d if d < d0 else None,
        reasons=why,
        feasible=feasible,
    )
