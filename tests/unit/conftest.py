"""The unit tier opens no network sockets: a test that binds, connects or sends on an IP socket fails
at once with the reason (move it to tests/integration, or give the code under test a fake).

Unix-domain sockets stay allowed: asyncio's event loop wakes itself through a socketpair.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

_IP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


class NetworkInUnitTest(RuntimeError):
    """A unit test touched the network."""


def _refuse(name: str, original: Any) -> Any:
    def guarded(self: socket.socket, *args: Any, **kwargs: Any) -> Any:
        if self.family in _IP_FAMILIES:
            raise NetworkInUnitTest(f"socket.{name} in a unit test: unit tests open no network sockets "
                                    "(move the test to tests/integration)")
        return original(self, *args, **kwargs)
    return guarded


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("bind", "connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, _refuse(name, getattr(socket.socket, name)))
    yield
