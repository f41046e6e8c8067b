"""A small gRPC client on the sidecar's own HTTP/2 state machine (sidecar.h2), for the few calls the
sidecar makes itself: the CA (Sign, WatchRoots) and the app's server reflection.

Why not grpc.aio: the first grpc channel starts grpc's C core in the process (event-engine and timer
threads, their malloc arenas, several MB of its code paged in): about 6 MB of RSS in a sidecar whose
data path (the frame-level HTTP/2 proxy of sidecar.h2_proxy) never needs it.

What it does: one HTTP/2 connection per channel (TLS with ALPN h2, or plaintext h2c), requests sent
whole with END_STREAM (unary, server streaming, and client streams known in advance), the response
messages yielded as they come, the call's status from the trailers (grpc-status, grpc-message) or,
without them, from the HTTP status as gRPC maps it. A deadline is sent as grpc-timeout and enforced
here (DEADLINE_EXCEEDED). No compression is offered, so none is accepted.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import time
from collections.abc import AsyncGenerator
from typing import Any
from urllib.parse import unquote_to_bytes

from hpack import Decoder

from sidecar.h2.connection import H2Stream
from sidecar.h2.frames import E_CALM, E_CANCEL, E_REFUSED, F_END_STREAM
from sidecar.h2.grpc import STATUS_NAMES
from sidecar.h2.hpack import encode_plain
from sidecar.h2_conn import Conn

OK, CANCELLED, UNKNOWN, DEADLINE_EXCEEDED = 0, 1, 2, 4
PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, UNAUTHENTICATED = 7, 8, 12, 13, 14, 16

_MSG = struct.Struct(">BI")
# how gRPC maps an HTTP status without grpc-status (grpc's doc/http-grpc-status-mapping.md)
_HTTP_TO_GRPC = {400: INTERNAL, 401: UNAUTHENTICATED, 403: PERMISSION_DENIED, 404: UNIMPLEMENTED,
                 429: UNAVAILABLE, 502: UNAVAILABLE, 503: UNAVAILABLE, 504: UNAVAILABLE}


class RpcError(Exception):
    """A call ended with a non-OK status (from the server, or UNAVAILABLE / DEADLINE_EXCEEDED here)."""

    def __init__(self, code: int, details: str) -> None:
        self.code = code
        self.name = STATUS_NAMES[code] if 0 <= code < len(STATUS_NAMES) else str(code)
        self.details = details
        super().__init__(f"{self.name}: {details}")


def _text(value: bytes) -> str:
    return unquote_to_bytes(value).decode("utf-8", "replace")


class _Call:
    """One stream's response: messages, then None (OK) or an RpcError, on a queue."""

    def __init__(self, max_message: int) -> None:
        self.queue: asyncio.Queue[bytes | RpcError | None] = asyncio.Queue()
        self.buf = bytearray()
        self.headers_seen = False
        self.done = False
        self.max_message = max_message

    def finish(self, result: RpcError | None) -> None:
        if not self.done:
            self.done = True
            self.queue.put_nowait(result)

    def on_headers(self, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        fields = dict(headers)
        if not self.headers_seen:
            self.headers_seen = True
            status = fields.get(b":status", b"")
            if status != b"200" and b"grpc-status" not in fields:
                code = _HTTP_TO_GRPC.get(int(status) if status.isdigit() else 0, UNKNOWN)
                self.finish(RpcError(code, f"HTTP status {status.decode(errors='replace')}"))
                return
            if b"grpc-status" not in fields:  # response headers; trailers come later
                if end:
                    self.finish(RpcError(INTERNAL, "the stream ended without a gRPC status"))
                return
        raw = fields.get(b"grpc-status", b"")
        code = int(raw) if raw.isdigit() else UNKNOWN
        self.finish(None if code == OK else RpcError(code, _text(fields.get(b"grpc-message", b""))))

    def on_data(self, data: bytes, end: bool) -> None:
        if self.done:
            return
        self.buf += data
        while len(self.buf) >= 5:
            flag, n = _MSG.unpack_from(self.buf)
            if n > self.max_message:
                self.finish(RpcError(RESOURCE_EXHAUSTED, f"response message of {n} bytes exceeds {self.max_message}"))
                return
            if len(self.buf) < 5 + n:
                break
            if flag & 1:
                self.finish(RpcError(INTERNAL, "compressed response message (no compression was offered)"))
                return
            self.queue.put_nowait(bytes(self.buf[5:5 + n]))
            del self.buf[:5 + n]
        if end:
            self.finish(RpcError(INTERNAL, "the stream ended without trailers"))


class _Owner:
    """What h2_conn.Conn expects of its proxy: connections with output pending, and a flush."""

    def __init__(self) -> None:
        self.dirty: list[Any] = []

    def flush(self) -> None:
        for conn in self.dirty:
            conn.flush()
        self.dirty.clear()


class _ClientConn(Conn):
    """The client side of the HTTP/2 state machine (sidecar.h2.connection) with calls on its streams."""

    kind = "client"

    def __init__(self, owner: _Owner, authority: bytes, scheme: bytes) -> None:
        super().__init__(owner, client=True)
        self.owner = owner
        self.authority = authority
        self.scheme = scheme
        self.decoder = Decoder()
        self.calls: dict[int, _Call] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.begin(transport)
        self.owner.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for call in self.calls.values():
            call.finish(RpcError(UNAVAILABLE, f"connection lost: {exc or 'closed by the peer'}"))
        self.calls.clear()

    def on_connection_error(self, code: int, reason: str, detail: str) -> None:
        for call in self.calls.values():
            call.finish(RpcError(UNAVAILABLE, f"HTTP/2 connection error {code}: {detail}"))
        self.calls.clear()
        super().on_connection_error(code, reason, detail)

    @property
    def usable(self) -> bool:
        return not self.closed and self.can_open()

    def start(self, path: str, messages: list[bytes], timeout: float | None, max_message: int) -> tuple[int, _Call]:
        body = b"".join(_MSG.pack(0, len(m)) + m for m in messages)
        if len(body) > min(self.send_window, self.peer_initial_window):
            raise ValueError(f"request of {len(body)} bytes is larger than the peer's flow-control window")
        s = self.open_stream()
        headers = [(b":method", b"POST"), (b":scheme", self.scheme), (b":path", path.encode()),
                   (b":authority", self.authority), (b"content-type", b"application/grpc"), (b"te", b"trailers")]
        if timeout is not None:
            headers.append((b"grpc-timeout", b"%dm" % max(1, int(timeout * 1000))))
        call = _Call(max_message)
        s.call = call
        self.calls[s.sid] = call
        self.send_headers(s, encode_plain(headers), False)
        self.send_data(s, body, True)
        self.owner.flush()
        return s.sid, call

    def cancel(self, sid: int) -> None:
        call = self.calls.pop(sid, None)
        s = self.streams.get(sid)
        if s is not None and not self.closed:
            self.reset(s, E_CANCEL)
            self.owner.flush()
        if call is not None:
            call.done = True

    def on_headers(self, s: H2Stream, flags: int, block: bytes) -> None:
        self._deliver(s.sid, flags, block)

    def on_discarded_block(self, block: bytes, truncated: bool) -> None:
        if not truncated:
            self.decoder.decode(block, raw=True)  # every block, to keep the HPACK table in step

    def _deliver(self, sid: int, flags: int, block: bytes) -> None:
        # every block, to keep the HPACK table in step
        headers: list[tuple[bytes, bytes]] = [(bytes(k), bytes(v)) for k, v in self.decoder.decode(block, raw=True)]
        call = self.calls.get(sid)
        if call is not None:
            call.on_headers(headers, bool(flags & F_END_STREAM))
            if call.done:
                self._done(sid)

    def _done(self, sid: int) -> None:
        del self.calls[sid]
        s = self.streams.get(sid)
        if s is not None:
            self.close_stream(s)

    def on_data(self, s: H2Stream, end: int, data: bytes) -> None:
        if data:
            self.consumed(len(data))
            self.stream_consumed(s, len(data))
        call = self.calls.get(s.sid)
        if call is None:
            return
        call.on_data(data, bool(end))
        if call.done:
            self._done(s.sid)

    def on_reset(self, s: H2Stream, code: int) -> None:
        call = self.calls.pop(s.sid, None)
        if call is not None:
            status = {E_CANCEL: CANCELLED, E_REFUSED: UNAVAILABLE, E_CALM: RESOURCE_EXHAUSTED}.get(code, INTERNAL)
            call.finish(RpcError(status, f"stream reset by the server (HTTP/2 error {code})"))

    def on_stream_error(self, s: H2Stream, code: int, reason: str, exc: BaseException | None) -> None:
        call = self.calls.pop(s.sid, None)
        if call is not None:
            call.finish(RpcError(INTERNAL, f"the server broke HTTP/2 on this call ({reason})"))

    def on_goaway(self, last_sid: int, code: int) -> None:
        for sid in [s for s in self.calls if s > last_sid]:
            self.calls.pop(sid).finish(RpcError(UNAVAILABLE, "the server is going away"))


class Channel:
    """Calls to one server over one HTTP/2 connection, made on first use and again after it is lost."""

    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, connect_timeout: float = 10.0,
                 max_message: int = 4 * 1024 * 1024) -> None:
        self.host = host
        self.port = port
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self._connect_timeout = connect_timeout
        self._max_message = max_message
        self._conn: _ClientConn | None = None
        self._connecting: asyncio.Lock | None = None

    async def _connection(self, deadline: float | None) -> _ClientConn:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._conn is not None and self._conn.usable:
                return self._conn
            old = self._conn
            if old is not None and old.transport is not None and not old.calls:
                old.transport.close()
            authority = self._server_hostname or f"{self.host}:{self.port}"
            conn = _ClientConn(_Owner(), authority.encode(), b"https" if self._ssl is not None else b"http")
            limit = self._connect_timeout
            if deadline is not None:
                limit = min(limit, max(deadline - time.monotonic(), 0.0))
            try:
                await asyncio.wait_for(asyncio.get_running_loop().create_connection(
                    lambda: conn, self.host, self.port, ssl=self._ssl,
                    server_hostname=self._server_hostname if self._ssl is not None else None), limit)
            except (OSError, TimeoutError) as exc:
                raise RpcError(UNAVAILABLE, f"cannot connect to {self.host}:{self.port}: {exc or 'timed out'}") \
                    from None
            self._conn = conn
            return conn

    async def stream(self, path: str, requests: list[bytes], *,
                     timeout: float | None = None) -> AsyncGenerator[bytes, None]:
        """The response messages of one call; raises RpcError when it ends with a non-OK status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        conn = await self._connection(deadline)
        sid, call = conn.start(path, requests, timeout, self._max_message)
        try:
            while True:
                if deadline is None:
                    item = await call.queue.get()
                else:
                    try:
                        item = await asyncio.wait_for(call.queue.get(), max(deadline - time.monotonic(), 0.0))
                    except TimeoutError:
                        raise RpcError(DEADLINE_EXCEEDED, "deadline exceeded") from None
                if item is None:
                    return
                if isinstance(item, RpcError):
                    raise item
                yield item
        finally:
            conn.cancel(sid)

    async def unary(self, path: str, request: bytes, *, timeout: float | None = None) -> bytes:
        answers = [m async for m in self.stream(path, [request], timeout=timeout)]
        if len(answers) != 1:
            raise RpcError(INTERNAL, f"a unary call answered {len(answers)} messages")
        return answers[0]

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None:
            conn.transport.close()
