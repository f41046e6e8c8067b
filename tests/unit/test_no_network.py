"""The unit tier's guard (tests/unit/conftest.py) refuses network sockets and lets the rest be."""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path

import pytest

from tests.unit.conftest import NetworkInUnitTest


def test_ip_sockets_are_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(NetworkInUnitTest):
        s.bind(("127.0.0.1", 0))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(NetworkInUnitTest):
        s.connect(("127.0.0.1", 9))
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s, pytest.raises(NetworkInUnitTest):
        s.sendto(b"x", ("::1", 9))


async def test_asyncio_servers_are_refused() -> None:
    with pytest.raises(NetworkInUnitTest):
        await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)


async def test_an_event_loop_and_socketpairs_still_work() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"ok")
        assert b.recv(2) == b"ok"
    await asyncio.sleep(0)


# What the runtime guard cannot see: sockets opened in C (grpc's core, uvloop) or by other processes.
_NETWORK_CODE = re.compile(r"free_port\(|\bProc\(|DevAgent\(|grpc\.aio\.server|grpc\.server\(|insecure_channel|"
                           r"secure_channel|\buvloop\b|start_server\(|create_server\(")
_GUARD_FILES = {"conftest.py", "test_no_network.py"}


def test_no_unit_test_starts_servers_or_processes_that_listen() -> None:
    unit = Path(__file__).parent
    found = [f"{path.relative_to(unit)}:{n}: {line.strip()}"
             for path in sorted(unit.rglob("*.py")) if path.name not in _GUARD_FILES
             for n, line in enumerate(path.read_text().splitlines(), 1) if _NETWORK_CODE.search(line)]
    assert not found, "network code in the unit tier (move these tests to tests/integration):\n" + "\n".join(found)
