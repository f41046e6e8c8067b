"""Connection-level attacks of issue 9: TCP connections that never handshake, half-open TLS, idle
allowed connections; and a plaintext client on the public port (refused today already: the tier's
own check that it passes what the sidecar handles).

The destination's sidecar runs with the default limits (``--max-pending-handshakes 256``); the
caller's sidecar with ``--max-connections 512``, so that 1,000 connections reach its cap cheaply.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time

import grpc
import pytest

from tests.abuse.attacker import PREFACE, Peer, settings
from tests.abuse.mesh import L7, OUTBOUND, PASSTHROUGH, REFUSED, TLS_ERRORS, Mesh, Target, connection_count_fits

pytestmark = [pytest.mark.abuse, pytest.mark.integration]

PUBLIC = Target("public", "echo-1")  # echo's public port, before any identity is shown
HOLD = 2.0                           # seconds the attacking connections are held open


def open_sockets(port: int, count: int, seconds: float = 10.0, first_bytes: bytes = b"") -> list[socket.socket]:
    """Up to ``count`` connections to ``port`` (each sending ``first_bytes``), within ``seconds``."""
    out: list[socket.socket] = []
    deadline = time.monotonic() + seconds
    while len(out) < count and time.monotonic() < deadline:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(2.0)
        try:
            s.connect(("127.0.0.1", port))
            if first_bytes:
                s.sendall(first_bytes)
        except OSError:
            s.close()
            continue
        out.append(s)
    return out


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.close()


def still_open(socks: list[socket.socket]) -> int:
    """How many of the connections the server has not closed (a peek that does not wait)."""
    n = 0
    for s in socks:
        s.setblocking(False)
        try:
            n += 1 if s.recv(1, socket.MSG_PEEK) else 0
        except BlockingIOError:
            n += 1
        except OSError:
            pass
    return n


def client_hello(mesh: Mesh) -> bytes:
    """The first flight of a TLS client with a mesh certificate (the same bytes serve every socket)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = mesh.tls_context("web").wrap_bio(incoming, outgoing, server_hostname="echo")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def fresh_mtls_call(mesh: Mesh) -> str:
    """A call on a new mTLS connection to echo's public port (as ``l7caller``); "" when it succeeded."""
    try:
        mesh.l7_call(timeout=10)
        return ""
    except grpc.RpcError as exc:
        return f"{exc.code()}: {exc.details()}"  # type: ignore[attr-defined]


@pytest.mark.parametrize("target", (PUBLIC, OUTBOUND), ids=str)
def test_thousand_connections_that_never_handshake(mesh: Mesh, target: Target) -> None:
    """1,000 TCP connections that never send a byte: the public port drops unfinished handshakes past
    --max-pending-handshakes (default 256), the caller's outbound listener refuses past its
    --max-connections 512; either way the sidecar stays small and keeps serving."""
    assert connection_count_fits(1000)
    port = mesh.sidecars["echo-1"].public if target is PUBLIC else mesh.web_local
    with mesh.watch(target) as w:
        socks = open_sockets(port, 1000)
        time.sleep(HOLD)
        if target is PUBLIC:
            failed = fresh_mtls_call(mesh)
            w.expect(not failed, "a fresh mTLS call to succeed while the connections are held", failed)
        w.notes.append(f"{len(socks)} connections opened, {still_open(socks)} still open")
        close_all(socks)
    w.verify(counted=REFUSED)


def test_two_thousand_half_open_tls(mesh: Mesh) -> None:
    """2,000 connections that send a ClientHello and stop; a fresh mTLS call must still succeed."""
    assert connection_count_fits(2000)
    with mesh.watch(PUBLIC) as w:
        socks = open_sockets(mesh.sidecars["echo-1"].public, 2000, seconds=15, first_bytes=client_hello(mesh))
        time.sleep(HOLD)
        failed = fresh_mtls_call(mesh)
        w.expect(not failed, "a fresh mTLS call to succeed while 2,000 handshakes are half open", failed)
        w.notes.append(f"{len(socks)} half-open, {still_open(socks)} still open")
        close_all(socks)
    w.verify(counted=REFUSED)


@pytest.mark.parametrize("target", (PASSTHROUGH, L7), ids=str)
def test_five_hundred_idle_allowed_connections(mesh: Mesh, target: Target) -> None:
    """500 allowed mTLS connections that finish their handshake, send the HTTP/2 preface and stay idle:
    together they must cost the sidecar under 64 MB (issue 9: 1,000 idle ones under 50 MB)."""
    assert connection_count_fits(500)
    with mesh.watch(target) as w:
        peers: list[Peer] = []
        deadline = time.monotonic() + 20
        while len(peers) < 500 and time.monotonic() < deadline:
            try:
                peer = Peer(mesh.connect(target, rcvbuf=4096, timeout=5))
            except OSError:
                continue
            peer.send(PREFACE + settings())
            peers.append(peer)
        time.sleep(HOLD)
        w.notes.append(f"{len(peers)} idle connections")
        w.expect(len(peers) >= 450, "at least 450 of the 500 allowed connections accepted", f"{len(peers)}")
        for p in peers:
            p.close()
    w.verify()


def test_plaintext_client_on_public_port_refused(mesh: Mesh) -> None:
    """An HTTP/2 client without TLS on the public port: closed, counted as a TLS handshake error."""
    with mesh.watch(PUBLIC) as w:
        peer = Peer(socket.create_connection(("127.0.0.1", mesh.sidecars["echo-1"].public), timeout=5))
        peer.send(PREFACE + settings())
        peer.pump(5.0)
        w.expect(peer.closed and not peer.got_settings, "the connection closed without an HTTP/2 answer",
                 peer.describe())
        peer.close()
    w.verify(counted=TLS_ERRORS)
