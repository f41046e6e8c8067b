"""Byte pipes: splicing two transports together, server-side TLS for the public port, the outbound TCP listener.

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

:class:`TlsServerConnection` does the public port's TLS itself over memory BIOs (uvloop's
``start_tls`` does not complete server-side handshakes on accepted connections): one context per
connection from the current snapshot, the exact handshake error for metrics, the peer certificate
before any byte reaches the app, and decrypted records batched into one write to the other side.
:class:`TlsClientConnection` is the same for the TCP outbound listener's dial to an upstream (an
idle connection costs less than with the loop's TLS transport).

:class:`TlsAdmission` is a TLS listener's admission (connection cap, bounded unfinished handshakes,
handshake timeout) and :class:`IdleSweeper` closes a listener's idle pipes.

:class:`OutboundTcp` is the local listener of a TCP upstream.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import structlog

from sidecar.connlimits import IdleTracker, PendingHandshakes
from sidecar.gate import ListenerGate
from sidecar.h2guard import INTERNAL_ERROR, NO_ERROR, H2Guard, Violation, goaway
from sidecar.limits import Limits
from sidecar.telemetry import Telemetry

if TYPE_CHECKING:
    from sidecar.seams import Direction, UpstreamPool

_BUF = 256 * 1024
log = structlog.get_logger("weft.sidecar.tcp")


class _SharedBuffer:
    """The read buffer of every pipe half in the process; replaced when a transport keeps a view of it."""

    __slots__ = ("buf", "view")

    def __init__(self) -> None:
        self.buf = bytearray(_BUF)
        self.view = memoryview(self.buf)

    def renew(self) -> None:
        self.buf = bytearray(_BUF)
        self.view = memoryview(self.buf)


_PIPE_BUFFER = _SharedBuffer()
# ciphertext reads of the public port: copied into the connection's BIO at once, so one buffer serves all
_TLS_READ = memoryview(bytearray(_BUF))
# Plaintext of TLS connections that feed a plain asyncio.Protocol (the h2 engine's upstream connections) is
# decrypted here, then copied out in one ``data_received`` call: 64 KiB holds four full TLS records (16 KiB
# each), so a burst is parsed in few calls, and being one buffer per process (not 256 KiB per connection,
# as the loop's SSL transport allocates) it bounds what a peer makes us hold to the record being decrypted.
TLS_PLAIN_READ = 64 * 1024
_PLAIN_READ = memoryview(bytearray(TLS_PLAIN_READ))


def _peer_of(transport: Any) -> str:
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
        peer = self.peer
        if peer is not None and peer.transport is not None:
            try:
                peer.transport.pause_reading()
            except (AttributeError, RuntimeError):
                pass

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            try:
                peer.transport.resume_reading()
            except (AttributeError, RuntimeError):
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

    async def connect_b(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                        server_hostname: str | None = None, timeout: float = 10.0) -> Any:
        """Open side b (wired to side a first); with ``ssl_context`` over TLS (:class:`TlsClientConnection`).

        Call :meth:`start` afterwards to flush what side a received meanwhile. Raises what the connection
        or the handshake failed with (``TimeoutError`` past ``timeout`` for each).
        """
        loop = asyncio.get_running_loop()
        transport: Any
        if ssl_context is None:
            transport, _ = await asyncio.wait_for(loop.create_connection(lambda: self.b, host, port), timeout)
        else:
            hostname = server_hostname or host
            _, tls = await asyncio.wait_for(
                loop.create_connection(lambda: TlsClientConnection(self, ssl_context, hostname, timeout), host, port),
                timeout)
            try:
                await tls.ready  # resolved by the handshake, its failure, its timeout or the connection's loss
            except BaseException:
                tls.drop()
                raise
            transport = tls.writer
        if self.a.closed:
            transport.close()
            raise ConnectionResetError("the client went away while connecting")
        return transport

    def start(self) -> None:
        """Both sides are up: flush what side a received while side b was being opened."""
        self.a.flush()

class OutboundTcp:
    """The local listener of a TCP upstream: each connection goes to a picked endpoint over mTLS.

    Bounded like the public port: at most ``max_connections`` open (the excess aborted at accept),
    the dial's TLS handshake within ``handshake_timeout``, and a connection that moves no byte for
    ``idle_timeout`` closed.
    """

    def __init__(self, outbound: Direction, pool: UpstreamPool) -> None:
        self._out = outbound
        self._pool = pool
        self._server: asyncio.AbstractServer | None = None
        self._pipes: set[Pipe] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        limits: Limits = outbound.limits
        listener = f"outbound:{pool.name}"
        self._gate = ListenerGate(listener, limits.max_connections, outbound.telemetry)
        self._idle = IdleSweeper(listener, limits.idle_timeout, lambda: self._pipes, outbound.telemetry)
        self._dial_timeout = limits.handshake_timeout

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, host, port, reuse_address=True, backlog=1024)
        self._idle.start()

    def _accept(self) -> asyncio.BaseProtocol:
        pipe = Pipe(on_made=self._made, on_close=self._closed)
        return pipe.a

    def _made(self, pipe: Pipe) -> None:
        if not self._gate.admit(pipe.a.transport):
            pipe.info["refused"] = True
            return
        self._pipes.add(pipe)
        task = asyncio.ensure_future(self._dial(pipe))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dial(self, pipe: Pipe) -> None:
        from sidecar.tls import PeerIdentityError, check_server_identity, expected_server_name, tls_error_reason

        pool = self._pool
        out = self._out
        tried = ""
        for _attempt in range(2):
            if out.draining:
                break
            key = pool.pick(exclude=tried)
            if key is None or key == tried:
                break
            tried = key
            snap = out.snapshot()
            ep = pool.endpoints.get(key)
            if ep is None:
                continue
            creds = snap.credentials
            t0 = time.perf_counter()
            try:
                transport = await pipe.connect_b(
                    ep.address, ep.port, ssl_context=out.tls.client(creds, "tcp"),
                    server_hostname=expected_server_name(pool.name, creds.trust_domain), timeout=self._dial_timeout)
                sslobj = transport.get_extra_info("ssl_object")
                check_server_identity(sslobj.getpeercert(binary_form=True) if sslobj else None, pool.name,
                                      creds.trust_domain)
            except PeerIdentityError as exc:
                pool.observe(key, False, time.perf_counter() - t0)
                out.telemetry.tls_errors.labels("outbound", exc.reason).inc()
                log.warning("upstream_identity_refused", upstream=pool.name, endpoint=key, error=str(exc))
                break
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                pool.observe(key, False, time.perf_counter() - t0)
                if isinstance(exc, ssl.SSLError):
                    out.telemetry.tls_errors.labels("outbound", tls_error_reason(exc)).inc()
                log.warning("upstream_connect_failed", upstream=pool.name, endpoint=key, error=str(exc)[:200])
                if pipe.b.transport is not None:
                    pipe.b.transport.abort()
                    pipe.b.transport = None
                    pipe.b.closed = False
                if pipe.a.closed:
                    return
                continue
            pool.observe(key, True, time.perf_counter() - t0)
            pipe.info["endpoint"] = key
            pipe.start()
            return
        pipe.close(abort=True)

    def _closed(self, pipe: Pipe) -> None:
        if pipe.info.get("refused"):
            return
        self._pipes.discard(pipe)
        self._gate.release()
        key = pipe.info.get("endpoint")
        snap = self._out.snapshot()
        status = "closed" if key is not None else "connect_failed"
        self._out.telemetry.request("outbound", snap.registration.service, self._pool.name, "tcp", status,
                                    time.monotonic() - pipe.started)

    async def close(self, grace: float = 5.0) -> None:
        if self._server is not None:
            self._server.close()
        self._idle.stop()
        deadline = time.monotonic() + grace
        while self._pipes and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for pipe in list(self._pipes):
            pipe.close(abort=True)
        for task in list(self._tasks):
            task.cancel()


class _TlsWriter:
    """The transport a pipe half writes to on the TLS side: encrypts into the raw transport."""

    __slots__ = ("_conn",)

    def __init__(self, conn: TlsConnection) -> None:
        self._conn = conn

    def write(self, data: Any) -> None:
        conn = self._conn
        if conn.closed:
            return
        conn.sslobj.write(data)
        conn.flush()

    def get_write_buffer_size(self) -> int:
        return 0  # the plaintext was encrypted into a new buffer: the caller's is not held

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._conn.raw.set_write_buffer_limits(high=high, low=low)  # ciphertext: the plaintext plus a few %

    def pause_reading(self) -> None:
        self._conn.raw.pause_reading()

    def resume_reading(self) -> None:
        if not self._conn.closed:
            self._conn.raw.resume_reading()

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._conn.close()

    def abort(self) -> None:
        self._conn.raw.abort()

    def is_closing(self) -> bool:
        return self._conn.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._conn.sslobj
        return self._conn.raw.get_extra_info(name, default)


class TlsAdmission:
    """A TLS listener's admission: the connection cap, the bound on unfinished handshakes, the handshake timeout.

    A connection past ``max_connections`` is aborted at accept (``sidecar.gate``). Every admitted
    connection is pending until its handshake ends; past ``max_pending_handshakes`` the oldest
    pending one is dropped. A handshake not finished within ``handshake_timeout`` is dropped too.
    Each drop is counted in ``weft_connections_refused_total{reason}`` and logged at a bounded rate.
    """

    def __init__(self, listener: str, limits: Limits, telemetry: Telemetry) -> None:
        self.listener = listener
        self.telemetry = telemetry
        self.gate = ListenerGate(listener, limits.max_connections, telemetry)
        self.pending: PendingHandshakes[TlsConnection] = PendingHandshakes(limits.max_pending_handshakes)
        self.handshake_timeout = limits.handshake_timeout

    def admit(self, conn: TlsConnection) -> bool:
        if not self.gate.admit(conn.raw):
            return False
        oldest = self.pending.add(conn)
        if oldest is not None:
            self.refused(oldest, "pending_handshakes")
            oldest.drop()
        return True

    def handshake_over(self, conn: TlsConnection) -> None:
        self.pending.done(conn)

    def closed(self, conn: TlsConnection) -> None:
        self.pending.done(conn)
        self.gate.release()

    def refused(self, conn: TlsConnection, reason: str) -> None:
        self.telemetry.connection_refused(reason)
        self.telemetry.peer_log.warning(time.monotonic(), "connection_refused", reason=reason, listener=self.listener,
                                        peer=_peer_of(conn.raw))


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
                                            peer=_peer_of(pipe.a.transport), seconds=tracker.timeout)
            pipe.close_idle()
        return len(idle)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


LINGER = 2.0  # seconds a closed TLS connection keeps reading (and discarding) so its last bytes arrive


class _TlsStreamWriter(_TlsWriter):
    """The writer handed to a protocol that watches the write buffer for its back-pressure (an h2 ``Conn``)."""

    __slots__ = ()

    def get_write_buffer_size(self) -> int:
        return 0 if self._conn.closed else int(self._conn.raw.get_write_buffer_size())


class TlsConnection(asyncio.BufferedProtocol):
    """TLS over memory BIOs on a raw connection, feeding one half of a :class:`Pipe` or a protocol (subclasses).

    Reads go through one buffer shared by all connections, nothing is allocated for TLS before it is
    needed, and the TLS state is freed as soon as the connection is dropped or lost.
    """

    server_side = True

    def __init__(self, half: Any, context: Callable[[], ssl.SSLContext],
                 on_handshake: Callable[[Any], None], on_failure: Callable[[Any, BaseException], None],
                 handshake_timeout: float = 10.0, admission: TlsAdmission | None = None,
                 server_hostname: str | None = None) -> None:
        self.half = half
        self._context = context
        self._on_handshake = on_handshake
        self._on_failure = on_failure
        self._timeout = admission.handshake_timeout if admission is not None else handshake_timeout
        self._admission = admission
        self._admitted = False
        self._server_hostname = server_hostname
        self.raw: Any = None
        self.sslobj: Any = None
        self._in: ssl.MemoryBIO | None = None
        self._out: ssl.MemoryBIO | None = None
        self.handshaken = False
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        self.writer = _TlsWriter(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport
        if self._admission is not None:
            if not self._admission.admit(self):
                self.closed = True  # aborted at accept
                return
            self._admitted = True
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._handshake_timeout)

    def _start_tls(self) -> bool:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        try:
            self.sslobj = self._context().wrap_bio(self._in, self._out, server_side=self.server_side,
                                                   server_hostname=self._server_hostname)
        except (ssl.SSLError, OSError, ValueError) as exc:
            self._fail(exc)
            return False
        return True

    def _handshake_timeout(self) -> None:
        if not self.handshaken and not self.closed:
            if self._admission is not None:
                self._admission.refused(self, "handshake_timeout")
            self._fail(TimeoutError("TLS handshake timed out"))

    def drop(self) -> None:
        """Abort a connection still in its handshake (evicted by the admission; counted there)."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self.raw is not None:
            self.raw.abort()
        self._release()

    def _fail(self, exc: BaseException) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._admission is not None:
            self._admission.handshake_over(self)
        self._on_failure(self, exc)
        self.raw.abort()
        self._release()

    def _release(self) -> None:
        """Free the TLS state now: this object sits in reference cycles (pipe, writer) that only the cyclic
        GC breaks, and OpenSSL's tens of KB per connection are invisible to its thresholds."""
        self.sslobj = None
        self._in = None
        self._out = None

    def flush(self) -> None:
        assert self._out is not None
        data = self._out.read()
        if data:
            self.raw.write(data)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _TLS_READ

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        if self._in is None and not self._start_tls():
            return
        assert self._in is not None
        self._in.write(_TLS_READ[:nbytes])
        if not self.handshaken:
            self._handshake()
        else:
            self._read_plain()

    def _handshake(self) -> None:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self.flush()
            return
        except (ssl.SSLError, OSError, ValueError) as exc:
            try:
                self.flush()  # the alert, so the client learns why
            except Exception:
                pass
            self._fail(exc)
            return
        self.flush()
        self.handshaken = True
        if self._timer is not None:
            self._timer.cancel()
        if self._admission is not None:
            self._admission.handshake_over(self)
        self._attach()
        self._on_handshake(self)
        if not self.closed:
            self._read_plain()

    def _attach(self) -> None:
        """The handshake is done: the inner side writes through :attr:`writer` from now on."""
        self.half.transport = self.writer

    def _read_plain(self) -> None:
        """Decrypt everything available into the half's buffer, record after record, then pass it on once."""
        sslobj = self.sslobj
        while not self.closed:
            buf = self._plain_buffer()
            size = len(buf)
            total = 0
            eof = False
            while total < size:
                try:
                    n = sslobj.read(size - total, buf[total:])
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    eof = True
                    break
                except (ssl.SSLError, OSError) as exc:
                    log.info("tls_read_failed", error=str(exc)[:200])
                    self.raw.abort()
                    return
                if not n:  # no data raises SSLWantReadError: 0 is the peer's close_notify (ssl's clean EOF)
                    eof = True
                    break
                total += n
            self._deliver(buf, total, eof)
            if eof:
                self.close()
                break
            if total < size:
                break
        if self._out is not None and self._out.pending:
            self.flush()

    def _plain_buffer(self) -> memoryview:
        """Where the next decrypted bytes go: the half's own buffer (the pipe forwards from it)."""
        return self.half.get_buffer(-1)  # type: ignore[no-any-return]

    def _deliver(self, buf: memoryview, nbytes: int, eof: bool) -> None:
        """Pass ``nbytes`` decrypted bytes (and the peer's close_notify) on to the inner side."""
        if nbytes:
            self.half.buffer_updated(nbytes)
        if eof:
            self.half.eof_received()

    def eof_received(self) -> bool | None:
        if self.handshaken and not self.closed:
            self.half.eof_received()
        return False

    def pause_writing(self) -> None:
        self.half.pause_writing()

    def resume_writing(self) -> None:
        self.half.resume_writing()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.handshaken:
            try:
                self.sslobj.unwrap()
            except (ssl.SSLError, OSError, ValueError):
                pass
            try:
                self.flush()
            except (OSError, RuntimeError):
                pass
        self._linger()

    def _linger(self) -> None:
        """Close without losing what was just written (a GOAWAY, the close_notify).

        Closing a socket whose receive buffer still holds unread bytes (a peer flooding us) makes the
        kernel send RST, and the peer's kernel then discards what it had not read yet: the GOAWAY
        that says why. So the write side is shut (FIN after the buffered bytes), what still arrives is
        read and discarded (``closed`` is set), and the socket closes on the peer's EOF or after
        :data:`LINGER` seconds, whichever comes first.
        """
        raw = self.raw
        try:
            if raw.can_write_eof():
                raw.write_eof()
                asyncio.get_running_loop().call_later(LINGER, raw.close)
                return
        except (OSError, RuntimeError, NotImplementedError, AttributeError):
            pass
        raw.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._admitted and self._admission is not None:
            self._admitted = False
            self._admission.closed(self)
        self._release()
        if self.handshaken:
            self.half.connection_lost(exc)
        else:
            self._lost_in_handshake(exc)

    def _lost_in_handshake(self, exc: Exception | None) -> None:
        self.half.closed = True
        self.half.pipe._lost()


