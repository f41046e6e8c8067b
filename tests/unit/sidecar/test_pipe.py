"""Pipe halves with fake transports (no sockets): the shared read buffer, the guard's hooks, refusal with GOAWAY."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events

from sidecar import pipe as pipe_module
from sidecar import tls_conn
from sidecar.h2guard import H2Guard, Violation
from sidecar.limits import Limits
from sidecar.pipe import Pipe


class FakeTransport:
    def __init__(self, *, backlog: int = 0) -> None:
        self.written: list[Any] = []
        self.backlog = backlog  # what get_write_buffer_size reports after a write
        self.paused = False
        self.closed = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.written.append(data)

    def data(self) -> bytes:
        return b"".join(bytes(d) for d in self.written)

    def get_write_buffer_size(self) -> int:
        return self.backlog if self.written else 0

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def feed(half: Any, data: bytes) -> None:
    buf = half.get_buffer(len(data))
    buf[:len(data)] = data
    half.buffer_updated(len(data))


def wired() -> tuple[Pipe, FakeTransport, FakeTransport]:
    pipe = Pipe()
    a, b = FakeTransport(), FakeTransport()
    pipe.a.connection_made(a)  # type: ignore[arg-type]
    pipe.b.connection_made(b)  # type: ignore[arg-type]
    return pipe, a, b


def test_idle_halves_hold_no_buffer_and_share_one() -> None:
    one, two = Pipe(), Pipe()
    assert one.a.get_buffer(-1).obj is two.b.get_buffer(-1).obj
    assert not hasattr(one.a, "__dict__")  # slots only: no per-connection buffer anywhere


def test_bytes_before_the_peer_is_up_are_kept_then_flushed() -> None:
    pipe = Pipe()
    a = FakeTransport()
    pipe.a.connection_made(a)  # type: ignore[arg-type]
    feed(pipe.a, b"early")
    assert a.paused
    b = FakeTransport()
    pipe.b.connection_made(b)  # type: ignore[arg-type]
    pipe.start()
    assert b.data() == b"early" and not a.paused


def test_a_transport_that_keeps_a_view_gets_the_buffer_and_a_backlogged_one_gets_copies() -> None:
    pipe, _, b = wired()
    b.backlog = 10
    before = pipe_module._PIPE_BUFFER.buf
    feed(pipe.a, b"first")
    assert pipe_module._PIPE_BUFFER.buf is not before  # the written view may be held: a fresh shared buffer
    assert isinstance(b.written[0], memoryview) and bytes(b.written[0]) == b"first"
    feed(pipe.a, b"second")
    assert isinstance(b.written[1], bytes) and b.written[1] == b"second"  # already backlogged: a copy


def test_a_guarded_pipe_refuses_with_goaway_and_closes_both_sides() -> None:
    pipe, a, b = wired()
    violations: list[Violation] = []
    pipe.watch(H2Guard(Limits()), lambda p, v: violations.append(v))
    feed(pipe.a, b"GET / HTTP/1.1\r\n\r\n")
    assert violations and violations[0].reason == "preface"
    assert b.written == []  # nothing reached the app
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    events = client.receive_data(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + a.data())
    assert any(isinstance(e, h2.events.ConnectionTerminated) and e.error_code == 1 for e in events)
    assert a.closed and b.closed
    feed(pipe.a, b"more")  # after the refusal nothing more is passed on or refused twice
    assert b.written == [] and len(violations) == 1


def test_the_apps_first_settings_reaches_the_client_with_the_stream_bound() -> None:
    pipe, a, b = wired()
    pipe.watch(H2Guard(Limits(h2_max_concurrent_streams=9)), lambda p, v: None)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    feed(pipe.a, client.data_to_send())
    server.receive_data(b.data())
    server.initiate_connection()
    feed(pipe.b, server.data_to_send())
    assert len(a.written) == 3  # before the insertion, our SETTINGS entry, after it
    client.receive_data(a.data())
    assert client.remote_settings.max_concurrent_streams == 9


def test_an_idle_guarded_pipe_gets_goaway_no_error() -> None:
    pipe, a, b = wired()
    pipe.watch(H2Guard(Limits()), lambda p, v: None)
    assert not pipe.busy
    pipe.close_idle()
    assert a.data()[3] == 7 and a.data()[-4:] == b"\0\0\0\0"  # GOAWAY, NO_ERROR
    assert a.closed and b.closed


def test_a_failing_guard_ends_its_connection_only() -> None:
    class Broken(H2Guard):
        def feed_client(self, data: memoryview) -> Violation | None:
            raise RuntimeError("bug")

    pipe, a, b = wired()
    violations: list[Violation] = []
    pipe.watch(Broken(Limits()), lambda p, v: violations.append(v))
    feed(pipe.a, b"PRI")
    assert violations[0].reason == "guard_error" and a.closed and b.closed and b.written == []
    other, _, other_b = wired()
    feed(other.a, b"fine")
    assert other_b.data() == b"fine"


def _tls_conn(admission: tls_conn.TlsAdmission, failures: list[BaseException]) -> tls_conn.TlsServerConnection:
    import ssl

    conn = tls_conn.TlsServerConnection(Pipe(), lambda: ssl.create_default_context(ssl.Purpose.CLIENT_AUTH),
                                         lambda c: None, lambda c, exc: failures.append(exc), admission=admission)
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    return conn


async def test_admission_caps_connections_and_evicts_the_oldest_handshake() -> None:
    from sidecar.telemetry import Telemetry

    telemetry = Telemetry()
    admission = tls_conn.TlsAdmission("public", Limits(max_connections=3, max_pending_handshakes=2), telemetry)
    failures: list[BaseException] = []
    first, second, third = (_tls_conn(admission, failures) for _ in range(3))
    assert first.raw.aborted and first.closed  # the oldest unfinished handshake was dropped
    assert not second.raw.aborted and not third.raw.aborted
    assert telemetry.registry.get_sample_value("weft_connections_refused_total",
                                               {"reason": "pending_handshakes"}) == 1.0
    fourth = _tls_conn(admission, failures)  # the gate: three are open (the dropped one until it is lost)
    assert fourth.raw.aborted and admission.gate.open == 3
    first.connection_lost(None)
    assert admission.gate.open == 2 and len(admission.pending) == 2
    # a handshake that does not finish in time is dropped and counted, TLS state freed
    second._handshake_timeout()
    assert second.raw.aborted and second.sslobj is None and isinstance(failures[-1], TimeoutError)
    assert telemetry.registry.get_sample_value("weft_connections_refused_total",
                                               {"reason": "handshake_timeout"}) == 1.0
    assert len(admission.pending) == 1
    for conn in (second, third, fourth):
        conn.connection_lost(None)
    assert admission.gate.open == 0 and len(admission.pending) == 0
