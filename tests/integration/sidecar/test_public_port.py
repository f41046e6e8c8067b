"""The public port refuses what is not mTLS from this mesh, and keeps serving the others (in process)."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from sidecar.inbound import Inbound
from sidecar.snapshot import Credentials
from sidecar.telemetry import Telemetry
from sidecar.tls import TlsContexts, client_context, expected_server_name
from tests.apps.echo import echo_pb2, echo_pb2_grpc
from tests.apps.echo import server as echo_server
from tests.integration.sidecar.harness import Authority, Holder, snapshot, table
from tests.unit.sidecar.pki import TD

pytestmark = pytest.mark.integration


class Api:
    def __init__(self, ca: Authority, holder: Holder, inbound: Inbound, telemetry: Telemetry) -> None:
        self.ca = ca
        self.holder = holder
        self.inbound = inbound
        self.telemetry = telemetry

    def metric(self, text: str) -> float:
        for line in self.telemetry.render().decode().splitlines():
            if line.startswith(text + " "):
                return float(line.split()[-1])
        return 0.0


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    ca = Authority.root()
    app, port, _ = await echo_server.start(0, name="api-1")
    holder = Holder(snapshot("api", ca.leaf("api"), app_port=port, policy=table("api", ("web", "allow"))))
    tel = Telemetry()
    inbound = Inbound(holder, tel, TlsContexts())
    holder.listeners.append(inbound.on_snapshot)
    await inbound.start("127.0.0.1", 0)
    try:
        yield Api(ca, holder, inbound, tel)
    finally:
        await inbound.close(0.1)
        await app.stop(None)


async def call_with(api: Api, creds: Credentials, timeout: float = 10) -> echo_pb2.EchoResponse:
    channel_creds = grpc.ssl_channel_credentials(creds.roots_pem.encode(), creds.key_pem.encode(),
                                                 creds.full_chain_pem.encode())
    name = expected_server_name("api", TD)
    async with grpc.aio.secure_channel(f"127.0.0.1:{api.inbound.port}", channel_creds,
                                       options=[("grpc.ssl_target_name_override", name)]) as ch:
        stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
        resp: echo_pb2.EchoResponse = await stub.Unary(echo_pb2.EchoRequest(text="x"), timeout=timeout)
        return resp


async def tls_attempt(api: Api, ctx: ssl.SSLContext) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", api.inbound.port, ssl=ctx,
                                                   server_hostname=expected_server_name("api", TD))
    # TLS 1.3: the server's verdict on our certificate arrives after our handshake "succeeded"
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(100), 10)
    writer.close()
    if not data:
        raise ConnectionResetError("closed")


async def test_refusals_and_others_keep_being_served(api: Api) -> None:
    assert (await call_with(api, api.ca.leaf("web"))).instance == "api-1"

    # plaintext
    reader, writer = await asyncio.open_connection("127.0.0.1", api.inbound.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(1000), 10)
    assert b"HTTP/1.1 200" not in data
    writer.close()

    # foreign CA
    foreign = Authority.root("Foreign")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await tls_attempt(api, client_context(dataclasses.replace(foreign.leaf("web"), roots_pem=api.ca.pem)))
    # expired certificate of our CA
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await tls_attempt(api, client_context(api.ca.leaf("web", expired=True)))
    # no client certificate at all
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.load_verify_locations(cadata=api.ca.pem)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await tls_attempt(api, bare)
    # a valid certificate of the wrong identity: the mesh CA, but a service no rule allows
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call_with(api, api.ca.leaf("intruder"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "default policy deny" in (err.value.details() or "")  # the rule, named once
    # a certificate of another trust domain signed by our CA
    with pytest.raises((grpc.aio.AioRpcError, ssl.SSLError, ConnectionError)):
        await tls_attempt(api, client_context(api.ca.leaf("web", trust_domain="evil.consul")))

    for _ in range(200):
        if all(api.metric(f'weft_tls_handshake_errors_total{{direction="inbound",reason="{r}"}}') >= 1
               for r in ("not_tls", "unknown_ca", "expired", "no_client_cert", "wrong_trust_domain")):
            break
        await asyncio.sleep(0.05)
    text = api.telemetry.render().decode()
    for reason in ("not_tls", "unknown_ca", "expired", "no_client_cert", "wrong_trust_domain"):
        assert f'reason="{reason}"' in text, text
    # and the legitimate caller is still served
    assert (await call_with(api, api.ca.leaf("web"))).instance == "api-1"


async def test_rotation_of_leaf_and_roots_under_traffic(api: Api) -> None:
    client = api.ca.leaf("web")
    failures: list[Any] = []
    done = asyncio.Event()
    calls = 0

    async def traffic() -> None:
        nonlocal calls, client
        while not done.is_set():
            try:
                await call_with(api, client)
                calls += 1
            except Exception as exc:
                failures.append(exc)

    task = asyncio.ensure_future(traffic())
    await asyncio.sleep(0.3)
    # leaf rotation on the server side
    api.holder.update(credentials=api.ca.leaf("api"))
    await asyncio.sleep(0.3)
    # root rotation: both roots trusted, then leaves from the new root on both sides
    new = Authority.root("New Root")
    both = api.ca.pem + new.pem
    api.holder.update(credentials=dataclasses.replace(api.ca.leaf("api"), roots_pem=both))
    client = dataclasses.replace(new.leaf("web"), roots_pem=both)
    await asyncio.sleep(0.3)
    api.holder.update(credentials=dataclasses.replace(new.leaf("api"), roots_pem=both))
    await asyncio.sleep(0.3)
    done.set()
    await task
    assert failures == []
    assert calls > 3
