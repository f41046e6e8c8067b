"""Outlier ejection and the resolver's load-balancing policies, with plain values."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from catalog.chain import HashPolicy
from sidecar.lb import Picker, call_hash
from sidecar.outlier import (
    OutlierDetector,
    PassiveHealthCheck,
    PassiveHealthCheckError,
    is_failure,
    parse_passive_health_check,
)
from sidecar.upstreamconfig import ServiceDefaultsError, local_settings, upstream_settings


def test_consecutive_failures_eject_and_the_endpoint_returns() -> None:
    det: OutlierDetector[str] = OutlierDetector(PassiveHealthCheck(max_failures=3, base_ejection_time=5,
                                                                   max_ejection_percent=50))
    det.set_endpoints(["a", "b", "c", "d"])
    assert not det.observe("a", True, 0) and not det.observe("a", True, 1)
    assert det.observe("a", True, 2) and det.ejections_total == 1
    assert det.available(["a", "b", "c", "d"], 3) == ["b", "c", "d"]
    assert det.ejected(3) == {"a": 4.0}
    assert not det.is_ejected("a", 7.0)  # back after BaseEjectionTime
    for t in (8, 8, 8):
        det.observe("a", True, t)
    assert det.ejected(8) == {"a": 10.0}  # the second ejection lasts twice as long


def test_success_resets_and_max_ejection_percent_holds() -> None:
    det: OutlierDetector[str] = OutlierDetector(PassiveHealthCheck(max_failures=2, max_ejection_percent=10))
    det.set_endpoints(["a", "b", "c"])
    det.observe("a", True, 0)
    det.observe("a", False, 0)
    assert not det.observe("a", True, 0)
    assert det.observe("a", True, 0)  # at least one endpoint may always be ejected
    det.observe("b", True, 0)
    assert not det.observe("b", True, 0)  # a second would exceed 10 %
    assert det.available(["a"], 0) == ["a"]  # never an empty answer


def test_passive_health_check_parse() -> None:
    phc = parse_passive_health_check({"Interval": "5s", "MaxFailures": 2, "EnforcingConsecutive5xx": 100,
                                      "MaxEjectionPercent": 100, "BaseEjectionTime": "2s"})
    assert phc == PassiveHealthCheck(5.0, 2, 100, 100, 2.0)
    assert parse_passive_health_check({}) == PassiveHealthCheck()
    with pytest.raises(PassiveHealthCheckError, match=r"PassiveHealthCheck\.MaxEjectionPercent"):
        parse_passive_health_check({"MaxEjectionPercent": 101})
    assert is_failure(grpc_status=14) and is_failure(http_status=503) and not is_failure(http_status=404)


def test_upstream_config_defaults_and_overrides() -> None:
    sd = {"UpstreamConfig": {
        "Defaults": {"Limits": {"MaxConcurrentRequests": 10}, "ConnectTimeoutMs": 250},
        "Overrides": [{"Name": "greeter", "PassiveHealthCheck": {"MaxFailures": 1},
                       "Limits": {"MaxPendingRequests": 4}}]}}
    s = upstream_settings(sd, "greeter")
    assert (s.limits.max_concurrent_requests, s.limits.max_pending_requests, s.connect_timeout) == (10, 4, 0.25)
    assert s.passive_health_check is not None and s.passive_health_check.max_failures == 1
    assert upstream_settings(sd, "other").passive_health_check is None
    local = local_settings({"LocalRequestTimeoutMs": 1500, "RateLimits": {"InstanceLevel": {"RequestsPerSecond": 5}}})
    assert local.request_timeout == 1.5 and local.rate_limits.limit is not None
    with pytest.raises(ServiceDefaultsError, match=r"UpstreamConfig.Defaults.Limits.MaxConnections"):
        upstream_settings({"UpstreamConfig": {"Defaults": {"Limits": {"MaxConnections": -1}}}}, "x")


def test_round_robin_random_least_request() -> None:
    rr: Picker[str] = Picker("round_robin")
    assert Counter(rr.pick(["a", "b", "c"]) for _ in range(300)) == {"a": 100, "b": 100, "c": 100}
    rnd: Picker[str] = Picker("random", rng=random.Random(2))
    counts = Counter(rnd.pick(["a", "b"]) for _ in range(10_000))
    assert abs(counts["a"] / 10_000 - 0.5) < 0.02
    lr: Picker[str] = Picker("least_request", rng=random.Random(3), choice_count=2)
    for _ in range(5):
        lr.start("a")
    assert all(lr.pick(["a", "b"]) == "b" for _ in range(50))


@pytest.mark.parametrize("policy", ["ring_hash", "maglev"])
def test_hash_policies_are_sticky_and_spread(policy: str) -> None:
    picker: Picker[str] = Picker(policy, rng=random.Random(4))
    endpoints = [f"10.0.0.{i}:8080" for i in range(5)]
    header = (HashPolicy(field="header", field_value="x-user"),)
    by_user = {}
    for user in range(500):
        h = call_hash(header, {"x-user": f"u{user}"}, {}, "")
        by_user[user] = picker.pick(endpoints, h)
        assert all(picker.pick(endpoints, h) == by_user[user] for _ in range(3))
    spread = Counter(by_user.values())
    assert len(spread) == 5 and min(spread.values()) > 50
    # an endpoint leaving moves only its own users (mostly, for maglev)
    fewer = endpoints[:4]
    moved = sum(1 for u, e in by_user.items() if e != endpoints[4]
                and picker.pick(fewer, call_hash(header, {"x-user": f"u{u}"}, {}, "")) != e)
    assert moved < 60


def test_cookie_query_terminal_and_no_value() -> None:
    cookie = HashPolicy(field="cookie", field_value="sess")
    query = HashPolicy(field="query_parameter", field_value="id", terminal=True)
    same = call_hash((cookie,), {"cookie": "sess=xyz"}, {}, "")
    assert call_hash((cookie,), {"cookie": "a=1; sess=xyz"}, {}, "") == same
    assert call_hash((cookie,), {}, {}, "") is None
    with_terminal = call_hash((query, cookie), {"cookie": "sess=1"}, {"id": "7"}, "")
    assert with_terminal == call_hash((query,), {}, {"id": "7"}, "")
    assert call_hash((HashPolicy(source_ip=True),), {}, {}, "10.0.0.9") is not None