class TlsServerConnection(TlsConnection):
    """Server-side TLS of the public port, feeding side ``a`` of a :class:`Pipe`.

    Doing TLS here (rather than with the loop's ``start_tls``) gives this sidecar the context of the
    current snapshot for each connection, the exact handshake error for metrics, and the peer's
    certificate before any byte reaches the app. Nothing is allocated for TLS before the client's
    first byte.
    """

    def __init__(self, pipe: Pipe, context: Callable[[], ssl.SSLContext],
                 on_handshake: Callable[[TlsServerConnection], None],
                 on_failure: Callable[[TlsServerConnection, BaseException], None],
                 handshake_timeout: float = 10.0, admission: TlsAdmission | None = None) -> None:
        super().__init__(pipe.a, context, on_handshake, on_failure, handshake_timeout, admission)
        self.pipe = pipe


class TlsClient(TlsConnection):
    """Client-side TLS to an upstream over memory BIOs (see the subclasses for what it feeds).

    It costs an idle connection less than the loop's TLS transport (no 256 KiB read buffer of its own).
    :attr:`ready` resolves when the handshake is done (or fails with its error, a ``TimeoutError`` past
    the handshake timeout); before that the inner side is untouched, so a failed attempt can be retried.
    """

    server_side = False

    def __init__(self, inner: Any, context: ssl.SSLContext, server_hostname: str, timeout: float) -> None:
        super().__init__(inner, lambda: context, self._ready, self._failed, timeout, None, server_hostname)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._start_tls():
            self._handshake()  # the ClientHello

    def _ready(self, conn: TlsConnection) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def _failed(self, conn: TlsConnection, exc: BaseException) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)

    def _lost_in_handshake(self, exc: Exception | None) -> None:
        self._failed(self, exc or ConnectionResetError("the upstream closed the connection during the TLS handshake"))


