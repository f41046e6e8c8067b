"""UpstreamTraffic: per-call plans over a compiled chain with endpoints per target, failover, ejection."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sidecar.outlier import PassiveHealthCheck
from sidecar.routing import Request
from sidecar.traffic import NoEndpoint, UpstreamTraffic
from sidecar.upstreamconfig import UpstreamSettings
from tests.unit.traffic.chains import compile_entries, greeter_canary

V1, V2 = "v1.greeter.default.default.dc1", "v2.greeter.default.default.dc1"
CALL = Request("POST", "/demo.v1.Greeter/SayHello", {})


def _traffic(**kw: object) -> UpstreamTraffic[str]:
    t: UpstreamTraffic[str] = UpstreamTraffic("greeter", greeter_canary(), rng=random.Random(11), **kw)  # type: ignore[arg-type]
    t.update(endpoints={V1: ["a:1", "b:1"], V2: ["c:1"]})
    return t


def test_split_and_header_route_pick_endpoints_of_their_subset() -> None:
    t = _traffic()
    counts = Counter(t.plan(CALL, 0.0).target.subset for _ in range(2000))
    assert abs(counts["v1"] / 2000 - 0.9) < 0.03
    plan = t.plan(Request("POST", "/demo.v1.Greeter/SayHello", {"x-canary": "1"}), 0.0)
    assert (plan.target.id, plan.endpoint, plan.failed_over) == (V2, "c:1", False)


def test_failover_when_a_subset_has_no_healthy_endpoint() -> None:
    t = _traffic()
    t.update(endpoints={V1: []})
    plans = [t.plan(CALL, 0.0) for _ in range(50)]
    assert {p.target.id for p in plans} == {V2} and any(p.failed_over for p in plans)
    t.update(endpoints={V2: []})
    with pytest.raises(NoEndpoint, match="no endpoint for"):
        t.plan(CALL, 0.0)


def test_ejected_endpoint_gets_no_calls_until_base_ejection_time_passed() -> None:
    settings = UpstreamSettings(passive_health_check=PassiveHealthCheck(max_failures=2, base_ejection_time=5,
                                                                         max_ejection_percent=50))
    t = _traffic(settings=settings)
    plan = t.plan(Request("POST", "/demo.v1.Greeter/SlowHello", {}), 0.0)  # route 1: always v1
    bad = plan.endpoint
    for _ in range(2):
        t.started(plan, 0.0)
        ejected = t.finished(plan, 0.0, latency=0.0, failed=True)  # fails fast, as a broken app does
    assert ejected and t.describe(1.0)["ejected"] == {bad: 4.0}
    slow = Request("POST", "/demo.v1.Greeter/SlowHello", {})
    assert all(t.plan(slow, 1.0).endpoint != bad for _ in range(50))
    assert t.describe(6.0)["ejected"] == {} and any(t.plan(slow, 6.0).endpoint == bad for _ in range(50))


def test_all_ejected_falls_over_to_the_next_target_then_panics() -> None:
    settings = UpstreamSettings(passive_health_check=PassiveHealthCheck(max_failures=1, max_ejection_percent=100))
    t = _traffic(settings=settings)
    slow = Request("POST", "/demo.v1.Greeter/SlowHello", {})
    for ep in ("a:1", "b:1"):
        plan = t.plan(slow, 0.0)
        while plan.endpoint != ep:
            plan = t.plan(slow, 0.0)
        t.finished(plan, 0.0, latency=0.0, failed=True)
    assert {t.plan(slow, 1.0).target.id for _ in range(20)} == {V2}  # v1 all ejected: its failover
    t.update(endpoints={V2: []})
    assert {t.plan(slow, 1.0).endpoint for _ in range(50)} == {"a:1", "b:1"}  # panic: ejected beats none


def test_ring_hash_resolver_is_sticky_per_header() -> None:
    chain = compile_entries(
        "api", {"Kind": "service-resolver", "Name": "api",
                "LoadBalancer": {"Policy": "ring_hash", "HashPolicies": [{"Field": "header", "FieldValue": "x-user"}]}})
    t: UpstreamTraffic[str] = UpstreamTraffic("api", chain, rng=random.Random(3))
    t.update(endpoints={"api.default.default.dc1": [f"e{i}:1" for i in range(4)]})
    for user in ("ann", "bob", "cy"):
        req = Request("GET", "/", {"x-user": user})
        assert len({t.plan(req, 0.0).endpoint for _ in range(20)}) == 1
    assert len({t.plan(Request("GET", "/", {}), 0.0).endpoint for _ in range(50)}) > 1  # no header: random
    d = t.describe(0.0)
    assert d["targets"]["api.default.default.dc1"]["policy"] == "ring_hash" and d["start"].startswith("resolver:")


def test_describe_shows_splits_and_budget() -> None:
    t = _traffic()
    plan = t.plan(CALL, 0.0)
    t.started(plan, 0.0)
    d = t.describe(0.0)
    assert d["splits"] == [{"weight": 90.0, "target": V1}, {"weight": 10.0, "target": V2}]
    assert d["retry_budget"]["calls"] == 1 and d["routes"] == 4


def test_inbound_controls_limits_faults_and_the_fast_path() -> None:
    from sidecar.faults import parse_document as faults_doc
    from sidecar.ratelimit import parse_document as limits_doc
    from sidecar.snapshot import InboundTraffic
    from sidecar.traffic import InboundControls

    controls = InboundControls(rng=random.Random(2))
    assert not controls.needs_call_path("web")
    controls.update(InboundTraffic(caller_limits=limits_doc({"Callers": {"web": {"RequestsPerSecond": 1,
                                                                                 "RequestsMaxBurst": 3}}})))
    assert controls.needs_call_path("web") and not controls.needs_call_path("batch")
    verdicts = [controls.check("web", "/demo.v1.Greeter/SayHello", 0.0) for _ in range(10)]
    refused = [v for v in verdicts if v.refuse]
    assert len(refused) == 7 and {(v.grpc_status, v.http_status, v.reason) for v in refused} == {
        (8, 429, "ratelimit")}
    assert refused[0].retry_after == pytest.approx(1.0) and "retry after 1s" in refused[0].message
    assert not controls.check("batch", "/demo.v1.Greeter/SayHello", 0.0).refuse
    controls.update(InboundTraffic(faults=faults_doc({"Abort": {"Percent": 100, "GrpcStatus": 14},
                                                      "Sources": ["batch"]})))
    assert controls.needs_call_path("batch") and not controls.needs_call_path("web")
    v = controls.check("batch", "/x", 0.0)
    assert v.refuse and (v.grpc_status, v.http_status, v.reason) == (14, 503, "fault-abort")
    controls.update(InboundTraffic(faults=faults_doc({"Delay": {"Percent": 100, "Duration": "50ms"}})))
    assert controls.check("web", "/x", 0.0) == controls.check("batch", "/x", 0.0)
    assert controls.check("web", "/x", 0.0).delay == 0.05


def test_a_retry_avoids_the_failed_endpoint_while_its_target_has_another() -> None:
    t = _traffic()
    slow = Request("POST", "/demo.v1.Greeter/SlowHello", {})  # always v1: a:1 and b:1
    assert {t.plan(slow, 0.0, exclude="a:1").endpoint for _ in range(30)} == {"b:1"}
    assert {t.plan(Request("POST", "/x", {"x-canary": "1"}), 0.0, exclude="c:1").endpoint
            for _ in range(5)} == {"c:1"}  # v2's only endpoint: nothing else to go to
