"""The admin API (plain HTTP/1.1 on asyncio, loopback by default): ``/ready``, ``/live``, ``/metrics``, ``/config``.

- ``/live``: 200 while the process runs its event loop.
- ``/ready``: 200 once a complete snapshot is published and the listeners are up, 503 before that
  and while draining (the body says why).
- ``/metrics``: Prometheus text format (see ``sidecar.telemetry``).
- ``/config``: the current snapshot as JSON: registration, certificate (serial, expiry, PEM of the
  leaf only), policy version, upstreams with endpoints and methods. Never a private key.
- ``/tap?direction=&source=&destination=&method=&status=&min_ms=&limit=&payload=1``: the calls this
  sidecar proxies, live, one JSON object per line (NDJSON, close-delimited), redacted (see
  ``sidecar.tap``); it ends when the client disconnects or ``limit`` calls were sent. A bad parameter
  answers 400 naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from sidecar import methods
from sidecar.snapshot import Snapshot
from sidecar.tap import OFF, QUEUE_SIZE, TapError, TapSettings, TapStream, parse_filter
from sidecar.telemetry import Telemetry

# A handful of GET endpoints on loopback do not need a web framework: a minimal HTTP/1.1 server on
# asyncio streams (one request per connection, `Connection: close`) keeps aiohttp's server side
# (about 1 MB of RSS) out of the sidecar; aiohttp's server is loaded only to proxy HTTP services.
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
            503: "Service Unavailable"}
TAP_WRITE_TIMEOUT = 30.0  # a tap reader that accepts nothing for this long is closed
# what one tap may hold in socket buffers: a slow reader makes its own queue drop (and the drops are
# counted) instead of making the sidecar buffer megabytes for it
TAP_SEND_BUFFER = 64 * 1024
TAP_BATCH_SECONDS = 0.02
MAX_HEAD = 16 * 1024
log = structlog.get_logger("weft.sidecar.admin")
READ_TIMEOUT = 10.0


class Admin:
    def __init__(self, snapshot: Callable[[], Snapshot | None], telemetry: Telemetry,
                 ready: Callable[[], tuple[bool, str]], extra: Callable[[], dict[str, Any]] | None = None, *,
                 tap_queue: int = QUEUE_SIZE) -> None:
        self._tap_queue = tap_queue
        self._snapshot = snapshot
        self._telemetry = telemetry
        self._ready = ready
        self._extra = extra
        self._started = time.time()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            "/ready": self._get_ready, "/live": self._get_live, "/metrics": self._get_metrics,
            "/config": self._get_config}
        self.port = 0
        # the hub reads the service's tap settings (KV weft/tap/<service>) from the current snapshot
        telemetry.tap.bind_settings(self._tap_settings)

    def _tap_settings(self) -> TapSettings:
        snap = self._snapshot()
        return snap.tap if snap is not None else OFF

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    def answer(self, method: str, target: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request line's method and target."""
        path = target.split("?", 1)[0]
        handler = self.routes.get(path)
        if handler is None:
            why = f"no such path {path[:200]!r}; try /ready /live /metrics /config /tap\n"
            return 404, "text/plain; charset=utf-8", why.encode()
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"only GET\n"
        try:
            return handler()
        except Exception:  # a bug in one endpoint answers 500; the admin API keeps serving
            log.exception("admin_request_failed", path=path)
            return 500, "text/plain; charset=utf-8", b"internal error\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            except asyncio.LimitOverrunError:
                head = b""
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or len(head) > MAX_HEAD:
                status, ctype, body = 400, "text/plain; charset=utf-8", b"bad request\n"
                method = "GET"
            elif parts[1].split("?", 1)[0] == "/tap" and parts[0] == "GET":
                await self._tap(parts[1].partition("?")[2], reader, writer)
                return
            else:
                method = parts[0]
                status, ctype, body = self.answer(method, parts[1])
            writer.write(f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away or never sent a request: nothing to answer
        except asyncio.CancelledError:
            pass  # close() ends open taps; the task ends here rather than reporting its cancellation
        finally:
            writer.close()
            if task is not None:
                self._handlers.discard(task)

    async def _tap(self, query: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Stream matching calls as NDJSON until the client goes away or the limit is reached."""
        hub = self._telemetry.tap
        try:
            flt = parse_filter(query)
            wake = asyncio.Event()
            sub = hub.subscribe(flt, wake.set, self._tap_queue)
        except TapError as exc:
            body = (str(exc) + "\n").encode()
            writer.write(f"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
            return
        log.info("tap_opened", filter=query[:300], taps=len(hub.subscribers))
        stream = TapStream(sub, hub.settings, methods.learnt.decode)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, TAP_SEND_BUFFER)
        writer.transport.set_write_buffer_limits(high=TAP_SEND_BUFFER)
        gone = asyncio.ensure_future(reader.read(1))  # EOF (or anything) from the client: it left
        try:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nCache-Control: no-store\r\n"
                         b"Connection: close\r\n\r\n")
            await writer.drain()
            while not stream.done and not gone.done():
                waiter = asyncio.ensure_future(wake.wait())
                await asyncio.wait((waiter, gone), return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if not gone.done():
                    # gather what else comes within a short window: one write and one wake-up per batch
                    # rather than per call (a tap at thousands of calls/s costs far fewer task switches)
                    await asyncio.sleep(TAP_BATCH_SECONDS)
                wake.clear()
                lines = stream.lines()
                if lines:
                    writer.write(b"".join(lines))
                    await asyncio.wait_for(writer.drain(), TAP_WRITE_TIMEOUT)
        finally:
            hub.unsubscribe(sub)
            gone.cancel()
            log.info("tap_closed", sent=stream.sent, dropped=sub.dropped, taps=len(hub.subscribers))

    def _get_ready(self) -> tuple[int, str, bytes]:
        ok, why = self._ready()
        return 200 if ok else 503, "text/plain; charset=utf-8", (why + "\n").encode()

    def _get_live(self) -> tuple[int, str, bytes]:
        return 200, "text/plain; charset=utf-8", b"live\n"

    def _get_metrics(self) -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE_LATEST, self._telemetry.render()

    def _get_config(self) -> tuple[int, str, bytes]:
        snap = self._snapshot()
        body: dict[str, Any] = {"uptime_seconds": round(time.time() - self._started, 1)}
        if snap is None:
            body["snapshot"] = None
        else:
            body["snapshot"] = snap.describe()
        body["taps_open"] = len(self._telemetry.tap.subscribers)
        if self._extra is not None:
            body.update(self._extra())
        return 200, "application/json", (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
