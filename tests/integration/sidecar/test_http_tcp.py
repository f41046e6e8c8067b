"""HTTP/1.1 and raw TCP through a sidecar pair, in process: pass-through, L7 rules, denials, policy changes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from policies.model import HttpMatch, Permission
from sidecar.inbound import Inbound
from sidecar.outbound import Outbound
from sidecar.telemetry import Telemetry
from sidecar.tls import TlsContexts
from tests.apps.httpecho import server as http_echo
from tests.apps.tcpecho import server as tcp_echo
from tests.integration.sidecar.harness import Authority, Holder, snapshot, table
from tests.support import free_port

pytestmark = pytest.mark.integration


@dataclass
class Pair:
    api: Holder
    inbound: Inbound
    outbound: Outbound
    api_tel: Telemetry
    local: int


async def pair(protocol: str, app_port: int, policy: object) -> AsyncIterator[Pair]:
    ca = Authority.root()
    api = Holder(snapshot("api", ca.leaf("api"), protocol=protocol, app_port=app_port, policy=policy))  # type: ignore[arg-type]
    tel = Telemetry()
    inbound = Inbound(api, tel, TlsContexts())
    api.listeners.append(inbound.on_snapshot)
    public = await inbound.start("127.0.0.1", 0)
    local = free_port()
    web = Holder(snapshot("web", ca.leaf("web"), upstreams={"api": (local, [public], protocol)}, policy=table("web")))
    outbound = Outbound(web, Telemetry(), TlsContexts())
    await outbound.start()
    try:
        yield Pair(api, inbound, outbound, tel, local)
    finally:
        await outbound.close(0.1)
        await inbound.close(0.1)


async def test_http_l7_rules_and_403_naming_rule() -> None:
    runner, port = await http_echo.start(0, name="api-1")
    rules = (Permission(action="allow", http=HttpMatch(path_prefix="/public")),
             Permission(action="deny", http=HttpMatch(path_prefix="/")))
    try:
        async for p in pair("http", port, table("api", ("web", rules))):
            async with aiohttp.ClientSession() as s:
                async with s.post(f"http://127.0.0.1:{p.local}/public/x?q=1", data=b"hello",
                                  headers={"x-k": "v"}) as r:
                    assert r.status == 200
                    body = await r.json()
                    assert body["path"] == "/public/x"
                    assert {k.lower(): v for k, v in body["headers"].items()}["x-k"] == "v"
                    assert body["body"] == "hello"
                async with s.get(f"http://127.0.0.1:{p.local}/private") as r:
                    assert r.status == 403
                    text = await r.text()
                    assert "web -> api" in text and "Permissions[1]" in text
            assert not p.inbound.connections  # L7: nothing passed through
    finally:
        await runner.cleanup()


async def test_tcp_passthrough_and_close_on_deny() -> None:
    server, port = await tcp_echo.start(0)
    try:
        async for p in pair("tcp", port, table("api", ("web", "allow"))):
            reader, writer = await asyncio.open_connection("127.0.0.1", p.local)
            payload = b"x" * 200_000
            writer.write(payload)
            await writer.drain()
            got = b""
            while len(got) < len(payload):
                chunk = await asyncio.wait_for(reader.read(65536), 10)
                assert chunk
                got += chunk
            assert got == payload
            # allow -> deny closes the open connection of that pair
            p.api.update(policy=table("api", ("web", "deny")), policy_version="deny")
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            # and a new connection is closed at once
            reader, writer = await asyncio.open_connection("127.0.0.1", p.local)
            writer.write(b"hi")
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            assert 'weft_inbound_connections_total{mode="closed_by_policy"} 1.0' in p.api_tel.render().decode()
    finally:
        server.close()
