"""Runs a process's main coroutine on uvloop (where available) until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any


def install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:  # not every platform has it
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def run(main: Callable[[asyncio.Event], Coroutine[Any, Any, int]]) -> int:
    """Run `main(stop)`; `stop` is set on SIGINT or SIGTERM so that `main` can shut down cleanly."""
    install_uvloop()

    async def _wrapper() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await main(stop)

    return asyncio.run(_wrapper())
