"""Registration builders (Consul's sidecar shape) and TtlKeeper against an in-memory agent (no sockets)."""

from __future__ import annotations

import asyncio

import pytest

from catalog.models import ServiceRegistration, Upstream
from catalog.registration import TtlKeeper, service_registration, sidecar_registration, ttl_check, ttl_check_id
from tests.unit.catalog.fake_consul import FakeConsul


def test_sidecar_registration_has_consuls_shape() -> None:
    reg = sidecar_registration(service_id="orders-1", service_name="orders", port=21000, local_service_port=8080,
                               upstreams=[Upstream("payments", 9191)], meta={"protocol": "grpc"}, ttl="15s")
    api = reg.to_api()
    assert api["Kind"] == "connect-proxy"
    assert api["ID"] == "orders-1-sidecar-proxy" and api["Name"] == "orders-sidecar-proxy"
    assert api["Port"] == 21000 and api["Meta"] == {"protocol": "grpc"}
    assert api["Proxy"] == {"DestinationServiceName": "orders", "DestinationServiceID": "orders-1",
                            "LocalServiceAddress": "127.0.0.1", "LocalServicePort": 8080,
                            "Upstreams": [{"DestinationType": "service", "DestinationName": "payments",
                                           "LocalBindAddress": "127.0.0.1", "LocalBindPort": 9191}]}
    ttl, alias = api["Checks"]
    assert ttl["TTL"] == "15s" and ttl["DeregisterCriticalServiceAfter"] == "60s"
    assert ttl["CheckID"] == "orders-1-sidecar-proxy:ttl"
    assert alias["AliasService"] == "orders-1"
    assert ttl_check_id(reg) == "orders-1-sidecar-proxy:ttl"
    # what we write parses back to the same value
    assert ServiceRegistration.from_api(api) == reg


def test_builders_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="port"):
        sidecar_registration(service_id="a", service_name="a", port=0, local_service_port=1)
    with pytest.raises(ValueError, match="local_service_port"):
        sidecar_registration(service_id="a", service_name="a", port=1, local_service_port=70000)
    with pytest.raises(ValueError, match="same local address"):
        sidecar_registration(service_id="a", service_name="a", port=1, local_service_port=2,
                             upstreams=[Upstream("b", 9000), Upstream("c", 9000)])
    with pytest.raises(ValueError, match="minimum is 1m"):
        ttl_check("a", "10s", deregister_critical_after="30s")
    with pytest.raises(ValueError, match="name"):
        service_registration(name="", port=1)


def test_service_registration_without_ttl() -> None:
    reg = service_registration(name="web", port=8080, ttl=None, tags=["v1"])
    assert reg.checks == () and ttl_check_id(reg) == ""
    assert reg.to_api() == {"Name": "web", "ID": "web", "Port": 8080, "Tags": ["v1"]}


async def test_ttl_keeper_passes_reports_status_and_fails_on_stop() -> None:
    fake = FakeConsul()
    fake.checks["c1"] = ("critical", "")
    k = TtlKeeper(fake, "c1", "0.3s", note="ready")  # type: ignore[arg-type]
    k.start()
    try:
        for _ in range(200):
            if k.reports >= 3:
                break
            await asyncio.sleep(0.01)
        assert k.reports >= 3                                   # every TTL/3
        assert fake.checks["c1"] == ("passing", "ready")
        k.set_status("warning", "degraded")
        for _ in range(200):
            if fake.checks["c1"][0] == "warning":
                break
            await asyncio.sleep(0.01)
        assert fake.checks["c1"] == ("warning", "degraded")    # sent at once, not after a full interval
    finally:
        await k.stop("bye")
    assert fake.checks["c1"] == ("critical", "bye")


async def test_ttl_keeper_reregisters_when_the_agent_forgot_the_check() -> None:
    fake = FakeConsul()
    registered = asyncio.Event()

    async def reregister() -> None:
        fake.checks["c2"] = ("critical", "")
        registered.set()

    k = TtlKeeper(fake, "c2", "3s", on_missing=reregister)  # type: ignore[arg-type]
    k.start()
    try:
        await asyncio.wait_for(registered.wait(), 5)
        for _ in range(200):
            if fake.checks["c2"][0] == "passing":
                break
            await asyncio.sleep(0.01)
        assert fake.checks["c2"][0] == "passing"
    finally:
        await k.stop()
