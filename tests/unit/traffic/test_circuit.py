"""Circuit breaking (UpstreamConfig.Limits) and connect timeouts, on plain values."""

from __future__ import annotations

import random

from sidecar.circuit import (
    MAX_CONCURRENT_REQUESTS,
    MAX_CONNECTIONS,
    MAX_PENDING_REQUESTS,
    Overflow,
    RequestCircuit,
    check_stream,
    connect_timeout,
    limited,
)
from sidecar.routing import Request
from sidecar.traffic import UpstreamTraffic
from sidecar.upstreamconfig import UpstreamLimits, UpstreamSettings, upstream_settings
from tests.unit.traffic.chains import compile_entries, greeter_canary

V1, V2 = "v1.greeter.default.default.dc1", "v2.greeter.default.default.dc1"


def test_no_limit_set_means_no_circuit() -> None:
    assert not limited(UpstreamLimits())
    assert limited(UpstreamLimits(max_pending_requests=1))
    t: UpstreamTraffic[str] = UpstreamTraffic("greeter", greeter_canary())
    assert t.circuit is None
    t.update(settings=UpstreamSettings(limits=UpstreamLimits(max_concurrent_requests=3)))
    assert t.circuit is not None and t.circuit.limits.max_concurrent_requests == 3
    t.update(settings=UpstreamSettings())
    assert t.circuit is None


def test_stream_limits_in_order_concurrent_connections_pending() -> None:
    lim = UpstreamLimits(max_connections=2, max_pending_requests=1, max_concurrent_requests=10)
    ok = {"active": 3, "connections": 1, "pending": 0, "needs_connection": True, "waits": True}
    assert check_stream(lim, **ok) is None  # type: ignore[arg-type]
    assert check_stream(lim, **{**ok, "active": 10}) == Overflow(MAX_CONCURRENT_REQUESTS, 10)  # type: ignore[arg-type]
    assert check_stream(lim, **{**ok, "connections": 2}) == Overflow(MAX_CONNECTIONS, 2)  # type: ignore[arg-type]
    # an endpoint that has its connection opens none: MaxConnections does not apply
    assert check_stream(lim, **{**ok, "connections": 5, "needs_connection": False}) is None  # type: ignore[arg-type]
    assert check_stream(lim, **{**ok, "pending": 1}) == Overflow(MAX_PENDING_REQUESTS, 1)  # type: ignore[arg-type]
    # a stream that goes out at once is not pending
    assert check_stream(lim, **{**ok, "pending": 4, "waits": False}) is None  # type: ignore[arg-type]
    assert check_stream(UpstreamLimits(), active=10**6, connections=10**6, pending=10**6, needs_connection=True,
                        waits=True) is None
    msg = Overflow(MAX_CONCURRENT_REQUESTS, 10).message("api")
    assert "upstream api" in msg and "MaxConcurrentRequests (10) reached" in msg


def test_http_requests_wait_for_a_connection_then_overflow() -> None:
    c = RequestCircuit(UpstreamLimits(max_connections=2, max_pending_requests=1, max_concurrent_requests=4))
    assert not c.admit().waits and not c.admit().waits  # two connections busy
    third = c.admit()
    assert third.waits and third.overflow is None and (c.busy, c.pending) == (2, 1)
    assert c.admit().overflow == Overflow(MAX_PENDING_REQUESTS, 1)  # a second one may not wait
    assert not c.can_acquire()
    c.released()
    assert c.can_acquire()
    c.acquired()
    assert (c.busy, c.pending) == (2, 0)
    c.limits = UpstreamLimits(max_concurrent_requests=2)
    assert c.admit().overflow == Overflow(MAX_CONCURRENT_REQUESTS, 2)
    c.released()
    c.released()
    assert (c.busy, c.pending) == (0, 0) and c.admit().overflow is None


def test_concurrency_counts_waiting_requests() -> None:
    c = RequestCircuit(UpstreamLimits(max_connections=1, max_concurrent_requests=2))
    c.admit()
    assert c.admit().waits
    assert c.admit().overflow == Overflow(MAX_CONCURRENT_REQUESTS, 2)
    c.gave_up()
    assert c.admit().waits


