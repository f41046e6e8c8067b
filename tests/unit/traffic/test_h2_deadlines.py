"""The h2 engine's call deadlines (route RequestTimeout, LocalRequestTimeoutMs): one timer per timeout
value for all the streams that share it, each stream disarmed when it ends."""

from __future__ import annotations

import asyncio
from typing import Any

from sidecar import h2_traffic


class _Proxy:
    def __init__(self) -> None:
        self._traffic_deadlines: dict[Any, Any] = {}  # where h2_traffic keeps the deadline groups (FrameProxy)


class _Stream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.timer: Any = None
        self.plan: Any = None  # an unrouted (inbound) stream


async def test_streams_expire_in_order_and_an_ended_stream_never_does() -> None:
    proxy = _Proxy()
    expired: list[tuple[str, float]] = []

    def expire(p: Any, st: _Stream, timeout: float) -> None:
        assert p is proxy
        expired.append((st.name, timeout))

    a, b, c, d = _Stream("a"), _Stream("b"), _Stream("c"), _Stream("d")
    h2_traffic._deadline(proxy, a, 0.05, expire)
    h2_traffic._deadline(proxy, b, 0.05, expire)
    h2_traffic._deadline(proxy, c, 0.02, expire)  # a shorter timeout: its own group, expires first
    assert a.timer is b.timer and a.timer is not c.timer
    h2_traffic.stream_done(b)  # ended in time: disarmed
    assert b.timer is None
    await asyncio.sleep(0.03)
    h2_traffic._deadline(proxy, d, 0.05, expire)  # joins a's group behind a, after its timer was armed
    for _ in range(100):
        if len(expired) == 3:
            break
        await asyncio.sleep(0.02)
    assert expired == [("c", 0.02), ("a", 0.05), ("d", 0.05)]
    assert a.timer is None and c.timer is None and d.timer is None
    groups = proxy._traffic_deadlines
    assert all(not g.streams and g.handle is None for g in groups.values())  # nothing left armed
