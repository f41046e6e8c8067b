"""Client-side TLS on memory BIOs (sidecar.tls_conn.TlsProtocolClient), pumped against an in-process server.

No sockets: the client's raw transport is a recorder, the server is an ``ssl.SSLObject`` on memory BIOs.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import pytest

from sidecar import tls_conn
from sidecar.tls import ALPN_GRPC, client_context, expected_server_name, server_context
from sidecar.tls_conn import TLS_PLAIN_READ, TlsProtocolClient
from tests.unit.sidecar.pki import TD, Authority
from tests.unit.sidecar.test_pipe import FakeTransport


class Raw(FakeTransport):
    def __init__(self) -> None:
        super().__init__()
        self.limits: tuple[int | None, int | None] | None = None

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = (high, low)

    def take(self) -> bytes:
        data = self.data()
        self.written.clear()
        return data


class Inner(asyncio.Protocol):
    """What the h2 engine's UpConn sees."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.received: list[bytes] = []
        self.lost: list[Exception | None] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=1000, low=250)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        assert isinstance(data, bytes)  # a copy: the shared plaintext buffer is reused
        self.received.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


class Server:
    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=True)
        self.done = False
        self.error: BaseException | None = None


def feed(conn: asyncio.BufferedProtocol, data: bytes) -> None:
    while data:
        buf = conn.get_buffer(len(data))
        n = min(len(buf), len(data))
        buf[:n] = data[:n]
        conn.buffer_updated(n)
        data = data[n:]


def pump(conn: TlsProtocolClient, raw: Raw, server: Server, rounds: int = 10) -> None:
    for _ in range(rounds):
        server.inc.write(raw.take())
        if not server.done and server.error is None:
            try:
                server.obj.do_handshake()
                server.done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                server.error = exc
        out = server.out.read()
        if out and not conn.closed:
            feed(conn, out)
        if conn.ready.done() and not raw.written and not server.out.pending:
            return


@pytest.fixture(scope="module")
def ca() -> Authority:
    return Authority.root()


def start(ca: Authority, served: Any, *, alpn: list[str] | None = ALPN_GRPC,
          timeout: float = 10.0) -> tuple[TlsProtocolClient, Raw, Server, Inner]:
    inner = Inner()
    conn = TlsProtocolClient(inner, client_context(ca.leaf("web"), ALPN_GRPC), expected_server_name("api", TD), timeout)
    raw = Raw()
    conn.connection_made(raw)  # type: ignore[arg-type]
    server = Server(server_context(served, alpn))
    pump(conn, raw, server)
    return conn, raw, server, inner


async def test_handshake_then_data_both_ways_through_the_bounded_buffer(ca: Authority) -> None:
    conn, raw, server, inner = start(ca, ca.leaf("api"))
    assert conn.ready.done() and conn.ready.exception() is None
    assert inner.transport is conn.writer and conn.sslobj.selected_alpn_protocol() == "h2"
    assert inner.transport.get_extra_info("ssl_object") is conn.sslobj
    assert raw.limits == (1000, 250)  # the protocol's back-pressure bounds apply to the raw connection
    inner.transport.write(b"hello upstream")
    server.inc.write(raw.take())
    assert server.obj.read(100) == b"hello upstream"
    big = bytes(range(256)) * 1024  # 256 KiB: more than the plaintext buffer, in many records
    server.obj.write(big)
    feed(conn, server.out.read())
    assert b"".join(inner.received) == big
    assert max(len(chunk) for chunk in inner.received) <= TLS_PLAIN_READ
    # the server's close_notify closes the connection with our own close_notify; the protocol learns it on loss
    try:
        server.obj.unwrap()
    except ssl.SSLWantReadError:
        pass
    feed(conn, server.out.read())
    assert conn.closed and raw.data()  # our close_notify was written
    conn.connection_lost(None)
    assert inner.lost == [None] and conn.sslobj is None


