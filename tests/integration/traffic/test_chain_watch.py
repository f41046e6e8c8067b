"""The catalog client and watch for /v1/discovery-chain against a real dev agent: typed chain,
blocking updates, fail static when the agent goes away."""

from __future__ import annotations

import asyncio

import pytest

from catalog.client import ConsulClient
from catalog.models import ConsulSettings
from catalog.watch import WatchPolicy, discovery_chain_watch
from tests.integration.devagent.b_http import call
from tests.support import DevAgent

pytestmark = pytest.mark.integration


async def test_watch_follows_config_writes_and_fails_static() -> None:
    agent = DevAgent()
    try:
        async with ConsulClient(ConsulSettings(port=agent.port)) as client:
            index, chain = await client.discovery_chain("shop")
            assert index > 0 and chain.default and chain.start.type == "resolver"
            watch = discovery_chain_watch(client, "shop", policy=WatchPolicy(wait=5, backoff_base=0.05,
                                                                              backoff_max=0.2, recovery_wait=0.2))
            it = watch.__aiter__()
            first = await asyncio.wait_for(it.__anext__(), 10)
            assert first.default
            split = {"Kind": "service-splitter", "Name": "shop",
                     "Splits": [{"Weight": 75}, {"Weight": 25, "ServiceSubset": "v2"}]}
            for entry in ({"Kind": "service-defaults", "Name": "shop", "Protocol": "http"},
                          {"Kind": "service-resolver", "Name": "shop", "Subsets": {"v2": {}}}, split):
                assert call(agent.url, "PUT", "/v1/config", entry)[1] is True
            while True:
                got = await asyncio.wait_for(it.__anext__(), 10)
                if got.start.type == "splitter":
                    break
            assert [s.weight for s in got.start.splits] == [75.0, 25.0]
            agent.stop()
            pending = asyncio.ensure_future(it.__anext__())  # the watch fetches while it is iterated
            for _ in range(100):
                if not watch.healthy:
                    break
                await asyncio.sleep(0.05)
            assert not watch.healthy and watch.last is got  # fail static: the last good chain stays
            assert not pending.done()
            watch.close()
            pending.cancel()
    finally:
        agent.stop()
