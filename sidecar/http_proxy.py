"""HTTP/1.1 proxying with aiohttp: the outbound listener of an HTTP upstream, and the inbound full path.

Outbound: an aiohttp server on the upstream's local port; each request picks an endpoint and is
sent over mTLS (the TLS host name is the upstream's DNS SAN, so its identity is checked) with its
method, path, query, headers (hop-by-hop ones dropped) and streamed body; the response comes back
the same way.

Inbound full path: an internal aiohttp server on loopback receives the decrypted connections of
callers that are not passed through; it authorizes every request (method, path, headers) with the
caller's identity and answers 403 naming the deciding rule, or forwards it to the app.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from sidecar import authz

log = structlog.get_logger("weft.sidecar.http")

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
                        "transfer-encoding", "upgrade", "host", "content-length"})
_CHUNK = 64 * 1024


def _forward_headers(headers: Any) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP]


def route_label(method: str, path: str) -> str:
    """A bounded route label: the method and the first path segment."""
    first = path.split("?", 1)[0].lstrip("/").split("/", 1)[0]
    return f"{method} /{first[:40]}"


def _tap_start(hub: Any, direction: str, source: str, destination: str, request: web.Request) -> Any:
    """Only while a tap is open: a sidecar.tap.CallRecord for this request (None when no tap matches)."""
    rec = hub.start(direction, source, destination, f"{request.method} {request.path}", path=request.path_qs,
                    protocol="http")
    if rec is not None:
        rec.request_headers = list(request.headers.items())
    return rec


async def _recorded(content: Any, tap: Any) -> Any:
    """The request body as it streams to the upstream, its first bytes kept for the tap."""
    async for chunk in content.iter_chunked(_CHUNK):
        tap.request_data(chunk)
        yield chunk


async def _relay(request: web.Request, session: aiohttp.ClientSession, url: str, tap: Any = None,
                 **kwargs: Any) -> web.StreamResponse:
    body: Any = request.content if request.body_exists else None
    if tap is not None and body is not None and tap.request_body is not None:
        body = _recorded(body, tap)
    async with session.request(request.method, url, headers=_forward_headers(request.headers), data=body,
                               allow_redirects=False, auto_decompress=False, **kwargs) as upstream:
        if tap is not None:
            tap.response_headers = list(upstream.headers.items())
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for k, v in upstream.headers.items():
            if k.lower() not in HOP_BY_HOP:
                response.headers.add(k, v)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(_CHUNK):
            if tap is not None:
                tap.response_data(chunk)
            await response.write(chunk)
        await response.write_eof()
        return response


class _Server:
    def __init__(self, handler: Any) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", handler)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self.port

    async def close(self) -> None:
        await self._runner.cleanup()


_closing: set[asyncio.Task[None]] = set()


def _close_later(session: aiohttp.ClientSession) -> None:
    task = asyncio.ensure_future(session.close())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


class OutboundHttp:
    """The local listener of an HTTP upstream."""

    def __init__(self, outbound: Any, pool: Any) -> None:
        self._out = outbound  # sidecar.outbound.Outbound
        self._pool = pool  # sidecar.outbound.EndpointPool
        self._server = _Server(self._handle)
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
            session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
            self._sessions[creds.generation] = session
        return session

    async def _handle(self, request: web.Request) -> web.StreamResponse:
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
            key = pool.pick()
            if key is None:
                status = "503"
                return web.Response(status=503, text=f"weft: no healthy endpoint of upstream {pool.name}\n")
            ep = pool.endpoints[key]
            creds = out.snapshot().credentials
            t0 = time.perf_counter()
            try:
                response = await _relay(request, self._session(), f"https://{ep.address}:{ep.port}{request.path_qs}",
                                        tap, server_hostname=expected_server_name(pool.name, creds.trust_domain))
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
            out.telemetry.request("outbound", source, pool.name, out.telemetry.method_label(pool.name, route),
                                  status, seconds)
            if tap is not None:
                out.telemetry.tap.finish(tap, status, seconds)
            out.telemetry.access.line(time.monotonic(), direction="outbound", source=source, destination=pool.name,
                                      method=request.method, path=request.path, status=status,
                                      duration_ms=round(seconds * 1000, 3))

    async def close(self, grace: float = 5.0) -> None:
        await self._server.close()
        for session in self._sessions.values():
            await session.close()


class InboundHttp:
    """The internal server of the inbound full path for HTTP services."""

    def __init__(self, inbound: Any) -> None:
        self._in = inbound  # sidecar.inbound.Inbound
        self._server = _Server(self._handle)
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    async def start(self) -> None:
        self.port = await self._server.start("127.0.0.1", 0)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                              timeout=aiohttp.ClientTimeout(total=None))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
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
            decision = authz.decide(snap.policy, ident.uri,
                                    authz.HttpRequest.of(request.method, request.path_qs, dict(request.headers)))
            inbound.telemetry.decision(authz.decision_label(decision), decision.rule_label)
            if not decision.allowed:
                status = "403"
                message = authz.denial_message(decision, source, dest, f" {request.method} {request.path}")
                log.info("denied", source=source, destination=dest, method=request.method, path=request.path,
                         rule=decision.rule_label, reason=decision.reason)
                return web.Response(status=403, text=message + "\n")
            if decision.audited:
                log.warning("audit_would_deny", source=source, destination=dest, method=request.method,
                            path=request.path, rule=decision.rule_label, reason=decision.reason)
            reg = snap.registration
            assert self._session is not None
            try:
                response = await _relay(request, self._session,
                                        f"http://{reg.local_service_address}:{reg.local_service_port}{request.path_qs}",
                                        tap)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                return web.Response(status=502, text=f"weft: the local app failed: {exc}\n")
            status = str(response.status)
            return response
        finally:
            seconds = time.perf_counter() - start
            route = route_label(request.method, request.path)
            inbound.telemetry.request("inbound", source, dest, inbound.telemetry.method_label(dest, route), status,
                                      seconds)
            if tap is not None:
                inbound.telemetry.tap.finish(tap, status, seconds)
            inbound.telemetry.access.line(time.monotonic(), direction="inbound", source=source, destination=dest,
                                          method=request.method, path=request.path, status=status,
                                          duration_ms=round(seconds * 1000, 3))

    async def close(self) -> None:
        await self._server.close()
        if self._session is not None:
            await self._session.close()
