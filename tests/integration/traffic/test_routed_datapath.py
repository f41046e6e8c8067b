"""Traffic management on the data path, in one process with real sockets on loopback:
client -> web's outbound (routed through api's compiled chain) -> mTLS -> api instances' inbound -> echo apps.

The chain comes from the dev agent's compiler (Consul's rules) over plain config entries; each api
instance is an Inbound plus an echo app named api-v1-N / api-v2-N.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest

from catalog.chain import CompiledChain, parse_chain
from devagent import chaincompile, configcheck
from sidecar.faults import parse_document as faults_doc
from sidecar.inbound import Inbound
from sidecar.outbound import Outbound
from sidecar.ratelimit import parse_document as limits_doc
from sidecar.snapshot import Endpoint, InboundTraffic, Registration, Snapshot, SnapshotBuilder, UpstreamConfig
from sidecar.telemetry import Telemetry
from sidecar.tls import TlsContexts
from tests.apps.echo import echo_pb2, echo_pb2_grpc
from tests.apps.echo import server as echo_server
from tests.integration.sidecar.harness import Authority, Holder, table
from tests.support import free_port

pytestmark = pytest.mark.integration

V1, V2 = "v1.api.default.default.dc1", "v2.api.default.default.dc1"


def compile_chain(*entries: dict[str, Any]) -> CompiledChain:
    table_ = {(e["Kind"], e["Name"]): configcheck.normalize_and_validate(e) for e in entries}
    return parse_chain({"Chain": chaincompile.compile_chain(lambda k, n: table_.get((k, n)), "api").chain})


CANARY: list[dict[str, Any]] = [
    {"Kind": "service-defaults", "Name": "api", "Protocol": "grpc"},
    {"Kind": "service-resolver", "Name": "api", "DefaultSubset": "v1",
     "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"Filter": "Service.Meta.version == v2"}},
     "Failover": {"v1": {"ServiceSubset": "v2"}}},
    {"Kind": "service-splitter", "Name": "api",
     "Splits": [{"Weight": 90, "ServiceSubset": "v1"}, {"Weight": 10, "ServiceSubset": "v2"}]},
    {"Kind": "service-router", "Name": "api", "Routes": [
        {"Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "1"}]}}, "Destination": {"ServiceSubset": "v2"}},
        {"Match": {"HTTP": {"PathExact": "/weft.test.echo.v1.Echo/ServerStream"}},
         "Destination": {"ServiceSubset": "v1"}},
        {"Match": {"HTTP": {"PathPrefix": "/weft.test.echo.v1.Echo/Unary", "Header": [
            {"Name": "x-test", "Exact": "timeout"}]}},
         "Destination": {"ServiceSubset": "v1", "RequestTimeout": "300ms"}},
        {"Match": {"HTTP": {"PathPrefix": "/weft.test.echo.v1.Echo/Unary", "Header": [
            {"Name": "x-test", "Exact": "retry"}]}},
         "Destination": {"ServiceSubset": "v1", "NumRetries": 3, "RetryOn": ["unavailable"]}},
        {"Match": {"HTTP": {"PathPrefix": "/weft.test.echo.v1.Echo/Unary", "Header": [
            {"Name": "x-test", "Exact": "reset"}]}},
         "Destination": {"ServiceSubset": "v1", "NumRetries": 2, "RetryOn": ["reset", "connect-failure"]}},
    ]},
]


@dataclass
class Instance:
    name: str
    subset: str
    app: Any
    inbound: Inbound
    holder: Holder
    port: int


@dataclass
class RoutedMesh:
    ca: Authority
    web: Holder
    outbound: Outbound
    tel: Telemetry
    instances: list[Instance]
    stub: echo_pb2_grpc.EchoStub
    channel: grpc.aio.Channel
    chain: CompiledChain
    builder: SnapshotBuilder = field(default_factory=SnapshotBuilder)

    def set_endpoints(self, subset: str, names: list[str]) -> None:
        tid = V1 if subset == "v1" else V2
        self.builder.set_target_endpoints(tid, [Endpoint("127.0.0.1", i.port, i.name) for i in self.instances
                                                if i.name in names])
        snap = self.builder.build()
        assert snap is not None
        self.web.set(snap)

    def set_chain(self, chain: CompiledChain, settings: Any = None) -> None:
        self.builder.set_chain("api", chain)
        if settings is not None:
            self.builder.set_upstream_settings("api", settings)
        snap = self.builder.build()
        assert snap is not None
        self.web.set(snap)


async def _instance(ca: Authority, name: str, subset: str, policy: Any, passthrough: bool) -> Instance:
    app, app_port, _ = await echo_server.start(0, name=name)
    b = SnapshotBuilder()
    b.set_registration(Registration(service="api", service_id=name, proxy_id=f"{name}-sidecar-proxy",
                                    public_address="127.0.0.1", public_port=0, local_service_address="127.0.0.1",
                                    local_service_port=app_port, protocol="grpc"))
    b.set_credentials(ca.leaf("api"))
    b.set_policy(policy, policy.version)
    snap = b.build()
    assert snap is not None
    holder = Holder(snap)
    inbound = Inbound(holder, Telemetry(), TlsContexts(), passthrough_enabled=passthrough)
    holder.listeners.append(inbound.on_snapshot)
    port = await inbound.start("127.0.0.1", 0)
    return Instance(name, subset, app, inbound, holder, port)


async def make_mesh(*, per_subset: int = 2, passthrough: bool = False) -> AsyncIterator[RoutedMesh]:
    """api's inbounds take the full path (every call seen, as with L7 intentions) unless ``passthrough``."""
    ca = Authority.root()
    policy = table("api", ("web", "allow"), ("batch", "allow"))
    instances = [await _instance(ca, f"api-{s}-{i}", s, policy, passthrough)
                 for s in ("v1", "v2") for i in range(per_subset)]
    local = free_port()
    b = SnapshotBuilder()
    b.set_registration(Registration(service="web", service_id="web-1", proxy_id="web-1-sidecar-proxy",
                                    public_address="127.0.0.1", public_port=0, local_service_address="127.0.0.1",
                                    local_service_port=1, upstreams=(UpstreamConfig("api", local),),
                                    protocol="http"))
    b.set_credentials(ca.leaf("web"))
    b.set_policy(table("web"), "v")
    b.set_endpoints("api", [Endpoint("127.0.0.1", i.port, i.name) for i in instances])
    b.set_protocol("api", "grpc")
    chain = compile_chain(*CANARY)
    b.set_chain("api", chain)
    for subset, tid in (("v1", V1), ("v2", V2)):
        b.set_target_endpoints(tid, [Endpoint("127.0.0.1", i.port, i.name) for i in instances if i.subset == subset])
    snap = b.build()
    assert snap is not None and snap.upstreams["api"].routed
    web = Holder(snap)
    tel = Telemetry()
    outbound = Outbound(web, tel, TlsContexts())
    web.listeners.append(outbound.on_snapshot)
    await outbound.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{local}")
    try:
        yield RoutedMesh(ca, web, outbound, tel, instances, echo_pb2_grpc.EchoStub(channel),  # type: ignore[no-untyped-call]
                         channel, chain, b)
    finally:
        await channel.close(None)
        await outbound.close(0.1)
        for i in instances:
            await i.inbound.close(0.1)
            await i.app.stop(None)


