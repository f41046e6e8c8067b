"""Connection limits on real sockets (loopback, in process): the public port, the outbound listeners, HTTP/1.1
and the pass-through guard. Each abuse is bounded in count and time."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import h2.config
import h2.connection
import h2.events
import pytest

from policies.model import HttpMatch, Permission
from sidecar.inbound import Inbound
from sidecar.limits import Limits
from sidecar.outbound import Outbound
from sidecar.snapshot import Credentials
from sidecar.telemetry import Telemetry
from sidecar.tls import TlsContexts, client_context, expected_server_name
from tests.apps.echo import echo_pb2, echo_pb2_grpc
from tests.apps.echo import server as echo_server
from tests.apps.httpecho import server as http_echo
from tests.apps.tcpecho import server as tcp_echo
from tests.integration.sidecar.harness import Authority, Holder, snapshot, table
from tests.support import free_port
from tests.unit.sidecar.pki import TD

pytestmark = pytest.mark.integration

def refused(telemetry: Telemetry, reason: str) -> float:
    return telemetry.registry.get_sample_value("weft_connections_refused_total", {"reason": reason}) or 0.0


def h2_errors(telemetry: Telemetry, reason: str) -> float:
    return telemetry.registry.get_sample_value("weft_h2_protocol_errors_total", {"reason": reason}) or 0.0


async def eventually(check: Any, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    assert check()


async def closed_by_peer(reader: asyncio.StreamReader, seconds: float = 10.0) -> bytes:
    """Everything the peer sends until it closes (a reset counts as a close)."""
    got = b""
    with contextlib.suppress(ConnectionError):
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), seconds)
            if not chunk:
                break
            got += chunk
    return got


@dataclass
class Api:
    ca: Authority
    inbound: Inbound
    telemetry: Telemetry


@contextlib.asynccontextmanager
async def public_port(limits: Limits, *, app_options: list[tuple[str, Any]] | None = None) -> AsyncIterator[Api]:
    ca = Authority.root()
    app = grpc.aio.server(options=app_options or [])
    echo_pb2_grpc.add_EchoServicer_to_server(echo_server.EchoServicer("api-1"), app)  # type: ignore[no-untyped-call]
    port = app.add_insecure_port("127.0.0.1:0")
    await app.start()
    holder = Holder(snapshot("api", ca.leaf("api"), app_port=port, policy=table("api", ("web", "allow"))))
    tel = Telemetry()
    inbound = Inbound(holder, tel, TlsContexts(), limits=limits)
    await inbound.start("127.0.0.1", 0)
    try:
        yield Api(ca, inbound, tel)
    finally:
        await inbound.close(0.1)
        await app.stop(None)


def channel(api: Api, creds: Credentials | None = None) -> grpc.aio.Channel:
    """A gRPC channel straight to the public port, as the caller ``web``."""
    creds = creds or api.ca.leaf("web")
    channel_creds = grpc.ssl_channel_credentials(creds.roots_pem.encode(), creds.key_pem.encode(),
                                                 creds.full_chain_pem.encode())
    name = expected_server_name("api", TD)
    return grpc.aio.secure_channel(f"127.0.0.1:{api.inbound.port}", channel_creds,
                                   options=[("grpc.ssl_target_name_override", name)])


async def call(api: Api) -> str:
    async with channel(api) as ch:
        stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
        resp = await stub.Unary(echo_pb2.EchoRequest(text="x"), timeout=10)
        return str(resp.instance)


async def test_a_handshake_that_never_starts_is_dropped_at_the_timeout() -> None:
    async with public_port(Limits(handshake_timeout=0.3)) as api:
        reader, writer = await asyncio.open_connection("127.0.0.1", api.inbound.port)
        assert await closed_by_peer(reader) == b""
        writer.close()
        assert refused(api.telemetry, "handshake_timeout") == 1.0
        assert len(api.inbound.admission.pending) == 0
        assert await call(api) == "api-1"


async def test_half_open_flood_evicts_the_oldest_and_a_real_caller_is_served() -> None:
    async with public_port(Limits(max_pending_handshakes=8, handshake_timeout=30.0)) as api:
        flood = [await asyncio.open_connection("127.0.0.1", api.inbound.port) for _ in range(40)]
        await eventually(lambda: refused(api.telemetry, "pending_handshakes") >= 32)
        assert len(api.inbound.admission.pending) == 8
        # the oldest were dropped, the newest are still waiting
        assert await closed_by_peer(flood[0][0], 5) == b""
        assert await call(api) == "api-1"
        for _, writer in flood:
            writer.close()
        await eventually(lambda: api.inbound.admission.gate.open == 0)


async def test_connections_past_the_cap_are_refused_and_others_served_after() -> None:
    async with public_port(Limits(max_connections=4)) as api:
        held = [await asyncio.open_connection("127.0.0.1", api.inbound.port) for _ in range(4)]
        await eventually(lambda: api.inbound.admission.gate.open == 4)
        reader, writer = await asyncio.open_connection("127.0.0.1", api.inbound.port)
        assert await closed_by_peer(reader, 5) == b""
        writer.close()
        assert refused(api.telemetry, "max_connections") == 1.0
        for _, w in held:
            w.close()
        await eventually(lambda: api.inbound.admission.gate.open == 0)
        assert await call(api) == "api-1"


async def test_idle_passthrough_connections_are_closed_and_clients_come_back() -> None:
    async with public_port(Limits(idle_timeout=0.3)) as api:
        async with channel(api) as ch:
            stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
            assert (await stub.Unary(echo_pb2.EchoRequest(text="x"), timeout=10)).instance == "api-1"
            await eventually(lambda: refused(api.telemetry, "idle_timeout") >= 1)
            await eventually(lambda: not api.inbound.connections)
            # the channel reconnects
            assert (await stub.Unary(echo_pb2.EchoRequest(text="x"), timeout=10)).instance == "api-1"


async def test_a_call_in_progress_is_not_idle() -> None:
    async with public_port(Limits(idle_timeout=1.0)) as api:
        async with channel(api) as ch:
            stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
            # the app answers after 3 s of silence: the open stream keeps the connection
            resp = await stub.Unary(echo_pb2.EchoRequest(text="x"), metadata=(("x-echo-delay-ms", "3000"),),
                                    timeout=10)
            assert resp.instance == "api-1"
            assert refused(api.telemetry, "idle_timeout") == 0.0


def h2_client_tls(api: Api) -> ssl.SSLContext:
    ctx = client_context(api.ca.leaf("web"), ["h2"])
    return ctx


async def test_passthrough_guard_sends_goaway_and_others_are_served() -> None:
    async with public_port(Limits(h2_max_continuation_frames=4)) as api:
        reader, writer = await asyncio.open_connection("127.0.0.1", api.inbound.port, ssl=h2_client_tls(api),
                                                       server_hostname=expected_server_name("api", TD))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        # HEADERS without END_HEADERS, then CONTINUATION frames past the limit
        frames = b"\x00\x00\x01\x01\x00\x00\x00\x00\x01\x82" + b"\x00\x00\x01\x09\x00\x00\x00\x00\x01\x82" * 10
        writer.write(frames)
        await writer.drain()
        data = await closed_by_peer(reader)
        events = conn.receive_data(data)
        goaways = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        assert goaways and goaways[0].error_code == 0xB  # ENHANCE_YOUR_CALM
        writer.close()
        assert h2_errors(api.telemetry, "continuation_flood") == 1.0
        assert await call(api) == "api-1"


async def test_passthrough_clients_learn_the_stream_bound() -> None:
    async with public_port(Limits(h2_max_concurrent_streams=7)) as api:
        reader, writer = await asyncio.open_connection("127.0.0.1", api.inbound.port, ssl=h2_client_tls(api),
                                                       server_hostname=expected_server_name("api", TD))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        await writer.drain()
        for _ in range(20):
            conn.receive_data(await asyncio.wait_for(reader.read(65536), 10))
            if conn.remote_settings.max_concurrent_streams == 7:
                break
        assert conn.remote_settings.max_concurrent_streams == 7
        writer.close()


@contextlib.asynccontextmanager
async def outbound_pair(protocol: str, app_port: int, limits: Limits) -> AsyncIterator[tuple[Outbound, int, Telemetry]]:
    ca = Authority.root()
    api = Holder(snapshot("api", ca.leaf("api"), protocol=protocol, app_port=app_port,
                          policy=table("api", ("web", "allow"))))
    inbound = Inbound(api, Telemetry(), TlsContexts())
    public = await inbound.start("127.0.0.1", 0)
    local = free_port()
    web = Holder(snapshot("web", ca.leaf("web"), upstreams={"api": (local, [public], protocol)}, policy=table("web")))
    tel = Telemetry()
    outbound = Outbound(web, tel, TlsContexts(), limits=limits)
    await outbound.start()
    try:
        yield outbound, local, tel
    finally:
        await outbound.close(0.1)
        await inbound.close(0.1)


async def test_outbound_tcp_cap_and_idle_timeout() -> None:
    server, port = await tcp_echo.start(0)
    try:
        async with outbound_pair("tcp", port, Limits(max_connections=2, idle_timeout=0.3)) as (_, local, tel):
            r1, w1 = await asyncio.open_connection("127.0.0.1", local)
            r2, w2 = await asyncio.open_connection("127.0.0.1", local)
            w1.write(b"ping")
            assert await asyncio.wait_for(r1.readexactly(4), 10) == b"ping"
            r3, w3 = await asyncio.open_connection("127.0.0.1", local)
            assert await closed_by_peer(r3, 5) == b""
            assert refused(tel, "max_connections") == 1.0
            # both held connections go quiet and are closed
            assert await closed_by_peer(r1) == b""
            assert await closed_by_peer(r2) == b""
            assert refused(tel, "idle_timeout") == 2.0
            for w in (w1, w2, w3):
                w.close()
    finally:
        server.close()


async def test_http_large_heads_get_431_and_slow_heads_408() -> None:
    runner, port = await http_echo.start(0, name="api-1")
    try:
        limits = Limits(http_max_header_size=4096, http_header_timeout=0.3)
        async with outbound_pair("http", port, limits) as (_, local, tel):
            reader, writer = await asyncio.open_connection("127.0.0.1", local)
            writer.write(b"GET /x HTTP/1.1\r\nHost: api\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
            data = await closed_by_peer(reader)
            assert data[9:12] == b"431", data[:100]
            writer.close()
            assert refused(tel, "http_header_size") == 1.0
            # too many fields
            reader, writer = await asyncio.open_connection("127.0.0.1", local)
            writer.write(b"GET /x HTTP/1.1\r\nHost: api\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(150))
                         + b"\r\n")
            assert (await closed_by_peer(reader))[9:12] == b"431"
            writer.close()
            # a head that never ends
            reader, writer = await asyncio.open_connection("127.0.0.1", local)
            writer.write(b"GET /x HTTP/1.1\r\nHost: api\r\n")
            data = await closed_by_peer(reader)
            assert data.startswith(b"HTTP/1.1 408"), data[:100]
            writer.close()
            # a connection that sends nothing at all
            reader, writer = await asyncio.open_connection("127.0.0.1", local)
            assert (await closed_by_peer(reader)).startswith(b"HTTP/1.1 408")
            writer.close()
            assert refused(tel, "http_header_timeout") == 2.0
            # a well-formed request on a fresh connection still works, and keep-alive is not a slow head
            reader, writer = await asyncio.open_connection("127.0.0.1", local)
            for _ in range(2):
                writer.write(b"GET /ok HTTP/1.1\r\nHost: api\r\nX-Fine: " + b"a" * 3000 + b"\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 200"), head
                length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
                             .split(b":")[1])
                await asyncio.wait_for(reader.readexactly(length), 10)
                await asyncio.sleep(0.5)  # idle between requests longer than the head timeout
            writer.close()
    finally:
        await runner.cleanup()


async def test_inbound_http_full_path_answers_431_and_408() -> None:
    runner, port = await http_echo.start(0, name="api-1")
    ca = Authority.root()
    rules = (Permission(action="allow", http=HttpMatch(path_prefix="/")),)
    policy = table("api", ("web", rules))
    holder = Holder(snapshot("api", ca.leaf("api"), protocol="http", app_port=port, policy=policy))
    tel = Telemetry()
    inbound = Inbound(holder, tel, TlsContexts(), limits=Limits(http_max_header_size=4096, http_header_timeout=0.3))
    await inbound.start("127.0.0.1", 0)
    ctx = client_context(ca.leaf("web"), ["http/1.1"])
    name = expected_server_name("api", TD)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", inbound.port, ssl=ctx, server_hostname=name)
        writer.write(b"GET /x HTTP/1.1\r\nHost: api\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200"), head  # the full path serves a normal request
        writer.write(b"GET /x HTTP/1.1\r\nHost: api\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
        assert b" 431 " in await closed_by_peer(reader)
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", inbound.port, ssl=ctx, server_hostname=name)
        writer.write(b"GET /x HTTP/1.1\r\nHost: api\r\n")
        assert (await closed_by_peer(reader)).startswith(b"HTTP/1.1 408")
        writer.close()
        assert refused(tel, "http_header_size") == 1.0 and refused(tel, "http_header_timeout") == 1.0
    finally:
        await inbound.close(0.1)
        await runner.cleanup()


async def test_rapid_reset_on_passthrough_is_refused_while_others_are_served() -> None:
    async with public_port(Limits(h2_reset_burst=50, h2_reset_rate=0.0)) as api:
        served: list[str] = []
        done = asyncio.Event()

        async def other_caller() -> None:
            async with channel(api) as ch:
                stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
                while not done.is_set():
                    served.append((await stub.Unary(echo_pb2.EchoRequest(text="x"), timeout=10)).instance)

        task = asyncio.ensure_future(other_caller())
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", api.inbound.port, ssl=h2_client_tls(api),
                                                           server_hostname=expected_server_name("api", TD))
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            headers = [(":method", "POST"), (":scheme", "https"), (":path", "/weft.test.echo.v1.Echo/Unary"),
                       (":authority", "api"), ("content-type", "application/grpc"), ("te", "trailers")]
            for i in range(200):
                conn.send_headers(1 + 2 * i, headers)
                conn.reset_stream(1 + 2 * i)
            writer.write(conn.data_to_send())
            await writer.drain()
            events = conn.receive_data(await closed_by_peer(reader))
            goaways = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
            assert goaways and goaways[0].error_code == 0xB  # ENHANCE_YOUR_CALM
            writer.close()
            assert h2_errors(api.telemetry, "rapid_reset") == 1.0
            count = len(served)
            await eventually(lambda: len(served) > count + 5)
        finally:
            done.set()
            await task
        assert set(served) == {"api-1"}


async def test_a_client_without_alpn_is_guarded_too() -> None:
    async with public_port(Limits()) as api:
        ctx = client_context(api.ca.leaf("web"))  # no ALPN offered
        reader, writer = await asyncio.open_connection("127.0.0.1", api.inbound.port, ssl=ctx,
                                                       server_hostname=expected_server_name("api", TD))
        writer.write(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        await writer.drain()
        await closed_by_peer(reader)
        writer.close()
        assert h2_errors(api.telemetry, "preface") == 1.0


async def test_outbound_http_and_grpc_listeners_cap_connections() -> None:
    runner, port = await http_echo.start(0, name="api-1")
    try:
        async with outbound_pair("http", port, Limits(max_connections=1)) as (_, local, tel):
            r1, w1 = await asyncio.open_connection("127.0.0.1", local)
            w1.write(b"GET /ok HTTP/1.1\r\nHost: api\r\n\r\n")
            assert (await asyncio.wait_for(r1.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
            r2, w2 = await asyncio.open_connection("127.0.0.1", local)
            assert await closed_by_peer(r2, 5) == b""
            assert refused(tel, "max_connections") == 1.0
            for w in (w1, w2):
                w.close()
    finally:
        await runner.cleanup()
    app, app_port, _ = await echo_server.start(0, name="api-1")
    try:
        async with outbound_pair("grpc", app_port, Limits(max_connections=1)) as (_, local, tel):
            # two channels with different options: two connections to the frame-level HTTP/2 listener
            channels = [grpc.aio.insecure_channel(f"127.0.0.1:{local}", options=[("weft.test.channel", i)])
                        for i in (1, 2)]
            try:
                first = echo_pb2_grpc.EchoStub(channels[0])  # type: ignore[no-untyped-call]
                assert (await first.Unary(echo_pb2.EchoRequest(text="x"), timeout=10)).instance == "api-1"
                second = echo_pb2_grpc.EchoStub(channels[1])  # type: ignore[no-untyped-call]
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await second.Unary(echo_pb2.EchoRequest(text="x"), timeout=3)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert refused(tel, "max_connections") >= 1.0  # the channel may have tried again meanwhile
                assert (await first.Unary(echo_pb2.EchoRequest(text="x"), timeout=10)).instance == "api-1"
            finally:
                for ch in channels:
                    await ch.close(None)
    finally:
        await app.stop(None)


async def test_outbound_tcp_dial_fails_over_after_a_bad_or_silent_handshake() -> None:
    server, port = await tcp_echo.start(0)
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # accepts, never answers
    not_tls, not_tls_port = await tcp_echo.start(0)  # echoes the ClientHello back: not TLS
    silent_port = silent.sockets[0].getsockname()[1]
    try:
        ca = Authority.root()
        api = Holder(snapshot("api", ca.leaf("api"), protocol="tcp", app_port=port,
                              policy=table("api", ("web", "allow"))))
        inbound = Inbound(api, Telemetry(), TlsContexts())
        public = await inbound.start("127.0.0.1", 0)
        for bad in (silent_port, not_tls_port):
            local = free_port()
            web = Holder(snapshot("web", ca.leaf("web"), upstreams={"api": (local, [bad], "tcp")},
                                  policy=table("web")))
            outbound = Outbound(web, Telemetry(), TlsContexts(), limits=Limits(handshake_timeout=0.3))
            await outbound.start()
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", local)
                assert await closed_by_peer(reader) == b""  # no upstream would do: closed
                writer.close()
                # with a good endpoint as well, connections get through (the bad one is retried past)
                both = snapshot("web", ca.leaf("web"), upstreams={"api": (local, [bad, public], "tcp")},
                                policy=table("web"))
                outbound.pools["api"].update(both.upstreams["api"])
                for _ in range(4):
                    reader, writer = await asyncio.open_connection("127.0.0.1", local)
                    writer.write(b"ping")
                    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
                    writer.close()
            finally:
                await outbound.close(0.1)
        await inbound.close(0.1)
    finally:
        server.close()
        silent.close()
        not_tls.close()
