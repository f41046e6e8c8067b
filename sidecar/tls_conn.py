"""TLS connections on memory BIOs: the public port's server side, the upstream dials' client side.

:class:`TlsServerConnection` does the public port's TLS itself over memory BIOs (uvloop's
``start_tls`` does not complete server-side handshakes on accepted connections): one context per
connection from the current snapshot, the exact handshake error for metrics, the peer certificate
before any byte reaches the app, and decrypted records batched into one write to the other side of
its :class:`sidecar.pipe.Pipe`. :class:`TlsClientConnection` is the same for the TCP outbound
listener's dial to an upstream, and :class:`TlsProtocolClient` for the h2 proxy's upstream
connections, which feed an asyncio protocol instead of a pipe (an idle connection costs less than
with the loop's TLS transport, which holds a 256 KiB read buffer each).

:class:`TlsAdmission` is a TLS listener's admission (connection cap, bounded unfinished handshakes,
handshake timeout).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Any

import structlog

from sidecar.connlimits import PendingHandshakes
from sidecar.gate import ListenerGate
from sidecar.limits import Limits
from sidecar.pipe import BUF, Pipe, peer_of
from sidecar.telemetry import Telemetry

log = structlog.get_logger("weft.sidecar.tls")

# ciphertext reads of the public port: copied into the connection's BIO at once, so one buffer serves all
_TLS_READ = memoryview(bytearray(BUF))
# Plaintext of TLS connections that feed a plain asyncio.Protocol (the h2 engine's upstream connections) is
# decrypted here, then copied out in one ``data_received`` call: 64 KiB holds four full TLS records (16 KiB
# each), so a burst is parsed in few calls, and being one buffer per process (not 256 KiB per connection,
# as the loop's SSL transport allocates) it bounds what a peer makes us hold to the record being decrypted.
TLS_PLAIN_READ = 64 * 1024
_PLAIN_READ = memoryview(bytearray(TLS_PLAIN_READ))

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
                                        peer=peer_of(conn.raw))


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
        self._abort(None)

    def _fail(self, exc: BaseException) -> None:
        self._abort(exc)

    def _abort(self, failure: BaseException | None) -> None:
        """Close at once and free the TLS state; a ``failure`` is reported (admission, ``on_failure``) first."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if failure is not None:
            if self._admission is not None:
                self._admission.handshake_over(self)
            self._on_failure(self, failure)
        if self.raw is not None:
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
        inbio = self._in
        assert inbio is not None
        while not self.closed:
            buf = self._plain_buffer()
            size = len(buf)
            total = 0
            eof = False
            while total < size:
                if total and not inbio.pending:
                    # all ciphertext consumed, and the last read returned less than asked, so its record is
                    # exhausted: the next read could only raise SSLWantReadError, which costs more than the
                    # whole rest of a small read
                    break
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
        self._to_protocol = False

    def attach_protocol(self, protocol: asyncio.Protocol) -> None:
        """Hand the decrypted connection to ``protocol`` (the gRPC full path's HTTP/2 server, in this
        process) instead of the pipe. Called from the handshake callback, before any plaintext is read:
        ``protocol`` gets ``connection_made`` with a writer that encrypts, its bytes through the
        process's one plaintext buffer (as :class:`TlsProtocolClient` does), and ``connection_lost``."""
        self.half = protocol
        self.writer = _TlsStreamWriter(self)
        self._to_protocol = True
        self.half.connection_made(self.writer)

    # (written out rather than through super(): these run for every read of every connection)
    def _plain_buffer(self) -> memoryview:
        return _PLAIN_READ if self._to_protocol else self.half.get_buffer(-1)  # type: ignore[no-any-return]

    def _deliver(self, buf: memoryview, nbytes: int, eof: bool) -> None:
        half = self.half
        if self._to_protocol:
            if nbytes:
                half.data_received(bytes(buf[:nbytes]))  # copied: the buffer is reused by the next read
            return
        if nbytes:
            half.buffer_updated(nbytes)
        if eof:
            half.eof_received()


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


async def connect_b_tls(pipe: Pipe, host: str, port: int, ssl_context: ssl.SSLContext, server_hostname: str,
                        timeout: float = 10.0) -> Any:
    """Open side b of ``pipe`` over TLS (:class:`TlsClientConnection`); raises what the connection or the
    handshake failed with (``TimeoutError`` past ``timeout`` for each). Then :meth:`Pipe.start`."""
    loop = asyncio.get_running_loop()
    _, tls = await asyncio.wait_for(
        loop.create_connection(lambda: TlsClientConnection(pipe, ssl_context, server_hostname, timeout), host, port),
        timeout)
    try:
        await tls.ready  # resolved by the handshake, its failure, its timeout or the connection's loss
    except BaseException:
        tls.drop()
        raise
    return pipe.b_connected(tls.writer)