async def test_every_record_is_delivered_however_the_ciphertext_is_split(ca: Authority) -> None:
    """Reads stop once the BIO is drained (no SSLWantReadError asked for): nothing may be left behind by it."""
    conn, _raw, server, inner = start(ca, ca.leaf("api"))
    messages = [bytes([i]) * size for i, size in enumerate((1, 100, 5000, 17000, 3))]
    for m in messages:
        server.obj.write(m)  # one or more records each
    wire = server.out.read()
    # byte by byte, then records in one chunk with a partial record at its end, then the rest
    for piece in [wire[:40][i:i + 1] for i in range(40)] + [wire[40:9000], wire[9000:]]:
        feed(conn, piece)
    assert b"".join(inner.received) == b"".join(messages)
    # a burst over the plaintext buffer whose records do not line up with it: the buffer fills in the
    # middle of a record, whose rest OpenSSL holds with the ciphertext all read
    inner.received.clear()
    burst = [bytes([i]) * 5000 for i in range(14)]  # the 14th record holds byte 65536
    for m in burst:
        server.obj.write(m)
    feed(conn, server.out.read())
    assert b"".join(inner.received) == b"".join(burst)
    # data and the close_notify in one chunk: both seen
    inner.received.clear()
    server.obj.write(b"last words")
    try:
        server.obj.unwrap()
    except ssl.SSLWantReadError:
        pass
    feed(conn, server.out.read())
    assert b"".join(inner.received) == b"last words" and conn.closed


async def test_an_untrusted_server_fails_this_connection_only(ca: Authority) -> None:
    conn, raw, _, inner = start(ca, Authority.root().leaf("api"))
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.ready.result()
    assert raw.aborted and conn.sslobj is None and inner.transport is None
    conn.connection_lost(None)  # the loss after the abort: the protocol was never made
    assert inner.lost == []


async def test_a_server_of_another_service_fails_the_hostname_check(ca: Authority) -> None:
    conn, raw, _, inner = start(ca, ca.leaf("db"))
    with pytest.raises(ssl.SSLCertVerificationError) as err:
        conn.ready.result()
    assert err.value.verify_code == 62  # hostname mismatch: sidecar.tls counts it as wrong_identity
    assert raw.aborted and inner.transport is None


async def test_no_alpn_agreement_is_visible_to_the_caller(ca: Authority) -> None:
    conn, _, _, _ = start(ca, ca.leaf("api"), alpn=None)
    assert conn.ready.done() and conn.sslobj.selected_alpn_protocol() is None  # h2_proxy refuses it


async def test_handshake_timeout_and_loss_during_the_handshake_fail_ready(ca: Authority) -> None:
    inner = Inner()
    conn = TlsProtocolClient(inner, client_context(ca.leaf("web"), ALPN_GRPC), expected_server_name("api", TD), 10)
    raw = Raw()
    conn.connection_made(raw)  # type: ignore[arg-type]
    assert raw.data()  # the ClientHello
    conn._handshake_timeout()
    with pytest.raises(TimeoutError):
        conn.ready.result()
    assert raw.aborted and conn.sslobj is None
    other = TlsProtocolClient(Inner(), client_context(ca.leaf("web")), expected_server_name("api", TD), 10)
    other.connection_made(Raw())  # type: ignore[arg-type]
    other.connection_lost(None)
    with pytest.raises(ConnectionResetError):
        other.ready.result()


async def test_garbage_from_the_server_fails_the_handshake(ca: Authority) -> None:
    conn = TlsProtocolClient(Inner(), client_context(ca.leaf("web")), expected_server_name("api", TD), 10)
    raw = Raw()
    conn.connection_made(raw)  # type: ignore[arg-type]
    feed(conn, b"HTTP/1.1 400 Bad Request\r\n\r\n" * 100)
    with pytest.raises(ssl.SSLError):
        conn.ready.result()
    assert raw.aborted and conn.closed


def test_the_plaintext_buffer_is_one_bounded_buffer_of_the_process() -> None:
    assert 16 * 1024 <= TLS_PLAIN_READ <= 64 * 1024
    assert len(tls_conn._PLAIN_READ) == TLS_PLAIN_READ
