"""Shared helpers for the catalog integration tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from catalog.client import ConsulClient
from catalog.models import ConsulSettings
from tests.support import DevAgent


def client_for(agent: DevAgent, **kw: float) -> ConsulClient:
    return ConsulClient(ConsulSettings.from_env(agent.env), **kw)


async def until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll `predicate` without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
