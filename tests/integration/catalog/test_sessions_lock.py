"""Sessions, txn and LeaderLock against a real dev agent process."""

from __future__ import annotations

import asyncio
import sys

import pytest

from catalog.client import ConsulNotFound, ConsulTxnConflict
from catalog.lock import LeaderLock
from catalog.models import KVTxnOp
from tests.integration.catalog.helpers import client_for, until
from tests.support import DevAgent, Proc

pytestmark = pytest.mark.integration


async def test_session_create_info_renew_destroy(module_agent: DevAgent) -> None:
    async with client_for(module_agent) as c:
        sid = await c.session_create(name="t", ttl="10s", behavior="delete", lock_delay="1s")
        _, info = await c.session_info(sid)
        assert info is not None and info.id == sid and info.behavior == "delete"
        assert info.ttl == 10.0 and info.lock_delay == 1.0
        renewed = await c.session_renew(sid)
        assert renewed.id == sid
        assert await c.session_destroy(sid)
        _, gone = await c.session_info(sid)
        assert gone is None
        with pytest.raises(ConsulNotFound):
            await c.session_renew(sid)


async def test_acquire_release_and_behavior_delete(module_agent: DevAgent) -> None:
    async with client_for(module_agent) as c:
        s1 = await c.session_create(ttl="10s", lock_delay="0s")
        s2 = await c.session_create(ttl="10s", lock_delay="0s", behavior="delete")
        assert await c.kv_put("lk/a", b"one", acquire=s1)
        assert not await c.kv_put("lk/a", b"two", acquire=s2)
        _, e = await c.kv_get("lk/a")
        assert e is not None and e.session == s1 and e.lock_index == 1
        assert await c.kv_put("lk/a", b"one", release=s1)
        assert await c.kv_put("lk/a", b"two", acquire=s2)
        await c.session_destroy(s2)              # Behavior delete: the held key goes with the session
        _, e = await c.kv_get("lk/a")
        assert e is None
        await c.session_destroy(s1)


async def test_txn_all_or_nothing(module_agent: DevAgent) -> None:
    async with client_for(module_agent) as c:
        await c.kv_put("tx/a", b"0")
        _, a = await c.kv_get("tx/a")
        assert a is not None
        results = await c.txn([KVTxnOp("cas", "tx/a", b"1", index=a.modify_index), KVTxnOp("set", "tx/b", b"2"),
                               KVTxnOp("get", "tx/a")])
        assert [r.key for r in results if r is not None][:2] == ["tx/a", "tx/b"]
        with pytest.raises(ConsulTxnConflict) as err:
            await c.txn([KVTxnOp("set", "tx/c", b"3"), KVTxnOp("cas", "tx/a", b"x", index=a.modify_index)])
        assert [e.op_index for e in err.value.errors] == [1]
        _, c_entry = await c.kv_get("tx/c")
        assert c_entry is None                    # rolled back: nothing applied
        _, a2 = await c.kv_get("tx/a")
        assert a2 is not None and a2.value == b"1"


async def test_leader_lock_exclusive_and_takeover_on_release(module_agent: DevAgent) -> None:
    async with client_for(module_agent) as c1, client_for(module_agent) as c2:
        a = LeaderLock(c1, "weft/test/leader-release", ttl="10s", lock_delay="0s", value=b"A")
        b = LeaderLock(c2, "weft/test/leader-release", ttl="10s", lock_delay="0s", value=b"B")
        async with a:
            await asyncio.wait_for(a.acquired(), 20)
            b.start()                                # campaign only once A holds the lock
            waiting = asyncio.ensure_future(b.acquired())
            await until(lambda: b.leader_value == b"A", what="standby to see the leader")
            assert not waiting.done() and not b.held
            await a.stop()
            await asyncio.wait_for(waiting, 20)
            assert b.held and a.lost.is_set()
            _, e = await c1.kv_get("weft/test/leader-release")
            assert e is not None and e.value == b"B" and e.session == b.session_id
            await b.stop()
        _, e = await c1.kv_get("weft/test/leader-release")
        assert e is not None and e.session == ""


async def test_leader_lock_loss_when_session_destroyed(module_agent: DevAgent) -> None:
    async with client_for(module_agent) as c:
        a = LeaderLock(c, "weft/test/leader-loss", ttl="10s", lock_delay="0s")
        async with a:
            await asyncio.wait_for(a.acquired(), 20)
            await c.session_destroy(a.session_id)    # as an operator or a TTL lapse would
            await asyncio.wait_for(a.lost.wait(), 20)
            assert not a.held


async def test_leader_lock_takeover_after_holder_crash() -> None:
    # session_ttl_min lowered (as Consul's agent option allows) so that the TTL lapses within seconds
    agent = DevAgent("-session-ttl-min", "1s")
    key = "weft/test/leader-crash"
    holder = Proc([sys.executable, "-m", "tests.integration.catalog.lock_holder", key, "crashy", "2s"],
                  env=agent.env)
    try:
        await until(lambda: "acquired" in holder.output(), timeout=30, what="holder to acquire")
        async with client_for(agent) as c:
            b = LeaderLock(c, key, ttl="2s", lock_delay="0s", value=b"B")
            async with b:
                waiting = asyncio.ensure_future(b.acquired())
                await until(lambda: b.leader_value == b"crashy", what="standby to see the holder")
                assert not waiting.done()
                holder.kill()                         # no release, no destroy: only the TTL frees the key
                await asyncio.wait_for(waiting, 30)   # Consul may take up to 2 x TTL
                assert b.held
                _, e = await c.kv_get(key)
                assert e is not None and e.value == b"B"
    finally:
        holder.stop()
        agent.stop()
