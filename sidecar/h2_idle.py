"""The route's ``IdleTimeout`` on the frame-level HTTP/2 outbound path (``sidecar.h2_proxy``).

A routed stream whose route sets ``IdleTimeout`` gets an ``idle.IdleWatch``; the proxy touches it for
every frame it passes in either direction (``touch``: one dict lookup for a routed stream, nothing for
others); a timer checks it and ends an idle call with DEADLINE_EXCEEDED (the status a caller sees for
a call that took too long), naming the timeout. ``stop`` drops the watch when the call ends.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from sidecar.idle import IdleWatch

if TYPE_CHECKING:
    from sidecar.h2_conn import FrameProxy, Stream

DEADLINE_EXCEEDED = 4

_watches: dict[Stream, IdleWatch] = {}  # stream -> its watch, only while the call runs


def arm(proxy: FrameProxy, st: Stream, timeout: float) -> None:
    watch = IdleWatch(timeout, time.monotonic())
    _watches[st] = watch
    watch.handle = asyncio.get_running_loop().call_later(timeout, _check, proxy, st, watch)


def touch(st: Stream) -> None:
    watch = _watches.get(st)
    if watch is not None:
        watch.last = time.monotonic()


def stop(st: Stream) -> None:
    watch = _watches.pop(st, None)
    if watch is not None and isinstance(watch.handle, asyncio.TimerHandle):
        watch.handle.cancel()


def _check(proxy: FrameProxy, st: Stream, watch: IdleWatch) -> None:
    if _watches.get(st) is not watch:
        return  # the call ended (stop) or was re-armed
    if st.recorded:
        del _watches[st]
        return
    left = watch.left(time.monotonic())
    if left > 0:
        watch.handle = asyncio.get_running_loop().call_later(left, _check, proxy, st, watch)
        return
    del _watches[st]
    proxy.fail(st, DEADLINE_EXCEEDED, watch.message())
    proxy.flush()
