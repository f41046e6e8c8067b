"""HTTP/2 limits of the h2 engine through real sidecars: refusals that keep the connection, and
fixes that keep other calls working (raw h2 clients from python-hyper as the misbehaving app)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from policies.model import HeaderMatch, HttpMatch, Permission
from sidecar.inbound import Inbound
from sidecar.limits import Limits
from sidecar.outbound import Outbound
from sidecar.telemetry import Telemetry
from sidecar.tls import TlsContexts
from tests.apps.echo import echo_pb2, echo_pb2_grpc
from tests.apps.echo import server as echo_server
from tests.integration.sidecar.harness import Authority, Holder, snapshot, table
from tests.support import free_port

pytestmark = pytest.mark.integration

UNARY = "/weft.test.echo.v1.Echo/Unary"
SERVER_STREAM = "/weft.test.echo.v1.Echo/ServerStream"


class Pair:
    def __init__(self, outbound: Outbound, inbound: Inbound, local: int, web_tel: Telemetry,
                 api_tel: Telemetry) -> None:
        self.outbound = outbound
        self.inbound = inbound
        self.local = local
        self.web_tel = web_tel
        self.api_tel = api_tel


async def echo_app(max_streams: int) -> tuple[grpc.aio.Server, int]:
    """The echo app, accepting metadata up to 1 MiB, limited to ``max_streams`` concurrent streams (0: not)."""
    options: list[tuple[str, Any]] = [("grpc.so_reuseport", 0), ("grpc.max_metadata_size", 1 << 20),
                                      ("grpc.absolute_max_metadata_size", 1 << 20)]
    if max_streams:
        options.append(("grpc.max_concurrent_streams", max_streams))
    server = grpc.aio.server(options=options)
    echo_pb2_grpc.add_EchoServicer_to_server(echo_server.EchoServicer("api-1"), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def make_pair(limits: Limits, *, policy: Any = None, max_streams: int = 0) -> AsyncIterator[Pair]:
    ca = Authority.root()
    app, app_port = await echo_app(max_streams)
    # an L7 rule: every call takes the inbound full path (authorized per call), not pass-through
    pol = policy or table("api", ("web", (Permission(action="allow", http=HttpMatch(path_prefix="/")),)))
    api_holder = Holder(snapshot("api", ca.leaf("api"), app_port=app_port, policy=pol))
    api_tel = Telemetry()
    inbound = Inbound(api_holder, api_tel, TlsContexts(), limits=limits)
    api_holder.listeners.append(inbound.on_snapshot)
    public = await inbound.start("127.0.0.1", 0)
    local = free_port()
    web_holder = Holder(snapshot("web", ca.leaf("web"), upstreams={"api": (local, [public], "grpc")},
                                 policy=table("web")))
    web_tel = Telemetry()
    outbound = Outbound(web_holder, web_tel, TlsContexts(), limits=limits)
    web_holder.listeners.append(outbound.on_snapshot)
    await outbound.start()
    try:
        yield Pair(outbound, inbound, local, web_tel, api_tel)
    finally:
        await outbound.close(0.1)
        await inbound.close(0.1)
        await app.stop(None)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    async for p in make_pair(Limits(h2_reset_burst=20, h2_reset_rate=1.0)):
        yield p


def channel(p: Pair) -> grpc.aio.Channel:
    options = [("grpc.max_metadata_size", 1 << 20), ("grpc.absolute_max_metadata_size", 1 << 20)]
    return grpc.aio.insecure_channel(f"127.0.0.1:{p.local}", options=options)


def message(req: echo_pb2.EchoRequest) -> bytes:
    body = req.SerializeToString()
    return struct.pack(">BI", 0, len(body)) + body


class RawClient:
    """An app speaking HTTP/2 with python-hyper's h2, able to misbehave."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, **settings: int) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True,
                                                                                header_encoding="utf-8"))
        self.conn.initiate_connection()
        if settings:
            self.conn.update_settings({getattr(h2.settings.SettingCodes, k): v for k, v in settings.items()})
        self.events: list[Any] = []

    @classmethod
    async def connect(cls, port: int, **settings: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer, **settings)
        await client.flush()
        return client

    async def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())
        await self.writer.drain()

    def request(self, sid: int, path: str, body: bytes, extra: list[tuple[str, str]] | None = None,
                content_type: str = "application/grpc") -> None:
        self.conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", path),
                                     (":authority", "api"), ("content-type", content_type), ("te", "trailers"),
                                     *(extra or [])])
        self.conn.send_data(sid, body, end_stream=True)

    async def until(self, done: Any, timeout: float = 10.0) -> list[Any]:
        async def loop() -> None:
            while not done(self.events):
                data = await self.reader.read(65536)
                if not data:
                    return
                self.events += self.conn.receive_data(data)
                for e in self.events:
                    if isinstance(e, h2.events.DataReceived):
                        self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                await self.flush()
        await asyncio.wait_for(loop(), timeout)
        return self.events

    def headers_of(self, sid: int) -> dict[str, str]:
        out: dict[str, str] = {}
        for e in self.events:
            if isinstance(e, (h2.events.ResponseReceived, h2.events.TrailersReceived)) and e.stream_id == sid:
                out.update(dict(e.headers))  # type: ignore[arg-type]
        return out

    def close(self) -> None:
        self.writer.close()


