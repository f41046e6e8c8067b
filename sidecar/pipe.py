"""Byte pipes: two asyncio transports spliced together, and the sweeper of a listener's idle pipes.

:class:`Pipe` joins two asyncio transports with a pair of :class:`_Half` protocols. Each half is a
``BufferedProtocol``; all halves of the process read into one shared buffer (reads are synchronous:
each chunk is written on before the next read), so an idle or half-open connection holds no read
buffer at all. When the other side's transport still holds unsent data after ``write()`` (it may
keep a view of the buffer), the shared buffer is replaced by a fresh one; while a transport is
already backlogged, chunks are handed to it as copies instead, so that a slow reader pins at most
one buffer. Back-pressure: when one side's write buffer is full, the other side stops reading.
Half-close (EOF) is passed on where the transport supports it.

A pipe of a pass-through HTTP/2 connection carries an :class:`sidecar.h2guard.H2Guard`: both halves
feed it their bytes before writing them on; a violation sends the client GOAWAY and closes both sides.

A half can be created before its peer exists (for example the TLS side of an inbound connection,
which may receive bytes before the app connection is up): it keeps what arrives, pauses reading,
and flushes when :meth:`Pipe.start` is called once :meth:`Pipe.connect_b` has wired the peer. The side
that connects is wired *before* the connection is made, because an HTTP/2 server speaks first.

:class:`IdleSweeper` closes a listener's idle pipes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

from sidecar.connlimits import IdleTracker
from sidecar.h2guard import INTERNAL_ERROR, NO_ERROR, H2Guard, Violation, goaway
from sidecar.telemetry import Telemetry

BUF = 256 * 1024


class _SharedBuffer:
    """The read buffer of every pipe half in the process; replaced when a transport keeps a view of it."""

    __slots__ = ("buf", "view")

    def __init__(self) -> None:
        self.buf = bytearray(BUF)
        self.view = memoryview(self.buf)

    def renew(self) -> None:
        self.buf = bytearray(BUF)
        self.view = memoryview(self.buf)


_PIPE_BUFFER = _SharedBuffer()


def peer_of(transport: Any) -> str:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return f"{peer[0]}:{peer[1]}" if peer else ""


class _Half(asyncio.BufferedProtocol):
    """One side of a pipe: reads from its transport, writes to its peer's."""

    __slots__ = ("_eof", "_pending", "bytes_in", "closed", "guard", "guards_client", "peer", "pipe", "transport")

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe
        self.transport: Any = None
        self.peer: _Half | None = None
        self._pending: list[bytes] = []
        self._eof = False
        self.bytes_in = 0
        self.closed = False
        self.guard: H2Guard | None = None
        self.guards_client = False  # this half reads the client (side a of a pass-through pipe)

    # -- asyncio protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.pipe._made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _PIPE_BUFFER.view

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_in += nbytes
        data = _PIPE_BUFFER.view[:nbytes]
        guard = self.guard
        if guard is not None and self._inspect(guard, data):
            return
        self._forward(data)

    def _forward(self, data: memoryview) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self._pending.append(bytes(data))
            if self.transport is not None:
                self.transport.pause_reading()
            return
        t = peer.transport
        if t.get_write_buffer_size():
            # already backlogged: this chunk will wait too; a copy pins no shared buffer
            t.write(bytes(data))
            return
        t.write(data)
        if t.get_write_buffer_size():
            # the transport kept a view of the shared buffer: never overwrite it
            _PIPE_BUFFER.renew()

    def _inspect(self, guard: H2Guard, data: memoryview) -> bool:
        """Feed the guard; True when the chunk was handled here (refused, or written in pieces)."""
        try:
            if self.guards_client:
                violation = guard.feed_client(data)
                if violation is None:
                    return False
                self.pipe.refuse(violation)
                return True
            insert = guard.feed_server(data)
        except Exception as exc:  # a bug in the guard ends this connection only, counted and logged
            self.pipe.refuse(Violation("guard_error", INTERNAL_ERROR, f"the guard failed: {exc!r}"[:200]))
            return True
        if insert is None:
            return False
        at, extra = insert
        self._forward(data[:at])
        self._forward(memoryview(extra))
        self._forward(data[at:])
        return True

    def eof_received(self) -> bool | None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self._eof = True
            return True
        t = peer.transport
        try:
            if t.can_write_eof():
                t.write_eof()
                return True
        except (OSError, RuntimeError, NotImplementedError):
            pass
        t.close()
        return False

    def pause_writing(self) -> None:
        self._peer_reading(pause=True)

    def resume_writing(self) -> None:
        self._peer_reading(pause=False)

    def _peer_reading(self, *, pause: bool) -> None:
        """Back-pressure: the other side stops (or resumes) reading while this side's writes are backed up."""
        peer = self.peer
        if peer is not None and peer.transport is not None:
            try:
                if pause:
                    peer.transport.pause_reading()
                else:
                    peer.transport.resume_reading()
            except (AttributeError, RuntimeError):  # a transport without reading control, or one closing
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            peer.transport.close()
        self.pipe._lost()

    # -- wiring --------------------------------------------------------------------------------
    def flush(self) -> None:
        """Send what arrived before the peer was there, then read on."""
        peer = self.peer
        assert peer is not None and peer.transport is not None
        for chunk in self._pending:
            peer.transport.write(chunk)
        self._pending.clear()
        if self._eof:
            self.eof_received()
        elif self.transport is not None and not self.closed:
            self.transport.resume_reading()


