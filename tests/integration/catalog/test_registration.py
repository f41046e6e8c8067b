"""Registration helpers, TTL keeping and health/connect watches against a real dev agent process."""

from __future__ import annotations

import asyncio

import pytest

from catalog.models import ServiceInstance, Upstream
from catalog.registration import Registered, TtlKeeper, service_registration, sidecar_registration
from catalog.watch import WatchPolicy, agent_service_watch, health_connect_watch
from tests.integration.catalog.helpers import client_for, until
from tests.support import DevAgent

pytestmark = pytest.mark.integration

FAST = WatchPolicy(wait=10, min_interval=0.02, backoff_base=0.05, backoff_max=0.3, recovery_wait=0.5,
                   poll_interval=0.1)


async def test_sidecar_registered_listed_by_health_connect_then_deregistered(module_agent: DevAgent) -> None:
    async with client_for(module_agent) as c:
        app = service_registration(name="orders", service_id="orders-1", port=8080, ttl=None)
        sidecar = sidecar_registration(service_id="orders-1", service_name="orders", port=21000,
                                       local_service_port=8080, upstreams=[Upstream("payments", 9191)],
                                       ttl="10s")
        watch = health_connect_watch(c, "orders", policy=FAST)
        assert await asyncio.wait_for(watch.first(), 20) == ()
        async with Registered(c, app), Registered(c, sidecar) as r:
            assert r.keeper is not None
            got: tuple[ServiceInstance, ...] = ()
            while not got:                               # critical until the keeper's first pass
                got = await asyncio.wait_for(watch.__anext__(), 20)
            (inst,) = got
            assert inst.service_id == "orders-1-sidecar-proxy" and inst.service == "orders-sidecar-proxy"
            assert inst.kind == "connect-proxy" and inst.port == 21000 and inst.destination == "orders"
            assert inst.proxy is not None and inst.proxy.destination_service_id == "orders-1"
            assert inst.proxy.local_service_port == 8080
            assert [(u.destination_name, u.local_bind_port) for u in inst.proxy.upstreams] == [("payments", 9191)]
            assert inst.status == "passing"
            _, reg = await c.agent_service("orders-1-sidecar-proxy")
            assert reg is not None and reg.kind == "connect-proxy"
            checks = await c.agent_checks()
            assert checks["orders-1-sidecar-proxy:ttl"].status == "passing"
        # on exit: check failed, services deregistered
        assert await asyncio.wait_for(watch.__anext__(), 20) == ()
        _, reg = await c.agent_service("orders-1-sidecar-proxy")
        assert reg is None
        watch.close()


async def test_ttl_lapse_makes_instance_critical_and_keeper_warns(module_agent: DevAgent) -> None:
    async with client_for(module_agent) as c:
        reg = service_registration(name="lapse", port=9000, ttl="2s")
        await c.agent_service_register(reg)
        keeper = TtlKeeper(c, "lapse:ttl", "2s", note="alive")
        keeper.start()
        try:
            await until(lambda: keeper.reports >= 1, what="first TTL report")
            _, passing = await c.health_service("lapse")
            assert len(passing) == 1
            keeper.set_status("warning", "degraded")
            await until(lambda: keeper.reports >= 2)

            async def status() -> str:
                return (await c.agent_checks())["lapse:ttl"].status

            for _ in range(100):
                if await status() == "warning":
                    break
                await asyncio.sleep(0.05)
            assert await status() == "warning"
            _, passing = await c.health_service("lapse")
            assert passing == ()                          # ?passing drops warning instances too
        finally:
            await keeper.stop(fail=False)
        # nothing reports any more: the TTL lapses and the check turns critical
        for _ in range(200):
            if await status() == "critical":
                break
            await asyncio.sleep(0.1)
        assert await status() == "critical"
        _, everything = await c.health_service("lapse", passing=False)
        assert everything[0].status == "critical"
        await c.agent_service_deregister("lapse")


