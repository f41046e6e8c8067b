"""Config entries and Connect intentions through ConsulClient against a real dev agent process."""

from __future__ import annotations

import asyncio

import pytest

from catalog.client import ConsulBadRequest
from catalog.watch import WatchPolicy, config_entry_watch, intentions_watch
from tests.integration.catalog.helpers import client_for
from tests.support import DevAgent

pytestmark = pytest.mark.integration

FAST = WatchPolicy(wait=10, min_interval=0.02, backoff_base=0.05, backoff_max=0.3, recovery_wait=0.5)


async def test_config_entry_round_trip_with_cas(module_agent: DevAgent) -> None:
    async with client_for(module_agent) as c:
        assert await c.config_put({"Kind": "service-defaults", "Name": "cfg-api", "Protocol": "grpc"})
        _, entry = await c.config_get("service-defaults", "cfg-api")
        assert entry is not None and entry["Protocol"] == "grpc"
        modify = entry["ModifyIndex"]
        assert not await c.config_put({"Kind": "service-defaults", "Name": "cfg-api", "Protocol": "http"},
                                      cas=modify + 1000)
        assert await c.config_put({"Kind": "service-defaults", "Name": "cfg-api", "Protocol": "http"}, cas=modify)
        _, entries = await c.config_list("service-defaults")
        assert [e["Protocol"] for e in entries if e["Name"] == "cfg-api"] == ["http"]
        assert await c.config_delete("service-defaults", "cfg-api")
        _, gone = await c.config_get("service-defaults", "cfg-api")
        assert gone is None


async def test_config_entry_rejected_with_consuls_message(module_agent: DevAgent) -> None:
    async with client_for(module_agent) as c:
        with pytest.raises(ConsulBadRequest) as err:
            await c.config_put({"Kind": "service-defaults", "Name": "bad", "Protocol": 7})
        assert err.value.message


async def test_config_entry_watch_wakes_on_change(module_agent: DevAgent) -> None:
    async with client_for(module_agent) as c, client_for(module_agent) as writer:
        w = config_entry_watch(c, "service-defaults", "cfg-watch", policy=FAST)
        assert await asyncio.wait_for(w.first(), 20) is None
        await writer.config_put({"Kind": "service-defaults", "Name": "cfg-watch", "Protocol": "grpc"})
        got = await asyncio.wait_for(w.__anext__(), 20)
        assert got is not None and got["Protocol"] == "grpc"
        w.close()


async def test_intentions_exact_are_one_store_with_service_intentions(module_agent: DevAgent) -> None:
    async with client_for(module_agent) as c:
        w = intentions_watch(c, policy=FAST)
        before = await asyncio.wait_for(w.first(), 20)
        assert await c.intention_put("int-web", "int-db", {"Action": "allow", "Description": "web may call db"})
        got = await c.intention_get("int-web", "int-db")
        assert got is not None and got["Action"] == "allow" and got["SourceName"] == "int-web"
        listed = await asyncio.wait_for(w.__anext__(), 20)
        assert len(listed) == len(before) + 1
        # Consul 1.9+: the same intention is a source of the destination's service-intentions entry
        _, entry = await c.config_get("service-intentions", "int-db")
        assert entry is not None
        assert [(s["Name"], s["Action"]) for s in entry["Sources"]] == [("int-web", "allow")]
        assert await c.intention_delete("int-web", "int-db")
        assert await c.intention_get("int-web", "int-db") is None
        w.close()