def ended(sid: int) -> Any:
    return lambda events: any(isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) and e.stream_id == sid
                              for e in events) or any(isinstance(e, h2.events.ConnectionTerminated) for e in events)


async def test_oversized_metadata_is_refused_and_the_connection_kept(pair: Pair) -> None:
    client = await RawClient.connect(pair.local)
    client.request(1, UNARY, message(echo_pb2.EchoRequest(text="big")), [("x-big", "a" * 70_000)])
    await client.flush()
    await client.until(ended(1))
    assert client.headers_of(1)["grpc-status"] == "8"  # RESOURCE_EXHAUSTED, trailers-only
    client.request(3, UNARY, message(echo_pb2.EchoRequest(text="after")))
    await client.flush()
    await client.until(ended(3))
    assert client.headers_of(3)["grpc-status"] == "0"
    client.request(5, "/upload", b"x", [("x-big", "a" * 70_000)], content_type="text/plain")
    await client.flush()
    await client.until(ended(5))
    assert client.headers_of(5)[":status"] == "431"
    # a block above the block-size limit (after the acknowledgement): counted and discarded
    client.request(7, UNARY, message(echo_pb2.EchoRequest(text="bigger")), [("x-big", "a" * 110_000)])
    await client.flush()
    await client.until(ended(7))
    assert client.headers_of(7)["grpc-status"] == "8"
    client.request(9, UNARY, message(echo_pb2.EchoRequest(text="still")))
    await client.flush()
    await client.until(ended(9))
    assert client.headers_of(9)["grpc-status"] == "0"
    assert pair.web_tel.h2_protocol_errors.labels("header_block_too_large")._value.get() >= 3
    client.close()


async def test_metadata_up_to_the_limit_passes_both_sidecars(pair: Pair) -> None:
    ch = channel(pair)
    stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
    pads = tuple((f"x-pad-{i}", "p" * 10_000) for i in range(5))
    resp = await stub.Unary(echo_pb2.EchoRequest(text="md"), metadata=pads, timeout=10)
    assert resp.text == "md" and all(resp.metadata[k] == v for k, v in pads)
    await ch.close(None)


async def test_rapid_reset_gets_goaway_while_other_calls_succeed(pair: Pair) -> None:
    ch = channel(pair)
    stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
    client = await RawClient.connect(pair.local)
    sid = 1
    for _ in range(200):
        client.conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", UNARY),
                                       (":authority", "api"), ("content-type", "application/grpc")])
        client.conn.reset_stream(sid)
        sid += 2
    await client.flush()
    events = await client.until(lambda ev: any(isinstance(e, h2.events.ConnectionTerminated) for e in ev))
    gone = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert gone and gone[0].error_code == 11  # ENHANCE_YOUR_CALM
    results = await asyncio.gather(*(stub.Unary(echo_pb2.EchoRequest(text=str(i)), timeout=10) for i in range(20)))
    assert [r.text for r in results] == [str(i) for i in range(20)]
    client.close()
    await ch.close(None)


async def test_reset_calls_with_queued_data_give_the_shared_window_back(pair: Pair) -> None:
    # calls that ask for large responses with a zero window and then go away: the data queued for them
    # must be credited to the shared upstream connection, or later calls between the pair would stall
    for _ in range(3):
        client = await RawClient.connect(pair.local, INITIAL_WINDOW_SIZE=0)
        for sid in (1, 3, 5, 7):
            client.request(sid, SERVER_STREAM, message(echo_pb2.EchoRequest(response_size=1_000_000)),
                           [("x-echo-count", "4")])
        await client.flush()
        await asyncio.sleep(0.3)
        client.close()
    ch = channel(pair)
    stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
    got = [r async for r in stub.ServerStream(echo_pb2.EchoRequest(response_size=1_000_000),
                                              metadata=(("x-echo-count", "20"),), timeout=20)]
    assert len(got) == 20
    await ch.close(None)


