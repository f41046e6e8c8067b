"""The attacker and the tier's expectations against a conforming HTTP/2 server (python-hyper's h2, in
process over a socket pair): for the protocol violations that have one right answer, h2 answers with
the error the abuse tests expect from a sidecar, and the attacker reads it. This shows the tier can
pass: its frames are what they claim to be and its expected codes are RFC 9113's. No mesh needed.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.exceptions import ProtocolError

from tests.abuse.attacker import (
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    INITIAL_WINDOW_SIZE,
    MAX_FRAME_SIZE,
    MAX_WINDOW,
    PROTOCOL_ERROR,
    STREAM_CLOSED,
    Peer,
    data,
    grpc_message,
    refused_with,
    settings,
    window_update,
)

pytestmark = pytest.mark.abuse

PATH = "/weft.test.echo.v1.Echo/Unary"


def _serve(sock: socket.socket) -> None:
    """A conforming server: h2 decides every error; requests stay unanswered."""
    conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    with contextlib.suppress(OSError):
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return
            try:
                conn.receive_data(chunk)
            except ProtocolError:
                sock.sendall(conn.data_to_send())  # the GOAWAY h2 prepared
                return
            sock.sendall(conn.data_to_send())


@pytest.fixture
def peer() -> Iterator[Peer]:
    client, server = socket.socketpair()
    thread = threading.Thread(target=_serve, args=(server,), daemon=True)
    thread.start()
    p = Peer(client)
    assert p.start()
    try:
        yield p
    finally:
        p.close()
        server.close()
        thread.join(5)


def _send_and_settle(peer: Peer, attack: Callable[[Peer], object]) -> Peer:
    attack(peer)
    peer.settle(3.0)
    return peer


def test_window_update_overflow_is_a_flow_control_error(peer: Peer) -> None:
    _send_and_settle(peer, lambda p: p.send(window_update(0, MAX_WINDOW) * 2))
    assert refused_with(peer, goaway=(FLOW_CONTROL_ERROR,)), peer.describe()


def test_oversized_data_frame_is_a_frame_size_error(peer: Peer) -> None:
    def attack(p: Peer) -> None:
        p.request(1, PATH, "echo", end=False)
        p.send(data(1, grpc_message(b"x" * (p.max_frame + 100)), end=True))
    _send_and_settle(peer, attack)
    assert refused_with(peer, goaway=(FRAME_SIZE_ERROR,), rst=(FRAME_SIZE_ERROR,)), peer.describe()


def test_max_frame_size_zero_is_a_protocol_error(peer: Peer) -> None:
    _send_and_settle(peer, lambda p: p.send(settings((MAX_FRAME_SIZE, 0))))
    assert refused_with(peer, goaway=(PROTOCOL_ERROR,)), peer.describe()


def test_initial_window_too_large_is_a_flow_control_error(peer: Peer) -> None:
    _send_and_settle(peer, lambda p: p.send(settings((INITIAL_WINDOW_SIZE, MAX_WINDOW + 1))))
    assert refused_with(peer, goaway=(FLOW_CONTROL_ERROR,)), peer.describe()


def test_even_stream_id_is_a_protocol_error(peer: Peer) -> None:
    _send_and_settle(peer, lambda p: p.request(2, PATH, "echo"))
    assert refused_with(peer, goaway=(PROTOCOL_ERROR,)), peer.describe()


def test_decreasing_stream_id_is_a_protocol_error(peer: Peer) -> None:
    def attack(p: Peer) -> None:
        p.request(5, PATH, "echo", end=False)
        p.request(3, PATH, "echo")
    _send_and_settle(peer, attack)
    assert refused_with(peer, goaway=(PROTOCOL_ERROR,)), peer.describe()


def test_data_after_end_stream_is_stream_closed(peer: Peer) -> None:
    def attack(p: Peer) -> None:
        p.request(1, PATH, "echo", body=b"\x12\x01x")
        p.send(data(1, grpc_message(b"more"), end=True))
    _send_and_settle(peer, attack)
    assert refused_with(peer, goaway=(STREAM_CLOSED,), rst=(STREAM_CLOSED,), sids=(1,)), peer.describe()


def test_the_attacker_reads_responses_and_windows(peer: Peer) -> None:
    """Control: a well-formed request is not refused; the server's SETTINGS and window are recorded."""
    peer.request(1, PATH, "echo", body=b"\x12\x01x")
    peer.pump(0.5)
    assert peer.goaway is None and not peer.resets(), peer.describe()
    assert peer.server_settings and peer.send_window >= 65535 - 20
