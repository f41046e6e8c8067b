"""Byte pipes: splicing two transports together, server-side TLS for the public port, the outbound TCP listener.

:class:`Pipe` joins two asyncio transports with a pair of :class:`_Half` protocols. Each half is a
``BufferedProtocol`` reading into a buffer it reuses, except when the other side's transport still
holds unsent data after ``write()`` (it may keep a view of that buffer): then the half switches to
a fresh buffer. Back-pressure: when one side's write buffer is full, the other side stops reading.
Half-close (EOF) is passed on where the transport supports it.

A half can be created before its peer exists (for example the TLS side of an inbound connection,
which may receive bytes before the app connection is up): it keeps what arrives, pauses reading,
and flushes when :meth:`Pipe.start` is called once :meth:`Pipe.connect_b` has wired the peer. The side
that connects is wired *before* the connection is made, because an HTTP/2 server speaks first.

:class:`TlsServerConnection` does the public port's TLS itself over memory BIOs (uvloop's
``start_tls`` does not complete server-side handshakes on accepted connections): one context per
connection from the current snapshot, the exact handshake error for metrics, the peer certificate
before any byte reaches the app, and decrypted records batched into one write to the other side.

:class:`OutboundTcp` is the local listener of a TCP upstream.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Any

import structlog

_BUF = 256 * 1024
log = structlog.get_logger("weft.sidecar.tcp")


class _Half(asyncio.BufferedProtocol):
    """One side of a pipe: reads from its transport, writes to its peer's."""

    __slots__ = ("_buf", "_eof", "_pending", "_view", "bytes_in", "closed", "peer", "pipe", "transport")

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe
        self.transport: Any = None
        self.peer: _Half | None = None
        self._buf = bytearray(_BUF)
        self._view = memoryview(self._buf)
        self._pending: list[bytes] = []
        self._eof = False
        self.bytes_in = 0
        self.closed = False

    # -- asyncio protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.pipe._made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_in += nbytes
        peer = self.peer
        if peer is None or peer.transport is None:
            self._pending.append(bytes(self._view[:nbytes]))
            if self.transport is not None:
                self.transport.pause_reading()
            return
        t = peer.transport
        t.write(self._view[:nbytes])
        if t.get_write_buffer_size():
            # The transport kept a view of our buffer: never overwrite it.
            self._buf = bytearray(_BUF)
            self._view = memoryview(self._buf)

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
                        server_hostname: str | None = None, timeout: float = 10.0) -> asyncio.BaseTransport:
        """Open side b (wired to side a first), then flush what side a received meanwhile."""
        loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {}
        if ssl_context is not None:
            kwargs = {"ssl": ssl_context, "server_hostname": server_hostname, "ssl_handshake_timeout": timeout}
        transport, _ = await asyncio.wait_for(loop.create_connection(lambda: self.b, host, port, **kwargs), timeout)
        if self.a.closed:
            transport.close()
            raise ConnectionResetError("the client went away while connecting")
        return transport

    def start(self) -> None:
        """Both sides are up: flush what side a received while side b was being opened."""
        self.a.flush()

    @property
    def bytes_a_to_b(self) -> int:
        return self.a.bytes_in

    @property
    def bytes_b_to_a(self) -> int:
        return self.b.bytes_in


class OutboundTcp:
    """The local listener of a TCP upstream: each connection goes to a picked endpoint over mTLS."""

    def __init__(self, outbound: Any, pool: Any) -> None:
        self._out = outbound  # sidecar.outbound.Outbound
        self._pool = pool  # sidecar.outbound.EndpointPool
        self._server: asyncio.AbstractServer | None = None
        self._pipes: set[Pipe] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, host, port, reuse_address=True, backlog=1024)

    def _accept(self) -> asyncio.BaseProtocol:
        pipe = Pipe(on_made=self._made, on_close=self._closed)
        self._pipes.add(pipe)
        return pipe.a

    def _made(self, pipe: Pipe) -> None:
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
                    server_hostname=expected_server_name(pool.name, creds.trust_domain))
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
        self._pipes.discard(pipe)
        key = pipe.info.get("endpoint")
        snap = self._out.snapshot()
        status = "closed" if key is not None else "connect_failed"
        self._out.telemetry.request("outbound", snap.registration.service, self._pool.name, "tcp", status,
                                    time.monotonic() - pipe.started)

    async def close(self, grace: float = 5.0) -> None:
        if self._server is not None:
            self._server.close()
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

    def __init__(self, conn: TlsServerConnection) -> None:
        self._conn = conn

    def write(self, data: Any) -> None:
        conn = self._conn
        if conn.closed:
            return
        conn.sslobj.write(data)
        conn.flush()

    def get_write_buffer_size(self) -> int:
        return 0  # the plaintext was encrypted into a new buffer: the caller's is not held

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


class TlsServerConnection(asyncio.BufferedProtocol):
    """Server-side TLS over memory BIOs on a raw connection, feeding side ``a`` of a :class:`Pipe`.

    Doing TLS here (rather than with the loop's ``start_tls``) gives this sidecar the context of the
    current snapshot for each connection, the exact handshake error for metrics, and the peer's
    certificate before any byte reaches the app.
    """

    def __init__(self, pipe: Pipe, context: Callable[[], ssl.SSLContext],
                 on_handshake: Callable[[TlsServerConnection], None],
                 on_failure: Callable[[TlsServerConnection, BaseException], None],
                 handshake_timeout: float = 10.0) -> None:
        self.pipe = pipe
        self._context = context
        self._on_handshake = on_handshake
        self._on_failure = on_failure
        self._timeout = handshake_timeout
        self.raw: Any = None
        self.sslobj: Any = None
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._rbuf = bytearray(_BUF)
        self._rview = memoryview(self._rbuf)
        self.handshaken = False
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        self.writer = _TlsWriter(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport
        try:
            self.sslobj = self._context().wrap_bio(self._in, self._out, server_side=True)
        except (ssl.SSLError, OSError, ValueError) as exc:
            self._fail(exc)
            return
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._handshake_timeout)

    def _handshake_timeout(self) -> None:
        if not self.handshaken and not self.closed:
            self._fail(TimeoutError("TLS handshake timed out"))

    def _fail(self, exc: BaseException) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._on_failure(self, exc)
        self.raw.abort()

    def flush(self) -> None:
        data = self._out.read()
        if data:
            self.raw.write(data)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._rview

    def buffer_updated(self, nbytes: int) -> None:
        self._in.write(self._rview[:nbytes])
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
        half = self.pipe.a
        half.transport = self.writer
        self._on_handshake(self)
        if not self.closed:
            self._read_plain()

    def _read_plain(self) -> None:
        """Decrypt everything available into the half's buffer, record after record, then pass it on once."""
        half = self.pipe.a
        sslobj = self.sslobj
        while not self.closed:
            buf = half.get_buffer(-1)
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
                if not n:
                    break
                total += n
            if total:
                half.buffer_updated(total)
            if eof:
                half.eof_received()
                self.close()
                break
            if total < size:
                break
        if self._out.pending:
            self.flush()

    def eof_received(self) -> bool | None:
        if self.handshaken:
            self.pipe.a.eof_received()
        return False

    def pause_writing(self) -> None:
        self.pipe.a.pause_writing()

    def resume_writing(self) -> None:
        self.pipe.a.resume_writing()

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
        self.raw.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self.handshaken:
            self.pipe.a.connection_lost(exc)
        else:
            self.pipe.a.closed = True
            self.pipe._lost()
