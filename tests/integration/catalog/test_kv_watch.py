"""ConsulClient KV and Watch against a real dev agent process."""

from __future__ import annotations

import asyncio

import pytest

from catalog.client import ConsulBadRequest, ConsulClient, ConsulUnavailable
from catalog.models import KVEntry
from catalog.watch import WatchPolicy, kv_prefix_watch, kv_watch
from tests.integration.catalog.helpers import client_for, until
from tests.support import DevAgent

pytestmark = pytest.mark.integration

FAST = WatchPolicy(wait=10, min_interval=0.02, backoff_base=0.05, backoff_max=0.3, recovery_wait=0.5)


async def test_kv_round_trip(module_agent: DevAgent) -> None:
    async with client_for(module_agent) as c:
        assert await c.kv_put("rt/a", b"\x00\x01bin", flags=42)
        index, e = await c.kv_get("rt/a")
        assert index >= 1 and e is not None
        assert (e.key, e.value, e.flags) == ("rt/a", b"\x00\x01bin", 42)
        # cas: 0 = create only; a stale index fails; the current index succeeds
        assert not await c.kv_put("rt/a", b"x", cas=0)
        assert not await c.kv_put("rt/a", b"x", cas=e.modify_index + 1000)
        assert await c.kv_put("rt/a", "text", cas=e.modify_index)
        _, e2 = await c.kv_get("rt/a")
        assert e2 is not None and e2.text() == "text" and e2.modify_index > e.modify_index
        await c.kv_put("rt/b/c", b"1")
        _, entries = await c.kv_get_recurse("rt/")
        assert [x.key for x in entries] == ["rt/a", "rt/b/c"]
        _, keys = await c.kv_keys("rt/", separator="/")
        assert keys == ("rt/a", "rt/b/")
        # a missing key: None, with an index to block on
        index, missing = await c.kv_get("rt/missing")
        assert missing is None and index >= 1
        assert await c.kv_delete("rt/", recurse=True)
        _, entries = await c.kv_get_recurse("rt/")
        assert entries == ()


async def test_kv_put_too_large_is_a_bad_request(module_agent: DevAgent) -> None:
    async with client_for(module_agent) as c:
        with pytest.raises(ConsulBadRequest) as err:
            await c.kv_put("big", b"x" * (512 * 1024 + 1))
        assert err.value.status == 413


async def test_blocking_get_wakes_on_change(module_agent: DevAgent) -> None:
    async with client_for(module_agent) as c, client_for(module_agent) as writer:
        await c.kv_put("blk/k", b"1")
        index, _ = await c.kv_get("blk/k")
        pending = asyncio.ensure_future(c.kv_get("blk/k", index=index, wait=30))
        await asyncio.sleep(0.2)
        assert not pending.done()
        await writer.kv_put("blk/k", b"2")
        new_index, e = await asyncio.wait_for(pending, 20)
        assert new_index > index and e is not None and e.value == b"2"


async def test_watch_yields_changes_only(module_agent: DevAgent) -> None:
    async with client_for(module_agent) as c, client_for(module_agent) as writer:
        w = kv_watch(c, "wch/key", policy=FAST)
        assert await asyncio.wait_for(w.first(), 20) is None
        await writer.kv_put("wch/key", b"v1")
        got = await asyncio.wait_for(w.__anext__(), 20)
        assert isinstance(got, KVEntry) and got.value == b"v1"
        # writes elsewhere raise the index (spurious wake-ups of a single-key query) but are not yielded:
        # the next value yielded is the next real change of this key
        for i in range(3):
            await writer.kv_put(f"wch/other{i}", b"x")
        await writer.kv_put("wch/key", b"v2")
        got = await asyncio.wait_for(w.__anext__(), 20)
        assert got is not None and got.value == b"v2"
        assert w.healthy and w.index >= got.modify_index
        w.close()


async def test_prefix_watch(module_agent: DevAgent) -> None:
    async with client_for(module_agent) as c, client_for(module_agent) as writer:
        w = kv_prefix_watch(c, "pfx/", policy=FAST)
        assert await asyncio.wait_for(w.first(), 20) == ()
        await writer.kv_put("pfx/a", b"1")
        got = await asyncio.wait_for(w.__anext__(), 20)
        assert [e.key for e in got] == ["pfx/a"]
        w.close()


async def test_unreachable_agent_is_unavailable() -> None:
    from catalog.models import ConsulSettings
    from tests.support import free_port
    c = ConsulClient(ConsulSettings.from_env({"CONSUL_HTTP_ADDR": f"127.0.0.1:{free_port()}"}))
    with pytest.raises(ConsulUnavailable):
        await c.kv_get("x")
    await c.close()


async def test_watch_fails_static_and_recovers_after_agent_restart() -> None:
    agent = DevAgent()
    port = agent.port
    try:
        async with client_for(agent) as c:
            await c.kv_put("fs/key", b"before")
            for i in range(5):
                await c.kv_put(f"fs/pad{i}", b"x")
            w = kv_watch(c, "fs/key", policy=FAST)
            pw = kv_prefix_watch(c, "fs/", policy=FAST)
            first = await asyncio.wait_for(w.first(), 20)
            assert first is not None and first.value == b"before"
            assert len(await asyncio.wait_for(pw.first(), 20)) == 6
            high_index = pw.index
            nxt = asyncio.ensure_future(w.__anext__())
            pnxt = asyncio.ensure_future(pw.__anext__())

            agent.stop()
            await until(lambda: not w.healthy and not pw.healthy, what="watches to notice the agent is gone")
            assert w.last == first                      # fail static: the last good value is kept
            assert pw.last is not None and len(pw.last) == 6
            assert isinstance(w.last_error, ConsulUnavailable)
            assert not nxt.done() and not pnxt.done()
            stale_success = w.last_success_time

            agent = DevAgent(port=port)                 # same address, fresh state
            # the single key's index is its ModifyIndex: the fresh agent answers the same index as before
            # with other data; the prefix's index goes backwards (a reset)
            await c.kv_put("fs/key", b"after")
            got = await asyncio.wait_for(nxt, 30)
            assert got is not None and got.value == b"after"
            assert w.healthy and w.last_error is None
            assert w.last_success_time is not None and stale_success is not None
            assert w.last_success_time > stale_success
            pgot = await asyncio.wait_for(pnxt, 30)
            assert [e.key for e in pgot] == ["fs/key"]
            assert pw.plan.resets >= 1 and pw.index < high_index
            w.close()
            pw.close()
    finally:
        agent.stop()


async def test_keys_with_reserved_characters_round_trip(module_agent: DevAgent) -> None:
    odd = ["odd/a b/c", "odd/plus+sign", "odd/pct%41", "odd/q?x=1", "odd/hash#frag", "odd/semi;colon",
           "odd/uni/ключ", "odd/amp&x=y", "odd/colon:port"]
    async with client_for(module_agent) as c:
        for key in odd:
            assert await c.kv_put(key, key.encode())
            _, e = await c.kv_get(key)
            assert e is not None and (e.key, e.value) == (key, key.encode())
        _, keys = await c.kv_keys("odd/")
        assert sorted(keys) == sorted(odd)
        assert await c.kv_delete("odd/", recurse=True)