async def test_agent_service_hash_watch(module_agent: DevAgent) -> None:
    async with client_for(module_agent) as c:
        w = agent_service_watch(c, "hw-1", policy=FAST)
        assert await asyncio.wait_for(w.first(), 20) is None
        await c.agent_service_register(service_registration(name="hw", service_id="hw-1", port=1, ttl=None))
        reg = await asyncio.wait_for(w.__anext__(), 20)
        assert reg is not None and reg.port == 1 and w.hash
        await c.agent_service_register(service_registration(name="hw", service_id="hw-1", port=2, ttl=None))
        reg = await asyncio.wait_for(w.__anext__(), 20)
        assert reg is not None and reg.port == 2
        await c.agent_service_deregister("hw-1")
        assert await asyncio.wait_for(w.__anext__(), 20) is None
        w.close()


async def test_keeper_reregisters_after_agent_restart() -> None:
    agent = DevAgent()
    port = agent.port
    try:
        async with client_for(agent) as c:
            reg = service_registration(name="phoenix", port=7000, ttl="2s")
            async with Registered(c, reg) as r:
                assert r.keeper is not None
                await until(lambda: r.keeper is not None and r.keeper.reports >= 1)
                agent.stop()
                await until(lambda: r.keeper is not None and r.keeper.last_error is not None)
                agent = DevAgent(port=port)               # fresh agent: it forgot the service
                found: tuple[ServiceInstance, ...] = ()
                for _ in range(200):
                    _, found = await c.health_service("phoenix")
                    if found:
                        break
                    await asyncio.sleep(0.05)
                assert [i.service_id for i in found] == ["phoenix"]
    finally:
        agent.stop()


async def test_connect_sidecar_service_expansion_parses(module_agent: DevAgent) -> None:
    from catalog.models import ProxyConfig, ServiceRegistration

    async with client_for(module_agent) as c:
        reg = ServiceRegistration(name="expand", id="expand-1", port=8080,
                                  sidecar_service=ServiceRegistration(name="", proxy=ProxyConfig(
                                      upstreams=(Upstream("payments", 9191),))))
        await c.agent_service_register(reg)
        try:
            _, side = await c.agent_service("expand-1-sidecar-proxy")
            assert side is not None and side.kind == "connect-proxy" and side.name == "expand-sidecar-proxy"
            assert 21000 <= side.port <= 21255
            assert side.proxy is not None
            assert (side.proxy.destination_service_name, side.proxy.destination_service_id) == ("expand", "expand-1")
            assert side.proxy.local_service_port == 8080
            (up,) = side.proxy.upstreams
            assert (up.destination_name, up.local_bind_port, up.local_bind_address) == ("payments", 9191, "127.0.0.1")
            _, instances = await c.health_connect("expand", passing=False)
            assert [i.service_id for i in instances] == ["expand-1-sidecar-proxy"]
            assert instances[0].port == side.port and instances[0].destination == "expand"
        finally:
            await c.agent_service_deregister("expand-1")


async def test_standalone_check_register_update_deregister(module_agent: DevAgent) -> None:
    from catalog.client import ConsulNotFound
    from catalog.models import CheckDefinition

    async with client_for(module_agent) as c:
        await c.agent_check_register(CheckDefinition(name="solo", check_id="solo-check", ttl="30s"))
        await c.agent_check_update("solo-check", "warning", "half way")
        checks = await c.agent_checks()
        assert (checks["solo-check"].status, checks["solo-check"].output) == ("warning", "half way")
        await c.agent_check_pass("solo-check", "fine")
        assert (await c.agent_checks())["solo-check"].status == "passing"
        await c.agent_check_deregister("solo-check")
        assert "solo-check" not in await c.agent_checks()
        with pytest.raises(ConsulNotFound):
            await c.agent_check_pass("solo-check")
        with pytest.raises(ValueError, match="status"):
            await c.agent_check_update("solo-check", "fine")