async def test_client_trailers_are_forwarded_not_dropped(pair: Pair) -> None:
    client = await RawClient.connect(pair.local)
    client.conn.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", UNARY), (":authority", "api"),
                                 ("content-type", "application/grpc"), ("te", "trailers")])
    client.conn.send_data(1, message(echo_pb2.EchoRequest(text="t")))
    client.conn.send_headers(1, [("x-client-trailer", "1")], end_stream=True)
    await client.flush()
    await client.until(ended(1))
    assert client.headers_of(1)["grpc-status"] == "0"
    client.close()


async def test_an_app_limiting_concurrent_streams_gets_every_call() -> None:
    async for p in make_pair(Limits(), max_streams=4):
        ch = channel(p)
        stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
        results = await asyncio.gather(*(stub.Unary(echo_pb2.EchoRequest(text=str(i)), timeout=20,
                                                    metadata=(("x-echo-delay-ms", "50"),)) for i in range(40)))
        assert [r.text for r in results] == [str(i) for i in range(40)]
        await ch.close(None)


async def test_a_repeated_header_is_authorized_on_every_value() -> None:
    rule = Permission(action="allow", http=HttpMatch(path_prefix="/", headers=(HeaderMatch(name="x-role",
                                                                                             exact="reader"),)))
    async for p in make_pair(Limits(), policy=table("api", ("web", (rule,)))):
        ch = channel(p)
        stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
        assert (await stub.Unary(echo_pb2.EchoRequest(text="ok"), metadata=(("x-role", "reader"),), timeout=10)).text
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Unary(echo_pb2.EchoRequest(), metadata=(("x-role", "reader"), ("x-role", "admin")), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await ch.close(None)


async def test_upstream_connections_are_retired_before_their_stream_ids_run_out(pair: Pair) -> None:
    from sidecar.h2_proxy import H2Outbound

    ch = channel(pair)
    stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
    await stub.Unary(echo_pb2.EchoRequest(text="first"), timeout=10)
    h2out = pair.outbound._listeners["api"]
    assert isinstance(h2out, H2Outbound)
    first = next(iter(h2out.ups.values()))
    first.sid_limit = first.next_local_sid + 4  # as if the ids were about to run out
    seen = {id(first)}
    for i in range(8):
        assert (await stub.Unary(echo_pb2.EchoRequest(text=str(i)), timeout=10)).text == str(i)
        seen |= {id(u) for u in h2out.ups.values()}
    assert len(seen) >= 2 and first.retired
    await ch.close(None)


async def test_drain_sends_goaway_with_the_last_stream(pair: Pair) -> None:
    client = await RawClient.connect(pair.local)
    client.request(1, UNARY, message(echo_pb2.EchoRequest(text="a")))
    await client.flush()
    await client.until(ended(1))
    closing = asyncio.ensure_future(pair.outbound.close(0.5))
    events = await client.until(lambda ev: any(isinstance(e, h2.events.ConnectionTerminated) for e in ev))
    gone = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert gone[0].error_code == 0 and gone[0].last_stream_id == 1
    await closing
    client.close()


async def test_a_client_that_does_not_read_is_not_buffered_for(pair: Pair) -> None:
    from sidecar.h2_proxy import H2Outbound

    h2out = pair.outbound._listeners["api"]
    assert isinstance(h2out, H2Outbound)
    client = await RawClient.connect(pair.local, INITIAL_WINDOW_SIZE=2**31 - 1)
    client.conn.increment_flow_control_window(2**30)
    client.request(1, SERVER_STREAM, message(echo_pb2.EchoRequest(response_size=1_000_000)), [("x-echo-count", "60")])
    await client.flush()
    await asyncio.sleep(2.0)  # 60 MB offered; the client reads nothing
    limit = pair.outbound.limits.h2_max_buffered_bytes
    for app in h2out.apps:
        buffered = app.transport.get_write_buffer_size()
        queued = sum(len(item) for s in app.streams.values() for _, item, _ in s.call.q_app)
        assert buffered <= 2 * limit + 64 * 1024, buffered
        assert queued <= 2 * pair.outbound.limits.h2_initial_stream_window, queued
    # other callers are not held up meanwhile
    ch = channel(pair)
    stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
    assert (await stub.Unary(echo_pb2.EchoRequest(text="other"), timeout=10)).text == "other"
    await ch.close(None)
    client.close()


async def test_settings_not_acknowledged_in_time_end_with_settings_timeout() -> None:
    async for p in make_pair(Limits(h2_settings_timeout=0.3)):
        reader, writer = await asyncio.open_connection("127.0.0.1", p.local)
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # never acks ours
        got = await asyncio.wait_for(reader.read(-1), 5)  # until the sidecar closes it
        goaway = got.find(b"\x07\x00\x00\x00\x00\x00")  # type GOAWAY, flags 0, stream 0
        assert goaway > 0 and got[goaway + 10:goaway + 14] == b"\x00\x00\x00\x04"  # SETTINGS_TIMEOUT
        writer.close()
