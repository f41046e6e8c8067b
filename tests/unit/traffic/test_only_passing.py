"""Resolver subsets' OnlyPassing: warning instances serve a target unless it is set (critical ones never),
on plain values and through sidecar.state's per-target watches with a fake Consul."""

from __future__ import annotations

from typing import Any

import pytest

from catalog.chain import Target
from catalog.models import HealthCheck, ServiceInstance
from tests.unit.sidecar.pki import Authority
from tests.unit.sidecar.test_state import cur, instance, wait_until
from tests.unit.traffic.test_state_traffic import ChainConsul
from tests.unit.traffic.test_state_traffic import world as world  # the fixture, with this module's Consul

V1 = "v1.api.default.default.dc1"
V2 = "v2.api.default.default.dc1"


def test_target_admits_warning_unless_only_passing() -> None:
    t = Target(id="api.default.default.dc1", service="api")
    assert t.admits("passing") and t.admits("warning")
    assert not t.admits("critical") and not t.admits("maintenance")
    strict = Target(id="api.default.default.dc1", service="api", only_passing=True)
    assert strict.admits("passing") and not strict.admits("warning")


def _with_status(port: int, status: str) -> ServiceInstance:
    i = instance("api", port)
    check = HealthCheck(check_id=f"c{port}", name="alias", status=status)
    return ServiceInstance(node=i.node, node_address=i.node_address, service_id=i.service_id, service=i.service,
                           address=i.address, port=i.port, kind=i.kind, checks=(check,))


class HealthConsul(ChainConsul):
    """Answers ?passing as Consul does (instances whose checks all pass) and records what was asked."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: set[tuple[str, str, bool]] = set()

    async def health_connect(self, service: str, *, passing: bool = True, filter: str = "", index: int = 0,
                             wait: float | None = None) -> tuple[int, tuple[ServiceInstance, ...]]:
        self.asked.add((service, filter, passing))
        idx, found = await super().health_connect(service, passing=passing, filter=filter, index=index, wait=wait)
        return idx, tuple(i for i in found if not passing or i.status == "passing")


@pytest.fixture
def consul_class() -> type[ChainConsul]:
    return HealthConsul


async def test_warning_instances_serve_unless_the_subset_says_only_passing(world: Any) -> None:
    consul, leaf, state = world
    assert isinstance(consul, HealthConsul)
    v1, v2 = "Service.Meta.version == v1", "Service.Meta.version == v2"
    consul.connect["api"] = [_with_status(21001, "passing"), _with_status(21002, "warning")]
    consul.filtered[("api", v1)] = [_with_status(21001, "passing"), _with_status(21003, "warning"),
                                    _with_status(21004, "critical")]
    consul.filtered[("api", v2)] = [_with_status(21005, "passing"), _with_status(21006, "warning")]
    consul.config[("service-defaults", "api")] = {"Kind": "service-defaults", "Name": "api", "Protocol": "http"}
    consul.config[("service-resolver", "api")] = {
        "Kind": "service-resolver", "Name": "api", "DefaultSubset": "v1",
        "Subsets": {"v1": {"Filter": v1}, "v2": {"Filter": v2, "OnlyPassing": True}}}
    consul.config[("service-splitter", "api")] = {
        "Kind": "service-splitter", "Name": "api",
        "Splits": [{"Weight": 50, "ServiceSubset": "v1"}, {"Weight": 50, "ServiceSubset": "v2"}]}
    consul.bump()
    leaf.publish(Authority.root(), 1)

    def ports(tid: str) -> list[int]:
        snap = cur(state)
        return [e.port for e in snap.upstreams["api"].targets.get(tid, ())] if snap is not None else []

    await wait_until(lambda: ports(V1) == [21001, 21003] and ports(V2) == [21005], "subsets")
    assert ("api", v1, False) in consul.asked and ("api", v2, True) in consul.asked
    # the plain list (no chain entries) stays what ?passing answers
    assert [e.port for e in cur(state).upstreams["api"].endpoints] == [21001]

    # OnlyPassing flips on v1: a new watch asks for passing instances only, the old one stops writing
    consul.config[("service-resolver", "api")]["Subsets"]["v1"]["OnlyPassing"] = True
    consul.bump()
    await wait_until(lambda: ports(V1) == [21001], "v1 only passing")
    assert ("api", v1, True) in consul.asked
