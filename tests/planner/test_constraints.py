"""Constrain policy (pure): decode:prefill ratio bounds and fast-link domains."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.constraints import Constrained, LinkDomain, RatioConfig, constrain, decode_link_cap


def test_ratio_within_bounds_untouched():
    r = constrain(2, 5, current_prefill=2, current_decode=5)
    assert (r.prefill, r.decode) == (2, 5) and r.reasons == []
    assert r.prefill_at_least is r.prefill_at_most is r.decode_at_least is r.decode_at_most is None


def test_too_many_decode_adds_prefill():
    r = constrain(1, 7, current_prefill=1, current_decode=3)
    assert (r.prefill, r.decode) == (3, 7) and r.prefill_at_least == 3 and "ratio" in r.reasons[0]


def test_too_many_decode_caps_decode_when_prefill_at_max():
    r = constrain(2, 9, current_prefill=2, current_decode=6, config=RatioConfig(max_prefill=2))
    assert (r.prefill, r.decode) == (2, 6) and r.decode_at_most == 6


def test_too_few_decode_adds_decode():
    r = constrain(3, 3, current_prefill=2, current_decode=3)
    assert (r.prefill, r.decode) == (3, 6) and r.decode_at_least == 6


def test_too_few_decode_caps_prefill_when_decode_at_max():
    r = constrain(4, 5, current_prefill=2, current_decode=5, config=RatioConfig(max_decode=5))
    assert (r.prefill, r.decode) == (2, 5) and r.prefill_at_most == 2


def test_min_one_one_becomes_one_two():
    r = constrain(1, 1, current_prefill=1, current_decode=1)
    assert (r.prefill, r.decode) == (1, 2)


def test_zero_prefill_skips_ratio():
    r = constrain(0, 3, current_prefill=1, current_decode=3, config=RatioConfig(min_prefill=0))
    assert (r.prefill, r.decode) == (0, 3) and r.reasons == []  # prefill=0: decode prefills locally


def test_configurable_ratio():
    r = constrain(1, 4, current_prefill=1, current_decode=4, config=RatioConfig(min_ratio=1.0, max_ratio=1.5))
    assert (r.prefill, r.decode) == (3, 4)
    with pytest.raises(ValueError):
        RatioConfig(min_ratio=3.0, max_ratio=2.0)


def test_link_domain_blocks_decode_without_prefill_neighbour():
    domains = [
        LinkDomain("nvl-a", slots=4, prefill=1, decode=2),  # 1 free slot next to a prefill worker
        LinkDomain("nvl-b", slots=8, prefill=0, decode=0),  # 8 free slots but no prefill worker: unusable
    ]
    assert decode_link_cap(domains, current_decode=2) == 3
    r = constrain(1, 5, current_prefill=1, current_decode=2, domains=domains)
    assert r.decode == 3 and r.decode_at_most == 3
    assert any("link domains" in w for w in r.reasons)
    # ratio still holds (3/1 <= 3) and no prefill added for decode that cannot be placed
    assert r.prefill == 1


def test_link_domain_never_removes_existing_decode():
    domains = [LinkDomain("a", slots=2, prefill=1, decode=1), LinkDomain("b", slots=2, prefill=0, decode=2)]
    r = constrain(1, 3, current_prefill=1, current_decode=3, domains=domains)
    assert r.decode == 3 and r.decode_at_most is None


def test_link_domain_with_prefill_grows_cap():
    domains = [LinkDomain("a", slots=4, prefill=1, decode=3), LinkDomain("b", slots=4, prefill=1, decode=0)]
    r = constrain(2, 6, current_prefill=2, current_decode=3, domains=domains)
    assert (r.prefill, r.decode) == (2, 6)


@settings(max_examples=300, deadline=None)
@given(
    p=st.integers(0, 20), d=st.integers(0, 40),
    cp=st.integers(1, 8), cd=st.integers(1, 16),
    rmin=st.sampled_from([1.0, 1.5, 2.0, 2.5]), span=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
)
def test_result_within_bounds_and_ratio_when_feasible(p, d, cp, cd, rmin, span):
    cfg = RatioConfig(min_ratio=rmin, max_ratio=rmin + span)
    r: Constrained = constrain(p, d, current_prefill=cp, current_decode=cd, config=cfg)
    assert cfg.min_prefill <= r.prefill <= cfg.max_prefill and cfg.min_decode <= r.decode <= cfg.max_decode
    if r.feasible and r.prefill > 0 and r.decode > 0:
        assert cfg.min_ratio * r.prefill - 1e-9 <= r.decode <= cfg.max_ratio * r.prefill + 1e-9
