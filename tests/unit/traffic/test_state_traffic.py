"""sidecar.state's traffic watches with a fake Consul: the chain, per-target endpoints, service-defaults
settings and the KV documents reach the snapshot; bad documents keep the last good one."""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import pytest

from ca.client import LeafManager
from catalog.chain import CompiledChain, parse_chain
from catalog.client import ConsulClient
from catalog.models import ServiceInstance
from catalog.watch import WatchPolicy
from devagent import chaincompile, configcheck
from sidecar.snapshot import Registration, UpstreamConfig
from sidecar.state import SidecarState
from tests.unit.sidecar.pki import Authority
from tests.unit.sidecar.test_state import FakeConsul, FakeLeaf, cur, instance, proxy_reg, wait_until


class ChainConsul(FakeConsul):
    def __init__(self) -> None:
        super().__init__()
        self.filtered: dict[tuple[str, str], list[ServiceInstance]] = {}

    async def discovery_chain(self, service: str, *, compile_dc: str = "", index: int = 0,
                              wait: float | None = None) -> tuple[int, CompiledChain]:
        await self._block(index, wait)
        table = {k: configcheck.normalize_and_validate(v) for k, v in self.config.items()}
        compiled = chaincompile.compile_chain(lambda k, n: table.get((k, n)), service)
        return self.index, parse_chain({"Chain": compiled.chain})

    async def health_connect(self, service: str, *, passing: bool = True, filter: str = "", index: int = 0,
                             wait: float | None = None) -> tuple[int, tuple[ServiceInstance, ...]]:
        await self._block(index, wait)
        if filter:
            return self.index, tuple(self.filtered.get((service, filter), ()))
        return self.index, tuple(self.connect.get(service, ()))


@pytest.fixture
def consul_class() -> type[ChainConsul]:
    """The fake Consul of ``world`` (a test module may give another one)."""
    return ChainConsul


@pytest.fixture
async def world(consul_class: type[ChainConsul]) -> Any:
    consul = consul_class()
    consul.agent["web-1-sidecar-proxy"] = proxy_reg("api")
    leaf = FakeLeaf()
    reg = Registration(service="web", service_id="web-1", proxy_id="web-1-sidecar-proxy", public_address="127.0.0.1",
                       public_port=21000, local_service_address="127.0.0.1", local_service_port=8080,
                       upstreams=(UpstreamConfig("api", 9000),), protocol="http")
    state = SidecarState(cast(ConsulClient, consul), cast(LeafManager, leaf), reg, app_protocol_meta="http",
                         watch_policy=WatchPolicy(wait=1.0, min_interval=0.0, backoff_base=0.01, backoff_max=0.05,
                                                  recovery_wait=0.1),
                         reflect=False)
    state.start()
    try:
        yield consul, leaf, state
    finally:
        await state.close()


async def test_chain_targets_settings_and_documents(world: Any) -> None:
    consul, leaf, state = world
    consul.connect["api"] = [instance("api", 21001), instance("api", 21002)]
    consul.bump()
    leaf.publish(Authority.root(), 1)
    await wait_until(lambda: cur(state) is not None and cur(state).upstreams["api"].chain is not None, "chain")
    up = cur(state).upstreams["api"]
    assert up.chain.default and not up.routed
    assert [e.port for e in up.targets["api.default.default.dc1"]] == [21001, 21002]

    # a canary: subsets by filter, a split; each subset's endpoints come from its own filtered watch
    consul.config[("service-defaults", "api")] = {"Kind": "service-defaults", "Name": "api", "Protocol": "http"}
    consul.config[("service-resolver", "api")] = {
        "Kind": "service-resolver", "Name": "api", "DefaultSubset": "v1",
        "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"Filter": "Service.Meta.version == v2"}}}
    consul.config[("service-splitter", "api")] = {
        "Kind": "service-splitter", "Name": "api",
        "Splits": [{"Weight": 90, "ServiceSubset": "v1"}, {"Weight": 10, "ServiceSubset": "v2"}]}
    consul.filtered[("api", "Service.Meta.version == v1")] = [instance("api", 21001)]
    consul.filtered[("api", "Service.Meta.version == v2")] = [instance("api", 21002)]
    consul.config[("service-defaults", "web")] = {
        "Kind": "service-defaults", "Name": "web", "LocalRequestTimeoutMs": 1500,
        "UpstreamConfig": {"Overrides": [{"Name": "api", "PassiveHealthCheck": {"MaxFailures": 2}}]}}
    consul.bump()
    v2 = "v2.api.default.default.dc1"
    await wait_until(lambda: cur(state).upstreams["api"].chain.start.type == "splitter"
                     and [e.port for e in cur(state).upstreams["api"].targets.get(v2, ())] == [21002], "canary")
    up = cur(state).upstreams["api"]
    assert up.routed and [e.port for e in up.targets["v1.api.default.default.dc1"]] == [21001]
    assert up.settings.passive_health_check is not None and up.settings.passive_health_check.max_failures == 2
    assert cur(state).inbound.local.request_timeout == 1.5
    shown = cur(state).describe()["upstreams"]["api"]["chain"]
    assert shown["targets"][v2]["endpoints"] == ["127.0.0.1:21002"]
    assert shown["nodes"]["splitter:api.default.default"]["splits"][1] == {
        "weight": 10.0, "next": "resolver:v2.api.default.default.dc1"}

    # KV documents: good ones apply, a bad one keeps the last good one, removal turns it off
    consul.kv["weft/ratelimits/web"] = json.dumps({"PerCaller": {"RequestsPerSecond": 5}}).encode()
    consul.kv["weft/faults/web"] = json.dumps({"Abort": {"Percent": 50}}).encode()
    consul.bump()
    await wait_until(lambda: cur(state).inbound.caller_limits is not None and cur(state).inbound.faults is not None,
                     "documents")
    consul.kv["weft/ratelimits/web"] = b'{"PerCaller": {"RequestsPerSecond": -1}}'
    consul.bump()
    await asyncio.sleep(0.2)
    assert cur(state).inbound.caller_limits.per_caller.rate == 5
    del consul.kv["weft/faults/web"]
    consul.bump()
    await wait_until(lambda: cur(state).inbound.faults is None, "faults removed")
    assert cur(state).describe()["inbound"]["caller_rate_limits"]["per_caller"] == {
        "RequestsPerSecond": 5.0, "RequestsMaxBurst": 5.0}