class TlsClientConnection(TlsClient):
    """Client-side TLS feeding side ``b`` of a :class:`Pipe` (the TCP outbound listener's dial)."""

    def __init__(self, pipe: Pipe, context: ssl.SSLContext, server_hostname: str, timeout: float) -> None:
        super().__init__(pipe.b, context, server_hostname, timeout)


class TlsProtocolClient(TlsClient):
    """Client-side TLS feeding a plain ``asyncio.Protocol`` (the h2 engine's upstream connection, ``UpConn``).

    The protocol gets ``connection_made`` with a transport-like writer once the handshake is done (as
    with ``create_connection(ssl=...)``), its decrypted bytes through one buffer of the process
    (:data:`TLS_PLAIN_READ`), and ``connection_lost`` only if it was made. Its write buffer limits
    apply to the raw connection's ciphertext, so its back-pressure bounds stay what they were.
    """

    def __init__(self, inner: asyncio.Protocol, context: ssl.SSLContext, server_hostname: str,
                 timeout: float) -> None:
        super().__init__(inner, context, server_hostname, timeout)
        self.writer = _TlsStreamWriter(self)

    def _attach(self) -> None:
        self.half.connection_made(self.writer)

    def _plain_buffer(self) -> memoryview:
        return _PLAIN_READ

    def _deliver(self, buf: memoryview, nbytes: int, eof: bool) -> None:
        if nbytes:
            self.half.data_received(bytes(buf[:nbytes]))  # copied: the buffer is reused by the next read
