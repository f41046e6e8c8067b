"""The data path in one process (real sockets on loopback): app <- inbound <- mTLS <- outbound <- client."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import pytest

from sidecar.inbound import Inbound
from sidecar.outbound import Outbound
from sidecar.telemetry import Telemetry
from sidecar.tls import TlsContexts
from tests.apps.echo import echo_pb2, echo_pb2_grpc
from tests.apps.echo import server as echo_server
from tests.integration.sidecar.harness import Authority, Holder, snapshot, table
from tests.support import free_port

pytestmark = pytest.mark.integration

UNARY = "/weft.test.echo.v1.Echo/Unary"


@dataclass
class Mesh:
    ca: Authority
    api_holder: Holder
    web_holder: Holder
    inbound: Inbound
    outbound: Outbound
    api_tel: Telemetry
    web_tel: Telemetry
    stub: echo_pb2_grpc.EchoStub
    channel: grpc.aio.Channel
    local_port: int


async def make_mesh(*, unary_known: bool, passthrough: bool = True, policy: Any = None) -> AsyncIterator[Mesh]:
    ca = Authority.root()
    app, app_port, _ = await echo_server.start(0, name="api-1")
    pol = policy if policy is not None else table("api", ("web", "allow"))
    api_holder = Holder(snapshot("api", ca.leaf("api"), app_port=app_port, policy=pol))
    api_tel = Telemetry()
    inbound = Inbound(api_holder, api_tel, TlsContexts(), passthrough_enabled=passthrough)
    api_holder.listeners.append(inbound.on_snapshot)
    public = await inbound.start("127.0.0.1", 0)
    local = free_port()
    methods = {"api": {UNARY: "unary"}} if unary_known else {}
    web_holder = Holder(snapshot("web", ca.leaf("web"), upstreams={"api": (local, [public], "grpc")},
                                 methods=methods, policy=table("web")))
    web_tel = Telemetry()
    outbound = Outbound(web_holder, web_tel, TlsContexts())
    web_holder.listeners.append(outbound.on_snapshot)
    await outbound.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{local}", options=[("grpc.max_receive_message_length", 1 << 24),
                                                                       ("grpc.max_send_message_length", 1 << 24)])
    try:
        yield Mesh(ca, api_holder, web_holder, inbound, outbound, api_tel, web_tel, echo_pb2_grpc.EchoStub(channel),  # type: ignore[no-untyped-call]
                   channel, local)
    finally:
        await channel.close(None)
        await outbound.close(0.1)
        await inbound.close(0.1)
        await app.stop(None)


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async for m in make_mesh(unary_known=True):
        yield m


async def test_unary_with_metadata_and_trailers(mesh: Mesh) -> None:
    call = mesh.stub.Unary(echo_pb2.EchoRequest(text="hi"), metadata=(("x-k", "v"), ("x-b-bin", b"\x00\x01")),
                           timeout=10)
    resp = await call
    assert resp.text == "hi" and resp.instance == "api-1"
    initial = dict(await call.initial_metadata())
    assert initial["x-k"] == "v" and initial["x-b-bin"] == b"\x00\x01"
    trailing = dict(await call.trailing_metadata())
    assert trailing["x-echo-trailer"] == "ok"
    assert mesh.inbound.connections  # L4 allow: passed through


async def test_error_status_details_and_trailers(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.Unary(echo_pb2.EchoRequest(), metadata=(("x-echo-status", "NOT_FOUND:nope"),), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "nope"
    trailing: dict[str, Any] = dict(tuple(err.value.trailing_metadata() or ()))  # type: ignore[arg-type]
    assert trailing["x-echo-detail-bin"] == b"nope"


async def test_unimplemented_stays_unimplemented(mesh: Mesh) -> None:
    call = mesh.channel.unary_unary("/no.Such/Method", None, None)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_streaming_kinds(mesh: Mesh) -> None:
    responses = [r async for r in mesh.stub.ServerStream(echo_pb2.EchoRequest(sequence=5),
                                                           metadata=(("x-echo-count", "3"),), timeout=10)]
    assert [r.sequence for r in responses] == [5, 6, 7]

    async def reqs() -> AsyncIterator[echo_pb2.EchoRequest]:
        for i in range(4):
            yield echo_pb2.EchoRequest(payload=bytes([i]))

    resp = await mesh.stub.ClientStream(reqs(), timeout=10)
    assert resp.received == 4 and resp.payload == bytes([0, 1, 2, 3])
    bidi = mesh.stub.Bidi(timeout=10)
    for i in range(3):
        await bidi.write(echo_pb2.EchoRequest(sequence=i))
        got = await bidi.read()
        assert got.sequence == i
    await bidi.done_writing()
    assert await bidi.code() == grpc.StatusCode.OK


async def test_large_messages_and_many_concurrent_calls(mesh: Mesh) -> None:
    big = b"z" * (3 * 1024 * 1024)
    resp = await mesh.stub.Unary(echo_pb2.EchoRequest(payload=big), timeout=30)
    assert resp.payload == big
    got = [r async for r in mesh.stub.ServerStream(echo_pb2.EchoRequest(response_size=1_000_000),
                                                     metadata=(("x-echo-count", "4"),), timeout=30)]
    assert [len(r.payload) for r in got] == [1_000_000] * 4
    results = await asyncio.gather(*(mesh.stub.Unary(echo_pb2.EchoRequest(text=str(i)), timeout=30)
                                     for i in range(100)))
    assert [r.text for r in results] == [str(i) for i in range(100)]


async def test_messages_above_the_limit_are_refused(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.Unary(echo_pb2.EchoRequest(payload=b"z" * (5 * 1024 * 1024)), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as err2:
        await mesh.stub.Unary(echo_pb2.EchoRequest(response_size=5 * 1024 * 1024), timeout=30)
    assert err2.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await mesh.stub.Unary(echo_pb2.EchoRequest(text="ok"), timeout=10)).text == "ok"


async def test_cancelled_stream_is_cancelled_upstream(mesh: Mesh) -> None:
    bidi = mesh.stub.Bidi(timeout=30)
    await bidi.write(echo_pb2.EchoRequest(sequence=1))
    assert (await bidi.read()).sequence == 1
    bidi.cancel()
    # the proxy stays healthy for the next calls
    assert (await mesh.stub.Unary(echo_pb2.EchoRequest(text="after"), timeout=10)).text == "after"


async def test_deadline_propagates(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.Unary(echo_pb2.EchoRequest(), metadata=(("x-echo-delay-ms", "3000"),), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_denied_caller_gets_permission_denied_naming_rule() -> None:
    async for m in make_mesh(unary_known=True, policy=table("api", ("web", "deny"))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await m.stub.Unary(echo_pb2.EchoRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "web -> api" in (err.value.details() or "")
        text = m.api_tel.render().decode()
        assert 'weft_authz_decisions_total{decision="deny",rule="web -> api (KV weft/intentions/api Sources[0])"}' \
            in text


async def test_policy_change_closes_passthrough_and_next_call_denied() -> None:
    async for m in make_mesh(unary_known=True):
        assert (await m.stub.Unary(echo_pb2.EchoRequest(text="a"), timeout=10)).text == "a"
        assert m.inbound.connections
        m.api_holder.update(policy=table("api", ("web", "deny")), policy_version="v-deny")
        assert not m.inbound.connections
        # the client reconnects and goes through the full path now
        for _ in range(50):
            try:
                await m.stub.Unary(echo_pb2.EchoRequest(), timeout=10)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.PERMISSION_DENIED:
                    break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("never denied")
        m.api_holder.update(policy=table("api", ("web", "allow")), policy_version="v-allow")
        for _ in range(50):
            try:
                await m.stub.Unary(echo_pb2.EchoRequest(), timeout=10)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("never allowed again")


async def test_full_path_metrics_when_passthrough_off() -> None:
    async for m in make_mesh(unary_known=True, passthrough=False):
        for _ in range(3):
            await m.stub.Unary(echo_pb2.EchoRequest(), timeout=10)
        text = m.api_tel.render().decode()
        assert 'weft_requests_total{destination="api",direction="inbound",method="' + UNARY + \
            '",source="web",status="OK"} 3.0' in text
        out = m.web_tel.render().decode()
        assert 'weft_requests_total{destination="api",direction="outbound",method="' + UNARY + \
            '",source="web",status="OK"} 3.0' in out


async def test_killed_instance_calls_move_to_the_other() -> None:
    ca = Authority.root()
    apps, inbounds, ports = [], [], []
    for name in ("api-1", "api-2"):
        app, app_port, _ = await echo_server.start(0, name=name)
        holder = Holder(snapshot("api", ca.leaf("api"), app_port=app_port, policy=table("api", ("web", "allow"))))
        inbound = Inbound(holder, Telemetry(), TlsContexts())
        ports.append(await inbound.start("127.0.0.1", 0))
        apps.append(app)
        inbounds.append(inbound)
    local = free_port()
    web = Holder(snapshot("web", ca.leaf("web"), upstreams={"api": (local, ports, "grpc")},
                          methods={"api": {UNARY: "unary"}}, policy=table("web")))
    tel = Telemetry()
    outbound = Outbound(web, tel, TlsContexts())
    web.listeners.append(outbound.on_snapshot)
    await outbound.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{local}")
    stub = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
    try:
        seen: set[str] = set()
        for _ in range(20):  # concurrent calls: the in-flight penalty spreads them over both
            batch = await asyncio.gather(*(stub.Unary(echo_pb2.EchoRequest(), timeout=10) for _ in range(8)))
            seen.update(r.instance for r in batch)
            if seen == {"api-1", "api-2"}:
                break
        assert seen == {"api-1", "api-2"}
        # api-2's sidecar dies (its app too); Consul has not noticed yet
        await inbounds[1].close(0)
        await apps[1].stop(None)
        failures = 0
        after = []
        for _ in range(60):
            try:
                after.append((await stub.Unary(echo_pb2.EchoRequest(), timeout=10)).instance)
            except grpc.aio.AioRpcError:
                failures += 1
        assert after[-20:] == ["api-1"] * 20
        assert failures <= 3  # at most calls already in flight on the dead connection
        # Consul notices: the endpoint leaves the snapshot
        api = web().upstreams["api"]
        alive = tuple(e for e in api.endpoints if e.port == ports[0])
        web.update(upstreams={"api": dataclasses.replace(api, endpoints=alive)})
        for _ in range(10):
            assert (await stub.Unary(echo_pb2.EchoRequest(), timeout=10)).instance == "api-1"
    finally:
        await channel.close(None)
        await outbound.close(0.1)
        for inbound in inbounds:
            await inbound.close(0.1)
        for app in apps:
            await app.stop(None)


async def test_audit_mode_allows_and_records() -> None:
    async for m in make_mesh(unary_known=True, policy=table("api", ("web", "deny"), mode="audit")):
        assert (await m.stub.Unary(echo_pb2.EchoRequest(text="a"), timeout=10)).text == "a"
        assert not m.inbound.connections  # audited callers take the full path: every call is recorded
        text = m.api_tel.render().decode()
        assert 'weft_authz_decisions_total{decision="audit",rule="web -> api (KV weft/intentions/api Sources[0])"}' \
            in text
