"""/tap on real sidecars in one process (real sockets on loopback): filters, redaction, payload
previews for gRPC (decoded by reflection) and HTTP, pass-through giving way to a tap, and the drop
counter under a reader that does not read."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc.aio
import pytest

from sidecar import methods
from sidecar.admin import Admin
from sidecar.tap import TapSettings
from tests.apps.echo import echo_pb2
from tests.apps.httpecho import server as http_echo
from tests.integration.sidecar.harness import table
from tests.integration.sidecar.test_datapath import UNARY, Mesh, make_mesh
from tests.integration.sidecar.test_http_tcp import pair

pytestmark = pytest.mark.integration

SECRET = "s3cret"
PAYLOADS = TapSettings(payload=True, max_bytes=4096, redact=("password",))


async def admin_for(holder: Any, telemetry: Any, **kw: Any) -> tuple[Admin, str]:
    admin = Admin(holder, telemetry, lambda: (True, "ready"), **kw)
    port = await admin.start("127.0.0.1", 0)
    return admin, f"http://127.0.0.1:{port}"


class Tap:
    """A /tap stream read line by line in the background."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.lines: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.status = 0
        self._task: asyncio.Task[None] | None = None
        self._open = asyncio.Event()

    async def __aenter__(self) -> Tap:
        self._task = asyncio.ensure_future(self._read())
        await asyncio.wait_for(self._open.wait(), 10)
        return self

    async def _read(self) -> None:
        async with self.session.get(self.url) as resp:
            self.status = resp.status
            self._open.set()
            async for raw in resp.content:
                self.lines.put_nowait(json.loads(raw))

    async def next(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.lines.get(), 10)

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def _wait_taps(telemetry: Any, n: int) -> None:
    for _ in range(200):
        if len(telemetry.tap.subscribers) == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {n} open taps, have {len(telemetry.tap.subscribers)}")


async def _mesh(**kw: Any) -> AsyncIterator[Mesh]:
    async for m in make_mesh(unary_known=True, **kw):
        m.api_holder.update(tap=PAYLOADS)
        app = m.api_holder().registration
        await methods.reflect(f"{app.local_service_address}:{app.local_service_port}")  # as the sidecar learns
        yield m


async def test_grpc_tap_filters_redaction_and_decoded_payloads() -> None:
    async for m in _mesh():
        api_admin, api_url = await admin_for(m.api_holder, m.api_tel)
        web_admin, web_url = await admin_for(m.web_holder, m.web_tel)
        try:
            metadata = (("authorization", f"Bearer {SECRET}"), ("x-password", "hunter2"), ("x-plain", "visible"))
            # a pass-through connection first: opening a tap on the callee closes it, so calls are seen
            assert (await m.stub.Unary(echo_pb2.EchoRequest(text="warm"), timeout=10)).text == "warm"
            assert any(mode == "passthrough" for _, mode in m.inbound.connections.values())
            async with aiohttp.ClientSession() as s:
                async with s.get(api_url + "/tap?limit=abc") as bad:
                    assert bad.status == 400 and "limit" in await bad.text()
                async with Tap(s, api_url + "/tap?payload=1&source=web&method=/weft.test.echo") as inbound_tap, \
                        Tap(s, web_url + "/tap?direction=outbound") as outbound_tap, \
                        Tap(s, api_url + "/tap?source=nobody") as other_tap:
                    await _wait_taps(m.api_tel, 2)
                    assert not any(mode == "passthrough" for _, mode in m.inbound.connections.values())
                    for _ in range(100):  # the client reconnects through the per-call path
                        try:
                            reply = await m.stub.Unary(echo_pb2.EchoRequest(text="hello"), metadata=metadata,
                                                       timeout=10)
                            break
                        except grpc.aio.AioRpcError:
                            await asyncio.sleep(0.05)
                    else:
                        raise AssertionError("the call never went through")
                    assert reply.text == "hello"
                    rec = await inbound_tap.next()
                    out = await outbound_tap.next()
                    assert other_tap.lines.empty()
            everything = json.dumps([rec, out]) + m.api_tel.render().decode() + m.web_tel.render().decode()
            assert SECRET not in everything, everything[max(0, everything.find(SECRET) - 300):][:400]
            assert rec["direction"] == "inbound" and rec["source"] == "web" and rec["destination"] == "api"
            assert rec["method"] == UNARY and rec["status"] == "OK"
            assert rec["request"]["headers"]["authorization"] == "[redacted]"
            assert rec["request"]["headers"]["x-password"] == "[redacted]"  # api's Redact patterns
            assert "hunter2" not in json.dumps(rec)
            assert rec["request"]["headers"]["x-plain"] == "visible"
            assert rec["request"]["messages"][0]["json"] == {"text": "hello"}
            assert rec["response"]["messages"][0]["json"]["text"] == "hello"
            assert rec["response"]["trailers"]["grpc-status"] == "0"
            # the caller's sidecar: its service (web) has no payload settings, so no previews
            assert out["direction"] == "outbound" and out["destination"] == "api"
            assert out["request"]["headers"]["authorization"] == "[redacted]" and "messages" not in out["request"]
            await _wait_taps(m.api_tel, 0)  # disconnected clients' taps are gone
        finally:
            await api_admin.close()
            await web_admin.close()


