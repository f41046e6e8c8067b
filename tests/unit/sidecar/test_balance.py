from __future__ import annotations

import random
from collections import Counter

import pytest

from sidecar.balance import Balancer


def make(keys: list[str], seed: int = 1) -> Balancer[str]:
    b: Balancer[str] = Balancer(rng=random.Random(seed))
    b.set_endpoints(keys, now=0.0)
    return b


def test_no_endpoints_picks_none() -> None:
    assert make([]).pick(0.0) is None


def test_single_endpoint_always_chosen() -> None:
    b = make(["a"])
    assert {b.pick(float(i)) for i in range(10)} == {"a"}


def test_slow_endpoint_gets_less_traffic() -> None:
    b = make(["fast", "slow", "mid"])
    now = 0.0
    counts: Counter[str] = Counter()
    for _ in range(3000):
        now += 0.001
        k = b.pick(now)
        assert k is not None
        counts[k] += 1
        b.start(k)
        lat = {"fast": 0.001, "mid": 0.01, "slow": 0.2}[k]
        b.observe(k, lat, now)
    assert counts["fast"] > counts["mid"] > counts["slow"]


def test_in_flight_penalty_spreads_load() -> None:
    b = make(["a", "b"])
    # a has many calls in flight, same latency: b must win every pick
    for _ in range(5):
        b.start("a")
    assert all(b.pick(0.0) == "b" for _ in range(20))


def test_set_endpoints_keeps_stats_of_survivors_and_drops_leavers() -> None:
    b = make(["a", "b"])
    b.start("a")
    b.observe("a", 0.5, 1.0)
    b.set_endpoints(["a", "c"], now=2.0)
    assert b.endpoints == ("a", "c")
    assert b.stats("a").ewma == pytest.approx(0.5)
    # the newcomer starts at the mean of the survivors
    assert b.stats("c").ewma == pytest.approx(0.5)
    with pytest.raises(KeyError):
        b.stats("b")
    # observing a call to an endpoint that left is harmless
    b.observe("b", 0.1, 3.0)


def test_failures_eject_endpoint_then_it_returns() -> None:
    b = make(["good", "bad"])
    for i in range(3):
        b.start("bad")
        b.observe("bad", 0.001, float(i), ok=False)
    assert b.ejected(3.0) == ("bad",)
    assert all(b.pick(3.0) == "good" for _ in range(50))
    assert b.ejected(100.0) == ()


def test_ejection_never_leaves_nothing() -> None:
    b = make(["only"])
    for i in range(3):
        b.observe("only", 0.0, float(i), ok=False)
    assert b.pick(3.0) == "only"


def test_penalty_decays_over_time() -> None:
    b = make(["a", "b"])
    b.observe("a", 5.0, 0.0)
    assert all(b.pick(0.0) == "b" for _ in range(20))
    # long after, a's old slowness has decayed back toward the initial latency
    picks = Counter(b.pick(1000.0) for _ in range(200))
    assert picks["a"] > 0


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        Balancer(decay_seconds=0)
