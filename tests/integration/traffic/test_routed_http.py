"""Traffic management for HTTP services, in one process with real sockets on loopback: a client ->
web's outbound HTTP listener (routed through api's chain) -> mTLS -> api instances' inbound (full
path) -> HTTP echo apps named api-v1-N / api-v2-N."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from catalog.chain import CompiledChain, parse_chain
from devagent import chaincompile, configcheck
from sidecar.inbound import Inbound
from sidecar.outbound import Outbound
from sidecar.ratelimit import parse_document as limits_doc
from sidecar.snapshot import Endpoint, InboundTraffic, Registration, SnapshotBuilder, UpstreamConfig
from sidecar.telemetry import Telemetry
from sidecar.tls import TlsContexts
from sidecar.upstreamconfig import LocalSettings
from tests.apps.httpecho import server as httpecho
from tests.integration.sidecar.harness import Authority, Holder, table
from tests.support import free_port

pytestmark = pytest.mark.integration

ENTRIES: list[dict[str, Any]] = [
    {"Kind": "service-defaults", "Name": "api", "Protocol": "http"},
    {"Kind": "service-resolver", "Name": "api", "DefaultSubset": "v1",
     "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"Filter": "Service.Meta.version == v2"}}},
    {"Kind": "service-splitter", "Name": "api",
     "Splits": [{"Weight": 75, "ServiceSubset": "v1"}, {"Weight": 25, "ServiceSubset": "v2"}]},
    {"Kind": "service-router", "Name": "api", "Routes": [
        {"Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "1"}]}},
         "Destination": {"ServiceSubset": "v2", "RequestHeaders": {"Set": {"x-routed": "canary"}}}},
        {"Match": {"HTTP": {"PathPrefix": "/old/", "Methods": ["GET"]}},
         "Destination": {"ServiceSubset": "v1", "PrefixRewrite": "/new/"}},
        {"Match": {"HTTP": {"PathPrefix": "/slow"}}, "Destination": {"RequestTimeout": "300ms"}},
        {"Match": {"HTTP": {"PathPrefix": "/retry"}},
         "Destination": {"ServiceSubset": "v1", "NumRetries": 2, "RetryOnStatusCodes": [502]}},
    ]},
]
V1, V2 = "v1.api.default.default.dc1", "v2.api.default.default.dc1"


def compile_chain() -> CompiledChain:
    t = {(e["Kind"], e["Name"]): configcheck.normalize_and_validate(e) for e in ENTRIES}
    return parse_chain({"Chain": chaincompile.compile_chain(lambda k, n: t.get((k, n)), "api").chain})


@dataclass
class Api:
    name: str
    subset: str
    runner: Any
    inbound: Inbound
    holder: Holder
    port: int


@dataclass
class HttpMesh:
    url: str
    apis: list[Api]
    outbound: Outbound
    tel: Telemetry


@pytest.fixture
async def mesh() -> AsyncIterator[HttpMesh]:
    ca = Authority.root()
    apis = []
    for subset in ("v1", "v2"):
        for i in range(2):
            name = f"api-{subset}-{i}"
            runner, app_port = await httpecho.start(0, name=name)
            b = SnapshotBuilder()
            b.set_registration(Registration(service="api", service_id=name, proxy_id=f"{name}-sidecar-proxy",
                                            public_address="127.0.0.1", public_port=0,
                                            local_service_address="127.0.0.1", local_service_port=app_port,
                                            protocol="http"))
            b.set_credentials(ca.leaf("api"))
            policy = table("api", ("web", "allow"))
            b.set_policy(policy, policy.version)
            snap = b.build()
            assert snap is not None
            holder = Holder(snap)
            inbound = Inbound(holder, Telemetry(), TlsContexts(), passthrough_enabled=False)
            holder.listeners.append(inbound.on_snapshot)
            apis.append(Api(name, subset, runner, inbound, holder, await inbound.start("127.0.0.1", 0)))
    local = free_port()
    b = SnapshotBuilder()
    b.set_registration(Registration(service="web", service_id="web-1", proxy_id="web-1-sidecar-proxy",
                                    public_address="127.0.0.1", public_port=0, local_service_address="127.0.0.1",
                                    local_service_port=1, upstreams=(UpstreamConfig("api", local),), protocol="http"))
    b.set_credentials(ca.leaf("web"))
    b.set_policy(table("web"), "v")
    b.set_endpoints("api", [Endpoint("127.0.0.1", a.port, a.name) for a in apis])
    b.set_protocol("api", "http")
    b.set_chain("api", compile_chain())
    for subset, tid in (("v1", V1), ("v2", V2)):
        b.set_target_endpoints(tid, [Endpoint("127.0.0.1", a.port, a.name) for a in apis if a.subset == subset])
    snap = b.build()
    assert snap is not None
    web = Holder(snap)
    tel = Telemetry()
    outbound = Outbound(web, tel, TlsContexts())
    web.listeners.append(outbound.on_snapshot)
    await outbound.start()
    try:
        yield HttpMesh(f"http://127.0.0.1:{local}", apis, outbound, tel)
    finally:
        await outbound.close(0.1)
        for a in apis:
            await a.inbound.close()
            await a.runner.cleanup()


async def _get(session: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, dict[str, Any], Any]:
    async with session.get(url, headers={k.replace("_", "-"): v for k, v in headers.items()}) as resp:
        body = await resp.json(content_type=None) if resp.content_type == "application/json" else await resp.text()
        return resp.status, dict(resp.headers), body


async def test_split_header_route_rewrite_and_header_changes(mesh: HttpMesh) -> None:
    async with aiohttp.ClientSession() as s:
        subsets: Counter[str] = Counter()
        for _ in range(400):
            status, headers, _ = await _get(s, mesh.url + "/hello")
            assert status == 200
            subsets[headers["x-echo-instance"].split("-")[1]] += 1
        assert abs(subsets["v2"] / 400 - 0.25) <= 0.09, subsets
        status, headers, body = await _get(s, mesh.url + "/x", x_canary="1")
        assert headers["x-echo-instance"].startswith("api-v2-") and body["headers"]["x-routed"] == "canary"
        status, headers, body = await _get(s, mesh.url + "/old/thing?q=1")
        assert status == 200 and body["path"] == "/new/thing" and body["query"] == {"q": "1"}
        assert headers["x-echo-instance"].startswith("api-v1-")


async def test_route_timeout_is_504_and_status_retries_rescue(mesh: HttpMesh) -> None:
    async with aiohttp.ClientSession() as s:
        status, _, body = await _get(s, mesh.url + "/slow", x_echo_delay_ms="2000")
        assert status == 504 and "route's timeout of 0.3s" in body
        # api-v1-0's app is gone: its sidecar answers 502; the route retries 502 on the other v1
        gone = next(a for a in mesh.apis if a.name == "api-v1-0")
        await gone.runner.cleanup()
        for _ in range(20):
            status, headers, _ = await _get(s, mesh.url + "/retry")
            assert status == 200 and headers["x-echo-instance"] == "api-v1-1"
    assert (mesh.tel.registry.get_sample_value("weft_retries_total", {"upstream": "api"}) or 0) >= 1


async def test_inbound_rate_limit_and_local_timeout(mesh: HttpMesh) -> None:
    limits = limits_doc({"Callers": {"web": {"RequestsPerSecond": 1, "RequestsMaxBurst": 2}}})
    for a in mesh.apis:
        snap = a.holder()
        a.holder.set(dataclasses.replace(snap, inbound=InboundTraffic(
            local=LocalSettings(request_timeout=0.3), caller_limits=limits, ratelimits_version="1")))
    async with aiohttp.ClientSession() as s:
        statuses: Counter[int] = Counter()
        retry_after: set[str | None] = set()
        for _ in range(30):
            status, headers, _ = await _get(s, mesh.url + "/x", x_canary="1")  # both v2 instances
            statuses[status] += 1
            if status == 429:
                retry_after.add({k.lower(): v for k, v in headers.items()}.get("retry-after"))
        assert statuses[200] <= 5 and statuses[429] >= 25 and retry_after == {"1"}, statuses
        await asyncio.sleep(1.1)
        status, _, body = await _get(s, mesh.url + "/x", x_canary="1", x_echo_delay_ms="2000")
        assert status == 504 and "LocalRequestTimeoutMs" in body