class Pipe:
    """Two halves joined (``a`` accepted, ``b`` dialled); ``on_close`` runs once when both are gone."""

    def __init__(self, on_made: Callable[[Pipe], None] | None = None,
                 on_close: Callable[[Pipe], None] | None = None) -> None:
        self.a = _Half(self)
        self.b = _Half(self)
        self.a.peer = self.b
        self.b.peer = self.a
        self._on_made = on_made
        self._on_close = on_close
        self._closed = False
        self.started = time.monotonic()
        self.info: dict[str, Any] = {}
        self.guard: H2Guard | None = None
        self.violation: Violation | None = None
        self._on_violation: Callable[[Pipe, Violation], None] | None = None

    def watch(self, guard: H2Guard, on_violation: Callable[[Pipe, Violation], None]) -> None:
        """Check the HTTP/2 frames of both directions with ``guard`` (side a is the client)."""
        self.guard = guard
        self._on_violation = on_violation
        self.a.guard = guard
        self.a.guards_client = True
        self.b.guard = guard

    def refuse(self, violation: Violation) -> None:
        """The client broke a frame-level limit: GOAWAY to it (between two frames of the app), close both sides."""
        if self.violation is not None:
            return
        self.violation = violation
        guard = self.guard
        a = self.a.transport
        if guard is not None and a is not None and not self.a.closed and guard.server_at_frame_boundary():
            a.write(goaway(guard.last_client_stream, violation.code))
        if self._on_violation is not None:
            self._on_violation(self, violation)
        self.close()

    @property
    def busy(self) -> bool:
        """An HTTP/2 stream is open on this connection (as far as its guard knows)."""
        return self.guard is not None and self.guard.open_streams > 0

    def close_idle(self) -> None:
        """Close an idle connection; an HTTP/2 client is told with GOAWAY NO_ERROR first."""
        guard = self.guard
        a = self.a.transport
        if guard is not None and a is not None and not self.a.closed and guard.server_at_frame_boundary():
            a.write(goaway(guard.last_client_stream, NO_ERROR))
        self.close()

    def _made(self, half: _Half) -> None:
        if half is self.a and self._on_made is not None:
            self._on_made(self)

    def _lost(self) -> None:
        if self._closed:
            return
        if all(h.closed or h.transport is None for h in (self.a, self.b)):
            self._closed = True
            if self._on_close is not None:
                self._on_close(self)

    @property
    def is_closed(self) -> bool:
        return self._closed

    def close(self, *, abort: bool = False) -> None:
        for half in (self.a, self.b):
            if half.transport is not None and not half.closed:
                if abort:
                    half.transport.abort()
                else:
                    half.transport.close()
        if self.a.transport is None or self.b.transport is None:
            # a side that never opened will not report connection_lost
            self._lost_soon()

    def _lost_soon(self) -> None:
        self.a.closed = self.a.closed or self.a.transport is None
        self.b.closed = self.b.closed or self.b.transport is None
        self._lost()

    async def connect_b(self, host: str, port: int, *, timeout: float = 10.0) -> Any:
        """Open side b (wired to side a first), in plain TCP; ``sidecar.tls_conn.connect_b_tls`` opens it
        over TLS.

        Call :meth:`start` afterwards to flush what side a received meanwhile. Raises what the connection
        failed with (``TimeoutError`` past ``timeout``).
        """
        loop = asyncio.get_running_loop()
        transport, _ = await asyncio.wait_for(loop.create_connection(lambda: self.b, host, port), timeout)
        return self.b_connected(transport)

    def b_connected(self, transport: Any) -> Any:
        """Side b's transport is up: returned, unless side a went away meanwhile (then it is closed)."""
        if self.a.closed:
            transport.close()
            raise ConnectionResetError("the client went away while connecting")
        return transport

    def start(self) -> None:
        """Both sides are up: flush what side a received while side b was being opened."""
        self.a.flush()

class IdleSweeper:
    """Closes the pipes of a listener that moved no byte (and have no open HTTP/2 stream) for the idle timeout.

    One task per listener sweeps every :attr:`sidecar.connlimits.IdleTracker.period`; the data path
    pays nothing. Each close is counted in ``weft_connections_refused_total{reason="idle_timeout"}``.
    """

    def __init__(self, listener: str, timeout: float, pipes: Callable[[], Iterable[Pipe]],
                 telemetry: Telemetry) -> None:
        self.listener = listener
        self._tracker: IdleTracker[Pipe] | None = IdleTracker(timeout) if timeout > 0 else None
        self._pipes = pipes
        self.telemetry = telemetry
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._tracker is not None and self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        tracker = self._tracker
        assert tracker is not None
        while True:
            await asyncio.sleep(tracker.period)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> int:
        tracker = self._tracker
        if tracker is None:
            return 0
        idle = tracker.sweep(now, ((p, p.a.bytes_in + p.b.bytes_in, p.busy) for p in self._pipes() if not p.is_closed))
        for pipe in idle:
            self.telemetry.connection_refused("idle_timeout")
            self.telemetry.peer_log.warning(now, "connection_refused", reason="idle_timeout", listener=self.listener,
                                            peer=peer_of(pipe.a.transport), seconds=tracker.timeout)
            pipe.close_idle()
        return len(idle)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
