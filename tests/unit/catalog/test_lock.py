"""LeaderLock against an in-memory Consul with session-lock semantics (no sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from catalog.lock import LeaderLock, LockStopped
from tests.unit.catalog.fake_consul import FakeConsul

KEY = "weft/test/leader"


def make(fake: FakeConsul, value: bytes, **kw: Any) -> LeaderLock:
    lock = LeaderLock(fake, KEY, ttl="10s", lock_delay="0s", value=value, wait=5, **kw)  # type: ignore[arg-type]
    return lock


async def until(pred: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.005)


async def test_exclusive_then_takeover_on_release() -> None:
    fake = FakeConsul()
    a, b = make(fake, b"A"), make(fake, b"B")
    async with a:
        await asyncio.wait_for(a.acquired(), 5)
        assert a.held and fake.kv[KEY].session == a.session_id and fake.kv[KEY].value == b"A"
        async with b:
            wait_b = asyncio.ensure_future(b.acquired())
            await until(lambda: b.leader_value == b"A")     # B is standing by, watching the key
            assert not wait_b.done() and not b.held
            await a.stop()
            assert a.lost.is_set() and not a.held
            await asyncio.wait_for(wait_b, 5)
            assert b.held and fake.kv[KEY].value == b"B"
            a_sid = [sid for op, sid in fake.calls if op == "session_destroy"]
            assert len(a_sid) == 1 and a_sid[0] not in fake.sessions
        # leaving the block released the key and destroyed B's session
        assert fake.kv[KEY].session == "" and fake.sessions == {}


async def test_loss_is_detected_when_the_session_is_invalidated() -> None:
    fake = FakeConsul()
    a = make(fake, b"A")
    async with a:
        await a.acquired()
        await fake.invalidate(a.session_id)
        await asyncio.wait_for(a.lost.wait(), 5)
        assert not a.held


async def test_loss_is_detected_when_another_session_takes_the_key() -> None:
    fake = FakeConsul()
    a = make(fake, b"A")
    async with a:
        await a.acquired()
        other = await fake.session_create(ttl="10s")
        # an operator force-releases and someone else acquires
        await fake.kv_put(KEY, b"x", release=a.session_id)
        assert await fake.kv_put(KEY, b"intruder", acquire=other)
        await asyncio.wait_for(a.lost.wait(), 5)
        assert not a.held


async def test_renew_at_half_ttl_and_loss_when_renew_answers_404() -> None:
    fake = FakeConsul()
    a = make(fake, b"A")
    a.ttl = 0.2  # shorter than any Consul session TTL, so that renewals happen within the test
    async with a:
        await a.acquired()
        sid = a.session_id
        await until(lambda: ("session_renew", sid) in fake.calls)
        assert a.held
        fake.sessions.pop(sid)  # gone without touching the key: only renewal can notice
        await asyncio.wait_for(a.lost.wait(), 5)
        assert not a.held


async def test_loss_when_consul_unreachable_for_a_whole_ttl() -> None:
    fake = FakeConsul()
    a = make(fake, b"A")
    a.ttl = 0.3
    async with a:
        await a.acquired()
        await fake.set_down(True)
        await asyncio.wait_for(a.lost.wait(), 5)
        assert not a.held
        await fake.set_down(False)


async def test_standby_respects_lock_delay_then_acquires() -> None:
    fake = FakeConsul()
    a = LeaderLock(fake, KEY, ttl="10s", lock_delay="0.3s", value=b"A", wait=5)  # type: ignore[arg-type]
    b = LeaderLock(fake, KEY, ttl="10s", lock_delay="0.3s", value=b"B", wait=5,  # type: ignore[arg-type]
                   retry_interval=0.05)
    async with a:
        await a.acquired()
        wait_b = asyncio.ensure_future(b.acquired())   # b campaigns only once a holds the lock
        await until(lambda: b.leader_value == b"A")
        await fake.invalidate(a.session_id)  # the holder died: lock-delay applies to the key
        await asyncio.wait_for(a.lost.wait(), 5)
        assert not wait_b.done()
        sessions_created = sum(1 for op, _ in fake.calls if op == "session_create")
        await asyncio.wait_for(wait_b, 5)
        assert b.held and fake.kv[KEY].value == b"B"
        assert sessions_created == 2
        await b.stop()


async def test_campaign_survives_consul_outage() -> None:
    fake = FakeConsul()
    await fake.set_down(True)
    a = make(fake, b"A")
    async with a:
        pending = asyncio.ensure_future(a.acquired())
        await asyncio.sleep(0.2)
        assert not pending.done()
        await fake.set_down(False)
        await asyncio.wait_for(pending, 10)
        assert a.held


async def test_stop_before_acquired_raises_lock_stopped() -> None:
    fake = FakeConsul()
    a, b = make(fake, b"A"), make(fake, b"B")
    async with a:
        await a.acquired()
        pending = asyncio.ensure_future(b.acquired())
        await until(lambda: b.leader_value == b"A")
        await b.stop()
        with pytest.raises(LockStopped):
            await pending
    assert fake.sessions == {}


def test_bad_arguments() -> None:
    fake = FakeConsul()
    with pytest.raises(ValueError, match="ttl"):
        LeaderLock(fake, KEY, ttl="0s")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="behavior"):
        LeaderLock(fake, KEY, behavior="keep")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key"):
        LeaderLock(fake, "/abs")  # type: ignore[arg-type]


async def test_stop_is_prompt_even_inside_a_long_blocking_read() -> None:
    # regression: a cancellation arriving as the stop event was set used to be swallowed by
    # asyncio.wait_for (Python 3.11), leaving stop() waiting for a whole blocking query
    fake = FakeConsul()
    for _ in range(20):
        a = LeaderLock(fake, KEY, ttl="10s", lock_delay="0s", wait=60)  # type: ignore[arg-type]
        await a.acquired()
        await asyncio.sleep(0.11)   # into the monitor's blocking read (or its rate-limit pause)
        await asyncio.wait_for(a.stop(), 5)
        assert fake.kv[KEY].session == ""