async def test_http_tap_payload_previews() -> None:
    runner, port = await http_echo.start(0, name="api-1")
    try:
        async for p in pair("http", port, table("api", ("web", "allow"))):
            p.api.update(tap=PAYLOADS)
            admin, url = await admin_for(p.api, p.api_tel)
            try:
                async with aiohttp.ClientSession() as s:
                    async with Tap(s, url + "/tap?payload=1&limit=1") as tap:
                        await _wait_taps(p.api_tel, 1)
                        for _ in range(100):  # the tap made the caller leave pass-through
                            try:
                                async with s.post(f"http://127.0.0.1:{p.local}/login?password={SECRET}",
                                                  json={"user": "ann", "password": SECRET},
                                                  headers={"Cookie": f"session={SECRET}"}) as r:
                                    assert r.status == 200
                                    break
                            except aiohttp.ClientError:
                                await asyncio.sleep(0.05)
                        rec = await tap.next()
                assert SECRET not in json.dumps(rec), json.dumps(rec)
                assert rec["protocol"] == "http" and rec["method"] == "POST /login" and rec["status"] == "200"
                assert rec["path"] == "/login?password=[redacted]"
                assert rec["request"]["headers"]["cookie"] == "[redacted]"
                assert rec["request"]["body"] == {"json": {"user": "ann", "password": "[redacted]"}}
                assert rec["response"]["body"]["json"]["path"] == "/login"
            finally:
                await admin.close()
    finally:
        await runner.cleanup()


async def test_a_reader_that_does_not_read_makes_drops_not_slow_calls() -> None:
    async for m in _mesh(passthrough=False):
        m.api_holder.update(tap=dataclasses.replace(PAYLOADS, max_bytes=8192))
        admin, _ = await admin_for(m.api_holder, m.api_tel, tap_queue=4)
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", admin.port))
            sock.sendall(b"GET /tap?payload=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            await _wait_taps(m.api_tel, 1)
            big = "x" * 6000
            for _ in range(10):  # bounded: stops as soon as drops are counted
                await asyncio.gather(*(m.stub.Unary(echo_pb2.EchoRequest(text=big), timeout=30) for _ in range(40)))
                if m.api_tel.tap.dropped:
                    break
            assert m.api_tel.tap.dropped > 0
            assert "weft_tap_dropped_total " in m.api_tel.render().decode()
            assert "weft_tap_dropped_total 0.0" not in m.api_tel.render().decode()
        finally:
            sock.close()
            await admin.close()
