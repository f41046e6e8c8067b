"""The route's IdleTimeout: the watch on plain values, and the h2 hook with a fake proxy on a real loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar import h2_idle
from sidecar.idle import IdleWatch


def test_idle_watch_counts_from_the_last_frame() -> None:
    w = IdleWatch(2.0, now=10.0)
    assert w.left(10.5) == 1.5
    w.touch(11.0)
    assert w.left(12.5) == 0.5 and w.left(13.0) == 0.0 and w.left(20.0) == 0.0
    assert "2s (the route's IdleTimeout)" in w.message()
    with pytest.raises(ValueError):
        IdleWatch(0, now=0.0)


class _Stream:
    recorded = False


class _Proxy:
    def __init__(self) -> None:
        self.failed: list[tuple[Any, int, str]] = []

    def fail(self, st: Any, code: int, message: str) -> None:
        st.recorded = True
        self.failed.append((st, code, message))

    def flush(self) -> None:
        pass


async def test_a_busy_stream_lives_an_idle_one_ends_and_a_finished_one_leaves_nothing() -> None:
    proxy = _Proxy()
    busy, idle, done = _Stream(), _Stream(), _Stream()
    for st in (busy, idle, done):
        h2_idle.arm(proxy, st, 0.2)
    h2_idle.stop(done)  # the call ended: its timer is cancelled and its watch dropped
    for _ in range(8):  # frames keep coming on `busy` for longer than its timeout
        await asyncio.sleep(0.05)
        h2_idle.touch(busy)
    assert [(st, code) for st, code, _ in proxy.failed] == [(idle, 4)]
    assert "IdleTimeout" in proxy.failed[0][2]
    h2_idle.stop(busy)
    await asyncio.sleep(0.3)
    assert len(proxy.failed) == 1 and not h2_idle._watches


def test_http_attempt_timeouts_take_the_connect_and_idle_timeouts() -> None:
    import aiohttp

    from sidecar.http_routing import _attempt_timeout

    base = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
    assert _attempt_timeout(base, 0.0, 0.0) is base
    t = _attempt_timeout(base, 0.4, 1.0)
    assert (t.connect, t.sock_connect, t.sock_read, t.total) == (0.4, 0.4, 1.0, None)
    t = _attempt_timeout(base, 0.0, 2.0)
    assert (t.sock_connect, t.sock_read) == (10, 2.0)
