"""The public port's TLS handing a caller's decrypted connection to a protocol in process
(``TlsServerConnection.attach_protocol``, the gRPC full path), pumped against an in-process client.

No sockets: the server's raw transport is a recorder, the client is an ``ssl.SSLObject`` on memory BIOs.
"""

from __future__ import annotations

import ssl

from sidecar.pipe import Pipe
from sidecar.tls import ALPN_GRPC, client_context, expected_server_name, server_context
from sidecar.tls_conn import TLS_PLAIN_READ, TlsServerConnection
from tests.unit.sidecar.pki import TD, Authority
from tests.unit.sidecar.test_tls_client import Inner, Raw, feed


async def test_a_protocol_attached_at_the_handshake_gets_every_byte_and_writes_through_tls() -> None:
    ca = Authority.root()
    inner = Inner()
    pipe = Pipe()
    handshakes: list[TlsServerConnection] = []

    def handshaken(conn: TlsServerConnection) -> None:
        handshakes.append(conn)
        conn.attach_protocol(inner)  # before any plaintext is read, as sidecar.inbound does

    conn = TlsServerConnection(pipe, lambda: server_context(ca.leaf("api"), ALPN_GRPC), handshaken,
                               lambda c, exc: None)
    raw = Raw()
    conn.connection_made(raw)  # type: ignore[arg-type]
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context(ca.leaf("web"), ALPN_GRPC).wrap_bio(c_in, c_out,
                                                                server_hostname=expected_server_name("api", TD))
    # the client's first bytes ride with its Finished: they must reach the protocol, not the pipe
    for _ in range(10):
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        feed(conn, c_out.read())
        c_in.write(raw.take())
    else:
        raise AssertionError("no handshake")
    client.write(b"PRI * HTTP/2.0")
    feed(conn, c_out.read())
    assert handshakes == [conn] and inner.transport is conn.writer
    assert b"".join(inner.received) == b"PRI * HTTP/2.0" and pipe.a.bytes_in == 0
    assert raw.limits == (1000, 250)  # the protocol's write-buffer bounds apply to the raw connection
    inner.transport.write(b"settings")  # encrypted to the caller
    c_in.write(raw.take())
    assert client.read(100) == b"settings"
    big = bytes(range(256)) * 1024
    client.write(big)
    feed(conn, c_out.read())
    assert b"".join(inner.received)[14:] == big and max(len(c) for c in inner.received) <= TLS_PLAIN_READ
    conn.connection_lost(None)
    assert inner.lost == [None]