@pytest.fixture
async def mesh() -> AsyncIterator[RoutedMesh]:
    async for m in make_mesh():
        yield m


async def _instance_of(mesh: RoutedMesh, **md: str) -> str:
    resp = await mesh.stub.Unary(echo_pb2.EchoRequest(text="x"), metadata=tuple(md.items()), timeout=10)
    return str(resp.instance)


def metric(tel: Telemetry, name: str, **labels: str) -> float:
    value = tel.registry.get_sample_value(name, labels)
    return float(value or 0.0)


async def test_split_converges_and_routes_pick_their_subsets(mesh: RoutedMesh) -> None:
    counts = Counter([(await _instance_of(mesh)).split("-")[1] for _ in range(1000)])
    assert abs(counts["v2"] / 1000 - 0.10) <= 0.04, counts  # 4 standard deviations
    assert {(await _instance_of(mesh, **{"x-canary": "1"})).split("-")[1] for _ in range(30)} == {"v2"}
    streamed = [r async for r in mesh.stub.ServerStream(echo_pb2.EchoRequest(sequence=1), timeout=10)]
    assert streamed and all(r.instance.startswith("api-v1-") for r in streamed)
    assert metric(mesh.tel, "weft_routed_requests_total", upstream="api", route="0", subset="v2", status="OK") >= 30
    shown = mesh.outbound.describe_traffic()["api"]
    assert shown["splits"] == [{"weight": 90.0, "target": V1}, {"weight": 10.0, "target": V2}]


