"""Flow-control and size attacks of issue 9 that play out over calls: the zero-window window leak, a
slow reader of a large streamed response, and oversized metadata (with metadata under the limit as
the control that must keep passing)."""

from __future__ import annotations

import socket
import struct
import time

import grpc
import pytest

from tests.abuse.attacker import INITIAL_WINDOW_SIZE, MAX_WINDOW, Peer, window_update
from tests.abuse.mesh import H2_ERRORS, L7, OUTBOUND, PASSTHROUGH, SERVER_STREAM, UNARY, Mesh, Target
from tests.apps.echo import echo_pb2, echo_pb2_grpc

pytestmark = [pytest.mark.abuse, pytest.mark.integration]

AUTHORITY = "echo"
OK, RESOURCE_EXHAUSTED = 0, 8


def open_peer(mesh: Mesh, target: Target, *pairs: tuple[int, int], rcvbuf: int | None = None,
              credit: bool = True) -> Peer:
    peer = Peer(mesh.connect(target, rcvbuf=rcvbuf), credit=credit)
    assert peer.start(*pairs), f"no SETTINGS from the {target} target: {peer.describe()}"
    return peer


def large_calls(mesh: Mesh, target: Target, count: int, size: int) -> list[str]:
    """``count`` calls answered with ``size`` bytes each, on fresh channels of the kind the target's
    other callers use; the failures (it stops at the first: one stalled call shows the leak)."""
    failures: list[str] = []
    for name, ch in mesh.victim_channels(target):
        with ch:
            stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
            for _ in range(count):
                try:
                    stub.Unary(echo_pb2.EchoRequest(text="after", response_size=size), timeout=5)
                except grpc.RpcError as exc:
                    failures.append(f"{name}: {exc.code()}: {exc.details()}")  # type: ignore[attr-defined]
                    return failures
    return failures


@pytest.mark.parametrize("target", (OUTBOUND, PASSTHROUGH, L7), ids=str)
def test_zero_window_large_responses_then_disconnect(mesh: Mesh, target: Target) -> None:
    """A client with a zero stream window asks for 20 responses of 1 MiB (more than a connection window)
    and disconnects: what the sidecar queued for it must be credited back to the shared upstream
    connection, or every later call between the two services stalls."""
    with mesh.watch(target) as w:
        peer = open_peer(mesh, target, (INITIAL_WINDOW_SIZE, 0), credit=False)
        body = echo_pb2.EchoRequest(response_size=1 << 20).SerializeToString()
        for n in range(20):
            peer.request(1 + 2 * n, UNARY, AUTHORITY, body=body)
        peer.pump(2.0)  # the responses come as far as the windows let them
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()   # abrupt: RST
        time.sleep(0.3)
        failures = large_calls(mesh, target, 10, 256 * 1024)
        w.expect(not failures, "later calls with 256 KiB answers between the same services to succeed",
                 f"{failures[:1]}")
    w.verify()


@pytest.mark.parametrize("target", (OUTBOUND, L7), ids=str)
def test_slow_reader_of_a_large_stream(mesh: Mesh, target: Target) -> None:
    """A client that grants huge HTTP/2 windows but reads its socket slowly asks for a 100 MiB server
    stream: the sidecar must push back (stop reading upstream), not buffer it (RSS under 64 MB)."""
    with mesh.watch(target) as w:
        peer = open_peer(mesh, target, (INITIAL_WINDOW_SIZE, MAX_WINDOW), rcvbuf=16384, credit=False)
        peer.send(window_update(0, MAX_WINDOW - 65535))
        body = echo_pb2.EchoRequest(response_size=1 << 20).SerializeToString()
        peer.request(1, SERVER_STREAM, AUTHORITY, body=body, extra=(("x-echo-count", "100"),))
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline and not peer.closed:
            peer.pump(0.01, max_bytes=16384)
            time.sleep(0.25)
        w.notes.append(f"read {peer.bytes_read} B slowly")
        peer.close()
    w.verify()


@pytest.mark.parametrize("target", (OUTBOUND, L7), ids=str)
def test_oversized_metadata(mesh: Mesh, target: Target) -> None:
    """100 KiB of metadata (over the 64 KiB header list limit): that call ends with RESOURCE_EXHAUSTED
    (or HTTP 431), the connection is kept (a next call on it succeeds), and the refusal is counted."""
    with mesh.watch(target) as w:
        peer = open_peer(mesh, target)
        body = echo_pb2.EchoRequest(text="big").SerializeToString()
        peer.request(1, UNARY, AUTHORITY, body=body, extra=(("x-big", "m" * 100_000),))
        peer.pump(5.0, until=lambda: peer.answered(1))
        status, http = peer.grpc_status(1), peer.http_status(1)
        w.expect(status == RESOURCE_EXHAUSTED or http == "431", "RESOURCE_EXHAUSTED (or 431) for the call",
                 f"grpc-status {status}, :status {http}; {peer.describe()}")
        peer.request(3, UNARY, AUTHORITY, body=body)
        peer.pump(5.0, until=lambda: peer.answered(3))
        w.expect(peer.grpc_status(3) == OK, "the connection kept: the next call on it succeeds",
                 f"grpc-status {peer.grpc_status(3)}; {peer.describe()}")
        peer.close()
    w.verify(counted=H2_ERRORS)


@pytest.mark.parametrize("target", (OUTBOUND, L7), ids=str)
def test_metadata_under_the_limit_passes(mesh: Mesh, target: Target) -> None:
    """The control: metadata under every limit, sent as HEADERS + CONTINUATION fragments of 2 KiB, is
    proxied unchanged. (7,000 bytes: the echo app itself, grpc with its default 8 KiB metadata limit,
    refuses more; 20 KB passes a sidecar only towards an app configured for it.)"""
    with mesh.watch(target) as w:
        peer = open_peer(mesh, target)
        body = echo_pb2.EchoRequest(text="md").SerializeToString()
        peer.request(1, UNARY, AUTHORITY, body=body, extra=(("x-md", "m" * 7000),), fragment=2048)
        peer.pump(5.0, until=lambda: peer.answered(1))
        echoed = [v for block in peer.streams[1].headers for k, v in block if k == "x-md"]
        w.expect(peer.grpc_status(1) == OK and echoed == ["m" * 7000], "the call OK with its metadata echoed",
                 f"grpc-status {peer.grpc_status(1)}, echoed {[len(v) for v in echoed]}; {peer.describe()}")
        peer.close()
    w.verify()
