"""HTTP/1.1 proxying with aiohttp: the outbound listener of an HTTP upstream, and the inbound full path.

Outbound: an aiohttp server on the upstream's local port; each request picks an endpoint and is
sent over mTLS (the TLS host name is the upstream's DNS SAN, so its identity is checked) with its
method, path, query, headers (hop-by-hop ones dropped) and streamed body; the response comes back
the same way.

Inbound full path: an internal aiohttp server on loopback receives the decrypted connections of
callers that are not passed through; it authorizes every request (method, path, headers) with the
caller's identity and answers 403 naming the deciding rule, or forwards it to the app.

Bounds (``sidecar.limits``), on both servers: at most ``max_connections`` open connections (the
excess aborted at accept); a request head within ``http_header_timeout`` seconds of its first byte
(and of the connection's opening), else 408 and close; each head line at most
``http_max_header_size`` bytes and at most ``http_max_headers`` fields, else 431 and close; a
connection without a request for ``idle_timeout`` closed (aiohttp's keep-alive timeout); a body
that moves no byte for ``idle_timeout`` ends its request. Responses from upstreams and the app are
read with the same head limits. Every refusal is counted in ``weft_connections_refused_total`` and
logged at a bounded rate.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from sidecar import authz
from sidecar.gate import ListenerGate
from sidecar.http_relay import forward_headers, relay_response
from sidecar.limits import Limits
from sidecar.telemetry import Telemetry

if TYPE_CHECKING:
    from sidecar.seams import Direction, InboundDirection, UpstreamPool
    from sidecar.snapshot import Snapshot
    from sidecar.tap import CallRecord, TapHub

log = structlog.get_logger("weft.sidecar.http")


def route_label(method: str, path: str) -> str:
    """A bounded route label: the method and the first path segment."""
    first = path.split("?", 1)[0].lstrip("/").split("/", 1)[0]
    return f"{method} /{first[:40]}"


def _tap_start(hub: TapHub, direction: str, source: str, destination: str,
               request: web.BaseRequest) -> CallRecord | None:
    """Only while a tap is open: a sidecar.tap.CallRecord for this request (None when no tap matches)."""
    rec = hub.start(direction, source, destination, f"{request.method} {request.path}", path=request.path_qs,
                    protocol="http")
    if rec is not None:
        rec.request_headers = list(request.headers.items())
    return rec


async def _body(content: aiohttp.StreamReader, idle: float, tap: CallRecord | None = None) -> AsyncIterator[bytes]:
    """A request body, chunk by chunk as it arrives; a client that sends no byte for ``idle`` seconds ends it.
    With a tap recording payloads, its first bytes are kept for the tap."""
    record = tap.request_data if tap is not None and tap.request_body is not None else None
    while True:
        if idle > 0:
            async with asyncio.timeout(idle):
                chunk = await content.readany()
        else:
            chunk = await content.readany()
        if not chunk:
            return
        if record is not None:
            record(chunk)
        yield chunk


async def _relay(request: web.BaseRequest, session: aiohttp.ClientSession, url: str, idle: float,
                 tap: CallRecord | None = None, **kwargs: Any) -> web.StreamResponse:
    body = _body(request.content, idle, tap) if request.body_exists else None
    async with session.request(request.method, url, headers=forward_headers(request.headers), data=body,
                               allow_redirects=False, auto_decompress=False, **kwargs) as upstream:
        if tap is not None:
            tap.response_headers = list(upstream.headers.items())
        return await relay_response(request, upstream, forward_headers(upstream.headers), tap)


_HEAD_TOO_LARGE = ("weft: the request head is larger than the sidecar accepts "
                   "(--http-max-header-size, --http-max-headers)\n")
_TIMEOUT_TEXT = b"weft: the request head did not arrive in time (--http-header-timeout)\n"
_HEAD_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(_TIMEOUT_TEXT), _TIMEOUT_TEXT))


class _Bounds:
    """What every connection of one HTTP listener shares: its gate, its limits, where refusals are counted."""

    __slots__ = ("gate", "limits", "listener", "telemetry")

    def __init__(self, listener: str, limits: Limits, telemetry: Telemetry) -> None:
        self.listener = listener
        self.limits = limits
        self.telemetry = telemetry
        self.gate = ListenerGate(listener, limits.max_connections, telemetry)

    def refused(self, reason: str, transport: Any, **fields: Any) -> None:
        self.telemetry.connection_refused(reason)
        peer = transport.get_extra_info("peername") if transport is not None else None
        self.telemetry.peer_log.warning(time.monotonic(), "connection_refused", reason=reason, listener=self.listener,
                                        peer=f"{peer[0]}:{peer[1]}" if peer else "", **fields)


class _BoundedHandler(RequestHandler):
    """aiohttp's connection protocol with the listener's bounds: admission, head timeout, 431 for large heads.

    It reads three fields of aiohttp's handler (``_request_count``, ``_request_in_progress``,
    ``_messages``) to tell a request head in progress from a request being served.
    """

    __slots__ = ("_admitted", "_bounds", "_head_timer")

    def __init__(self, manager: web.Server, *, bounds: _Bounds, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._bounds = bounds
        self._admitted = False
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._bounds.gate.admit(transport):
            return  # aborted at accept: aiohttp never sees it
        self._admitted = True
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self._disarm()
        self._bounds.gate.release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:
            self._disarm()  # a whole head arrived
        elif self._head_timer is None and not self._request_in_progress:
            self._arm()  # the first bytes of the next head

    def _arm(self) -> None:
        timeout = self._bounds.limits.http_header_timeout
        self._head_timer = asyncio.get_running_loop().call_later(timeout, self._head_timeout, self._request_count)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self, heads: int) -> None:
        self._head_timer = None
        if self._request_in_progress or self._messages or self._request_count != heads or self.transport is None:
            return
        transport = self.transport
        self._bounds.refused("http_header_timeout", transport, seconds=self._bounds.limits.http_header_timeout)
        transport.write(_HEAD_TIMEOUT)
        self.force_close()  # closes the transport after the write

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc)):
            self._bounds.refused("http_header_size", self.transport, error=str(exc)[:120])
            response = web.Response(status=431, text=_HEAD_TOO_LARGE)
            response.force_close()
            return response
        return super().handle_error(request, status, exc, message)


class _BoundedServer(web.Server):
    def __init__(self, handler: Any, bounds: _Bounds, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._bounds = bounds

    def __call__(self) -> RequestHandler:
        return _BoundedHandler(self, loop=self._loop, bounds=self._bounds, **self._kwargs)


def _head_limits(limits: Limits) -> dict[str, int]:
    size = limits.http_max_header_size
    return {"max_line_size": size, "max_field_size": size, "max_headers": limits.http_max_headers}


class _Server:
    def __init__(self, handler: Any, listener: str, limits: Limits, telemetry: Telemetry) -> None:
        self.bounds = _Bounds(listener, limits, telemetry)
        keepalive = limits.idle_timeout if limits.idle_timeout > 0 else 10.0**9  # aiohttp: 0 would mean no keep-alive
        server = _BoundedServer(handler, self.bounds, access_log=None, keepalive_timeout=keepalive,
                                **_head_limits(limits))
        self._runner = web.ServerRunner(server, handle_signals=False)
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True, backlog=1024)
        await site.start()
        server = site._server
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self.port

    async def close(self) -> None:
        await self._runner.cleanup()


def _client_session(limits: Limits, connector: aiohttp.BaseConnector) -> aiohttp.ClientSession:
    """A session whose responses are read with the same head limits; an upstream silent for idle_timeout fails."""
    idle = limits.idle_timeout if limits.idle_timeout > 0 else None
    size = limits.http_max_header_size
    return aiohttp.ClientSession(connector=connector, max_line_size=size, max_field_size=size,
                                 max_headers=limits.http_max_headers,
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=limits.handshake_timeout,
                                                               sock_read=idle))


_closing: set[asyncio.Task[None]] = set()


def _close_later(session: aiohttp.ClientSession) -> None:
    task = asyncio.ensure_future(session.close())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


class OutboundHttp:
    """The local listener of an HTTP upstream."""

    def __init__(self, outbound: Direction, pool: UpstreamPool) -> None:
        self._out = outbound
        self._pool = pool
        self._limits: Limits = outbound.limits
        self._server = _Server(self._handle, f"outbound:{pool.name}", self._limits, outbound.telemetry)
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    async def start(self, host: str, port: int) -> None:
        await self._server.start(host, port)

    def _session(self) -> aiohttp.ClientSession:
        creds = self._out.snapshot().credentials
        session = self._sessions.get(creds.generation)
        if session is None:
            loop = asyncio.get_running_loop()
            for old in list(self._sessions.values()):
                loop.call_later(30, _close_later, old)
            self._sessions.clear()
            connector = aiohttp.TCPConnector(ssl=self._out.tls.client(creds, "http"), limit=0)
            session = _client_session(self._limits, connector)
            self._sessions[creds.generation] = session
        return session

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        from sidecar.tls import expected_server_name

        start = time.perf_counter()
        pool = self._pool
        out = self._out
        status = "502"
        tap = None
        if out.telemetry.tap.active:
            tap = _tap_start(out.telemetry.tap, "outbound", out.snapshot().registration.service, pool.name, request)
        try:
            if out.draining:
                status = "503"
                return web.Response(status=503, text="weft: the sidecar is shutting down\n")
            if pool.routed:  # a discovery chain routes, splits or fails over: the per-call path
                from sidecar.http_routing import routed_request

                routed, status = await routed_request(self, request)
                return routed
            key = pool.pick()
            if key is None:
                status = "503"
                return web.Response(status=503, text=f"weft: no healthy endpoint of upstream {pool.name}\n")
            ep = pool.endpoints[key]
            creds = out.snapshot().credentials
            t0 = time.perf_counter()
            try:
                response = await _relay(request, self._session(), f"https://{ep.address}:{ep.port}{request.path_qs}",
                                        self._limits.idle_timeout, tap,
                                        server_hostname=expected_server_name(pool.name, creds.trust_domain))
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                pool.observe(key, False, time.perf_counter() - t0)
                log.warning("upstream_request_failed", upstream=pool.name, endpoint=key, error=str(exc)[:200])
                return web.Response(status=502, text=f"weft: upstream {pool.name} failed: {exc}\n")
            pool.observe(key, True, time.perf_counter() - t0)
            status = str(response.status)
            return response
        finally:
            seconds = time.perf_counter() - start
            source = out.snapshot().registration.service
            route = route_label(request.method, request.path)
            out.telemetry.call_ended("outbound", source, pool.name, out.telemetry.method_label(pool.name, route),
                                     status, seconds, tap, request.method, request.path)

    def on_snapshot(self) -> None:
        """Nothing to do: endpoint changes apply to the next request (the pool is already updated)."""

    async def close(self, grace: float = 5.0) -> None:
        await self._server.close()
        for session in self._sessions.values():
            await session.close()


async def _inbound_controls(inbound: InboundDirection, snap: Snapshot, source: str, path: str) -> web.Response | None:
    """Rate limits (429 with retry-after) and injected faults (delay, abort) for one inbound request."""
    from sidecar.ratelimit import retry_after_header
    from sidecar.traffic_metrics import metrics_of

    verdict = inbound.controls_for(snap).check(source, path, time.monotonic())
    if not verdict.reason:
        return None
    metrics = metrics_of(inbound.telemetry)
    if verdict.reason == "ratelimit":
        metrics.ratelimited.labels(metrics.source_label(source)).inc()
        return web.Response(status=429, text=verdict.message + "\n",
                            headers={"retry-after": retry_after_header(verdict.retry_after)})
    if verdict.delay:
        metrics.faults.labels("delay").inc()
        await asyncio.sleep(verdict.delay)
    if verdict.refuse:
        metrics.faults.labels("abort").inc()
        return web.Response(status=verdict.http_status, text=verdict.message + "\n")
    return None


class InboundHttp:
    """The internal server of the inbound full path for HTTP services."""

    def __init__(self, inbound: InboundDirection) -> None:
        self._in = inbound
        self._limits: Limits = inbound.limits
        self._server = _Server(self._handle, "inbound-http", self._limits, inbound.telemetry)
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    async def start(self) -> None:
        self.port = await self._server.start("127.0.0.1", 0)
        self._session = _client_session(self._limits, aiohttp.TCPConnector(limit=0))

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        start = time.perf_counter()
        inbound = self._in
        snap = inbound.snapshot()
        dest = snap.registration.service
        peer = request.transport.get_extra_info("peername") if request.transport else None
        ident = inbound.identities.get(int(peer[1])) if peer else None
        source = ident.service if ident is not None else "unknown"
        status = "502"
        tap = _tap_start(inbound.telemetry.tap, "inbound", source, dest, request) if inbound.telemetry.tap.active \
            else None
        try:
            if ident is None:
                status = "403"
                return web.Response(status=403, text="weft: the caller's identity is unknown\n")
            verdict = inbound.authorizer.check(
                snap.policy, ident, dest,
                authz.HttpRequest.of(request.method, request.path_qs, authz.header_map(request.headers.items())),
                f" {request.method} {request.path}")
            if verdict.denial is not None:
                status = "403"
                return web.Response(status=403, text=verdict.denial + "\n")
            refused = await _inbound_controls(inbound, snap, source, request.path)
            if refused is not None:
                status = str(refused.status)
                return refused
            reg = snap.registration
            assert self._session is not None
            local_timeout = snap.inbound.local.request_timeout  # service-defaults LocalRequestTimeoutMs
            try:
                async with asyncio.timeout(local_timeout or None):
                    response = await _relay(
                        request, self._session,
                        f"http://{reg.local_service_address}:{reg.local_service_port}{request.path_qs}",
                        self._limits.idle_timeout, tap)
            except TimeoutError as exc:
                if local_timeout:
                    status = "504"
                    return web.Response(status=504, text=f"weft: the local app did not answer within "
                                                         f"{local_timeout:g}s (LocalRequestTimeoutMs)\n")
                return web.Response(status=502, text=f"weft: the local app failed: {exc}\n")
            except (aiohttp.ClientError, OSError) as exc:
                return web.Response(status=502, text=f"weft: the local app failed: {exc}\n")
            status = str(response.status)
            return response
        finally:
            seconds = time.perf_counter() - start
            route = route_label(request.method, request.path)
            inbound.telemetry.call_ended("inbound", source, dest, inbound.telemetry.method_label(dest, route),
                                         status, seconds, tap, request.method, request.path)

    async def close(self) -> None:
        await self._server.close()
        if self._session is not None:
            await self._session.close()
