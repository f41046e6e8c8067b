"""A small HTTP/1.1 client on asyncio streams for Consul's HTTP API (no aiohttp in the sidecar).

Responses are parsed by `h11` (a pure-Python, sans-I/O HTTP/1.1 state machine) with two bounds on
what one peer can make us buffer: the response head (`MAX_HEAD_BYTES`, h11's incomplete-event limit)
and the body (`MAX_BODY_BYTES` by default, counted as it arrives, chunked or Content-Length). A response
over a bound, malformed, or truncated fails that request with `ResponseError`; the process is untouched.

`Http1Pool` keeps idle keep-alive connections and bounds how many are open at once; a request whose
connection the server closed before any response byte arrived (typically a pooled keep-alive connection
the server dropped) is retried once on a fresh connection if it is idempotent (GET), and otherwise
fails with `ConnectionLost`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Sequence

import h11

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024   # a Consul response larger than this is refused (not buffered)
_READ_SIZE = 64 * 1024


class ResponseError(Exception):
    """The server's response was malformed, truncated, or over a size bound."""


class ConnectionLost(Exception):
    """The connection closed before any byte of the response arrived (a stale keep-alive connection)."""


Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Opener = Callable[[], Awaitable[Streams]]


class Http1Connection:
    """One HTTP/1.1 connection: requests one at a time; `reusable` after a complete keep-alive exchange."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 max_body: int = MAX_BODY_BYTES) -> None:
        self._reader = reader
        self._writer = writer
        self._max_body = max_body
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.reusable = False

    async def roundtrip(self, method: str, target: str, headers: Sequence[tuple[str, str]],
                        body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        """(status, headers with lower-case names, body). Raises `ConnectionLost`, `ResponseError`,
        OSError."""
        self.reusable = False
        hs = [(k, v) for k, v in headers]
        if method != "GET" or body:
            hs.append(("Content-Length", str(len(body))))
        try:
            out = self._h11.send(h11.Request(method=method, target=target, headers=hs))
            if body:
                out = (out or b"") + (self._h11.send(h11.Data(data=body)) or b"")
            out = (out or b"") + (self._h11.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError as exc:
            raise ValueError(f"cannot send request: {exc}") from None
        self._writer.write(out)
        try:
            await self._writer.drain()
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise ConnectionLost(str(exc)) from None
        return await self._read_response()

    async def _read_response(self) -> tuple[int, list[tuple[str, str]], bytes]:
        status = 0
        resp_headers: list[tuple[str, str]] = []
        chunks: list[bytes] = []
        size = 0
        got_bytes = False
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise ResponseError(f"malformed HTTP response: {exc}") from None
            if event is h11.NEED_DATA:
                try:
                    data = await self._reader.read(_READ_SIZE)
                except ConnectionResetError as exc:
                    if not got_bytes:
                        raise ConnectionLost(str(exc)) from None
                    raise
                if not data and not got_bytes:
                    raise ConnectionLost("server closed the connection")
                got_bytes = got_bytes or bool(data)
                self._h11.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
                resp_headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers]
            elif isinstance(event, h11.InformationalResponse):
                continue
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > self._max_body:
                    raise ResponseError(f"response body exceeds the limit of {self._max_body} bytes "
                                        f"(catalog.http1.MAX_BODY_BYTES)")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self.reusable = self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE
                if self.reusable:
                    self._h11.start_next_cycle()
                return status, resp_headers, b"".join(chunks)
            else:   # ConnectionClosed before the end of the message
                raise ResponseError("server closed the connection before the response ended")

    def close(self) -> None:
        self.reusable = False
        self._writer.close()


class Http1Pool:
    """Keep-alive connections to one server, at most `max_connections` open at once (callers wait)."""

    def __init__(self, opener: Opener, *, max_connections: int = 64, max_idle: int = 8,
                 max_body: int = MAX_BODY_BYTES) -> None:
        self._open = opener
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[Http1Connection] = []
        self._max_idle = max_idle
        self._max_body = max_body
        self._closed = False

    async def request(self, method: str, target: str, headers: Sequence[tuple[str, str]],
                      body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        async with self._slots:
            for attempt in (1, 2):
                conn = await self._take()
                try:
                    result = await conn.roundtrip(method, target, headers, body)
                except ConnectionLost:
                    conn.close()
                    if method == "GET" and attempt == 1:
                        continue   # (most often a stale keep-alive connection): resend an idempotent request once
                    raise
                except BaseException:
                    conn.close()
                    raise
                self._give_back(conn)
                return result
            raise AssertionError("unreachable")

    async def _take(self) -> Http1Connection:
        if self._closed:
            raise RuntimeError("connection pool is closed")
        if self._idle:
            return self._idle.pop()
        reader, writer = await self._open()
        return Http1Connection(reader, writer, max_body=self._max_body)

    def _give_back(self, conn: Http1Connection) -> None:
        if conn.reusable and not self._closed and len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def tcp_opener(host: str, port: int, ssl_context: ssl.SSLContext | None, *,
               connect_timeout: float = 10.0) -> Opener:
    async def open_tcp() -> Streams:
        async with asyncio.timeout(connect_timeout):
            return await asyncio.open_connection(host, port, ssl=ssl_context,
                                                 server_hostname=host if ssl_context else None)
    return open_tcp


def unix_opener(path: str, *, connect_timeout: float = 10.0) -> Opener:
    async def open_unix() -> Streams:
        async with asyncio.timeout(connect_timeout):
            return await asyncio.open_unix_connection(path)
    return open_unix