async def test_failover_to_v2_when_v1_has_no_endpoint(mesh: RoutedMesh) -> None:
    mesh.set_endpoints("v1", [])
    assert {(await _instance_of(mesh)).split("-")[1] for _ in range(40)} == {"v2"}
    mesh.set_endpoints("v1", ["api-v1-0"])
    assert "v1" in {(await _instance_of(mesh)).split("-")[1] for _ in range(40)}


async def test_route_timeout_ends_a_slow_call_with_deadline_exceeded(mesh: RoutedMesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.Unary(echo_pb2.EchoRequest(), metadata=(("x-test", "timeout"), ("x-echo-delay-ms", "3000")),
                              timeout=10)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "route's timeout" in (err.value.details() or "")
    resp = await mesh.stub.Unary(echo_pb2.EchoRequest(), metadata=(("x-test", "timeout"),), timeout=10)
    assert resp.instance.startswith("api-v1-")


async def test_retries_rescue_calls_to_a_flaky_instance_within_the_budget(mesh: RoutedMesh) -> None:
    # api-v1-0's app is gone: its sidecar answers every call UNAVAILABLE (trailers-only); api-v1-1 is fine
    flaky = next(i for i in mesh.instances if i.name == "api-v1-0")
    await flaky.app.stop(None)
    ok = 0
    for _ in range(60):
        md = (("x-test", "retry"),)
        resp = await mesh.stub.Unary(echo_pb2.EchoRequest(), metadata=md, timeout=10)
        ok += resp.instance == "api-v1-1"
    assert ok == 60
    assert metric(mesh.tel, "weft_retries_total", upstream="api") >= 1


async def test_a_reset_connection_is_retried_when_the_route_says_so() -> None:
    async for mesh in make_mesh(passthrough=True):
        # pass-through: the failing instance's sidecar drops the connection when its app is gone
        flaky = next(i for i in mesh.instances if i.name == "api-v1-0")
        await flaky.app.stop(None)
        names = Counter([await _instance_of(mesh, **{"x-test": "reset"}) for _ in range(30)])
        assert names == {"api-v1-1": 30}


async def test_retries_stop_at_the_budget_when_a_subset_always_fails(mesh: RoutedMesh) -> None:
    for inst in mesh.instances:
        if inst.subset == "v1":
            await inst.app.stop(None)  # both v1 sidecars answer UNAVAILABLE (trailers-only)
    # no failover to v2 here: every call stays on the failing subset
    resolver = {k: v for k, v in CANARY[1].items() if k != "Failover"}
    mesh.set_chain(compile_chain(CANARY[0], resolver, *CANARY[2:]))
    failures = 0
    for _ in range(60):
        try:
            await mesh.stub.Unary(echo_pb2.EchoRequest(), metadata=(("x-test", "retry"),), timeout=10)
        except grpc.aio.AioRpcError as exc:
            failures += exc.code() == grpc.StatusCode.UNAVAILABLE
    assert failures == 60
    # three retries a call would be 180; the budget allows 20 % of the calls plus 10/s over 10 s
    calls, spent = mesh.outbound.pools["api"].budget().window
    assert calls == 60 and spent == int(0.2 * 60 + 10 * 10)
    assert metric(mesh.tel, "weft_retries_total", upstream="api") == spent
    assert metric(mesh.tel, "weft_retry_budget_exhausted_total", upstream="api") >= 1


async def test_a_failing_instance_is_ejected_and_returns(mesh: RoutedMesh) -> None:
    from sidecar.outlier import PassiveHealthCheck
    from sidecar.upstreamconfig import UpstreamSettings

    # round robin keeps sending calls to the failing instance (the default P2C balancer would avoid it
    # after its first failure, before passive health checking has seen enough)
    resolver = {**CANARY[1], "LoadBalancer": {"Policy": "round_robin"}}
    mesh.set_chain(compile_chain(CANARY[0], resolver, *CANARY[2:]), UpstreamSettings(
        passive_health_check=PassiveHealthCheck(max_failures=2, base_ejection_time=1.0, max_ejection_percent=50)))
    bad = next(i for i in mesh.instances if i.name == "api-v1-0")
    await bad.inbound.close(0.1)  # connections to it now fail
    for _ in range(12):
        try:
            await mesh.stub.Unary(echo_pb2.EchoRequest(), metadata=(("x-test", "timeout"),), timeout=10)
        except grpc.aio.AioRpcError:
            pass
    assert metric(mesh.tel, "weft_outlier_ejections_total", upstream="api") >= 1
    assert f"127.0.0.1:{bad.port}" in mesh.outbound.describe_traffic()["api"]["ejected"]
    names = {await _instance_of(mesh, **{"x-test": "timeout"}) for _ in range(20)}
    assert names == {"api-v1-1"}
    await asyncio.sleep(1.2)
    assert f"127.0.0.1:{bad.port}" not in mesh.outbound.describe_traffic()["api"]["ejected"]


async def test_per_caller_limit_and_faults_at_the_inbound() -> None:
    async for mesh in make_mesh(per_subset=1, passthrough=True):
        target = mesh.instances[0]
        snap = target.holder()
        limits = limits_doc({"Callers": {"web": {"RequestsPerSecond": 1, "RequestsMaxBurst": 5}}})
        target.holder.set(Snapshot(**{**{f: getattr(snap, f) for f in snap.__dataclass_fields__},
                                      "inbound": InboundTraffic(caller_limits=limits, ratelimits_version="1")}))
        codes: Counter[str] = Counter()
        for _ in range(20):
            try:
                await mesh.stub.Unary(echo_pb2.EchoRequest(), metadata=(("x-test", "timeout"),), timeout=10)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    trailing: dict[str, Any] = dict(tuple(exc.trailing_metadata() or ()))  # type: ignore[arg-type]
                    assert trailing.get("retry-after") == "1"
        assert codes["OK"] <= 6 and codes["RESOURCE_EXHAUSTED"] >= 14, codes
        faults = faults_doc({"Abort": {"Percent": 100, "GrpcStatus": 13}})
        target.holder.set(Snapshot(**{**{f: getattr(snap, f) for f in snap.__dataclass_fields__},
                                      "inbound": InboundTraffic(faults=faults, faults_version="2")}))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.stub.Unary(echo_pb2.EchoRequest(), metadata=(("x-test", "timeout"),), timeout=10)
        assert err.value.code() == grpc.StatusCode.INTERNAL and "fault injected" in (err.value.details() or "")
        target.holder.set(snap)
        resp = await mesh.stub.Unary(echo_pb2.EchoRequest(), metadata=(("x-test", "timeout"),), timeout=10)
        assert resp.instance == target.name
        assert json.dumps(mesh.outbound.describe_traffic())  # JSON-able for /config
