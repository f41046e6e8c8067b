"""The HTTP/1.1 and TCP echo apps in-process on loopback."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.apps.httpecho import server as httpecho
from tests.apps.tcpecho import server as tcpecho

pytestmark = pytest.mark.integration


async def test_http_echo() -> None:
    runner, port = await httpecho.start(0)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{port}/a/b?x=1", data=b"hello",
                                    headers={"x-trace": "t"}) as resp:
                doc = await resp.json()
                assert resp.status == 200 and resp.headers["x-echo-instance"] == f"httpecho-{port}"
            assert (doc["method"], doc["path"], doc["query"], doc["body"]) == ("POST", "/a/b", {"x": "1"}, "hello")
            assert doc["headers"]["x-trace"] == "t"
            async with session.put(f"http://127.0.0.1:{port}/", data=b"\x00\xff",
                                   headers={"x-echo-raw": "1", "x-echo-status": "503"}) as resp:
                assert resp.status == 503 and await resp.read() == b"\x00\xff"
            async with session.get(f"http://127.0.0.1:{port}/", headers={"x-echo-status": "abc"}) as resp:
                assert resp.status == 400 and "x-echo-status" in (await resp.json())["error"]
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200 and await resp.text() == "ok"
    finally:
        await runner.cleanup()


async def test_tcp_echo_with_and_without_banner() -> None:
    server, port = await tcpecho.start(0, banner="inst-b")
    plain, plain_port = await tcpecho.start(0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.readline() == b"inst-b\n"
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", plain_port)
        blob = bytes(range(256)) * 4096  # 1 MiB, more than one buffer
        writer.write(blob)
        writer.write_eof()
        assert await reader.readexactly(len(blob)) == blob
        assert await reader.read() == b""  # closes after the peer's EOF
        writer.close()
    finally:
        server.close()
        plain.close()


def test_tcp_echo_on_uvloop() -> None:
    """The apps run on uvloop, whose transports are not asyncio.Transport subclasses."""
    import uvloop

    async def scenario() -> bytes:
        server, port = await tcpecho.start(0, banner="u")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"abc")
            data = await reader.readexactly(5)
            writer.close()
            return data
        finally:
            server.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(scenario()) == b"u\nabc"