def test_refused_plan_is_cancelled_without_a_health_or_latency_sample() -> None:
    settings = UpstreamSettings(limits=UpstreamLimits(max_concurrent_requests=1))
    t: UpstreamTraffic[str] = UpstreamTraffic("greeter", greeter_canary(), settings=settings, rng=random.Random(3))
    t.update(endpoints={V1: ["a:1"], V2: ["c:1"]})
    call = Request("POST", "/demo.v1.Greeter/SlowHello", {})  # route 1: v1 only
    plan = t.plan(call, 0.0)
    t.started(plan, 0.0)
    state = t._targets[V1].default.stats("a:1")
    before = (state.ewma, state.consecutive_failures)
    assert state.in_flight == 1
    t.cancelled(plan)
    assert state.in_flight == 0 and (state.ewma, state.consecutive_failures) == before
    assert t.describe(0.0)["ejected"] == {}


def test_connect_timeout_override_resolver_default() -> None:
    assert connect_timeout(UpstreamSettings(), []) == 5.0
    assert connect_timeout(UpstreamSettings(), [0.25, 2.0]) == 2.0  # an endpoint in two subsets: the longer
    assert connect_timeout(UpstreamSettings(connect_timeout=0.75), [0.25]) == 0.75  # ConnectTimeoutMs wins
    chain = compile_entries(
        "api",
        {"Kind": "service-defaults", "Name": "api", "Protocol": "grpc"},
        {"Kind": "service-resolver", "Name": "api", "ConnectTimeout": "250ms", "DefaultSubset": "v1",
         "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"Filter": "Service.Meta.version == v2"}}})
    t: UpstreamTraffic[str] = UpstreamTraffic("api", chain)
    t.update(endpoints={"v1.api.default.default.dc1": ["a:1"]})
    assert t.connect_timeout("a:1") == 0.25
    assert t.connect_timeout("gone:1") == 5.0  # not an endpoint of any target: Consul's default
    t.update(settings=upstream_settings({"UpstreamConfig": {"Overrides": [{"Name": "api", "ConnectTimeoutMs": 900}]}},
                                        "api"))
    assert t.connect_timeout("a:1") == 0.9


class _Counter:
    def __init__(self) -> None:
        self.counts: dict[tuple[str, ...], int] = {}

    def labels(self, *values: str) -> _Counter:
        self.counts[values] = self.counts.get(values, 0) + 1
        return self

    def inc(self) -> None:
        pass


class _Pool:
    name = "hapi"

    def __init__(self) -> None:
        self.metrics = type("M", (), {"circuit_open": _Counter()})()


async def test_http_requests_wait_in_turn_are_refused_past_pending_and_give_up_at_the_timeout() -> None:
    import asyncio

    from sidecar.http_circuit import held

    pool = _Pool()
    c = RequestCircuit(UpstreamLimits(max_connections=1, max_pending_requests=1))
    order: list[str] = []
    first_in = asyncio.Event()
    release_first = asyncio.Event()

    async def first() -> None:
        async with held(c, pool, 0) as refused:
            assert refused is None
            order.append("first")
            first_in.set()
            await release_first.wait()

    async def second() -> None:
        async with held(c, pool, 0) as refused:
            assert refused is None
            order.append("second")

    t1 = asyncio.ensure_future(first())
    await first_in.wait()
    t2 = asyncio.ensure_future(second())
    await asyncio.sleep(0)
    assert (c.busy, c.pending) == (1, 1)
    async with held(c, pool, 0) as refused:  # a second waiter is one too many
        assert refused is not None and refused[0] == 503 and "MaxPendingRequests (1) reached" in refused[1]
    assert pool.metrics.circuit_open.counts == {("hapi", "MaxPendingRequests"): 1}
    release_first.set()
    await asyncio.gather(t1, t2)
    assert order == ["first", "second"] and (c.busy, c.pending) == (0, 0)

    # a waiter whose route timeout passes gets 504 and leaves no count behind
    hold = asyncio.Event()

    async def holder() -> None:
        async with held(c, pool, 0):
            await hold.wait()

    t3 = asyncio.ensure_future(holder())
    await asyncio.sleep(0)
    async with held(c, pool, 0.05) as refused:
        assert refused is not None and refused[0] == 504 and "MaxConnections 1" in refused[1]
    assert (c.busy, c.pending) == (1, 0)
    hold.set()
    await t3
    assert (c.busy, c.pending) == (0, 0)
