"""The dashboard's aiohttp app: the page, a JSON overview refreshed in the background, intentions and
the "would this call be allowed?" check, and the live tap of a service as Server-Sent Events.

It reads Consul (catalog, health, KV intentions and compiled tables, native intentions) and the
sidecars' admin APIs (``/metrics`` for golden metrics, certificate expiry and policy version;
``/tap`` for live calls, redacted by the sidecars). It holds no private key and writes nothing.

Routes:
- ``GET /``: the page; ``/static/*`` its script and style.
- ``GET /api/overview``: ``{"topology", "services", "intentions", "problems", "updated"}``.
- ``POST /api/check``: ``{"source", "destination", "grpc_method"?, "http_method"?, "path"?,
  "headers"?}`` -> the decision of ``policies.evaluate.authorize`` on the table the destination's
  sidecars enforce (as ``weft intention check``).
- ``GET /api/tap?service=S&payload=1&method=&source=&to=``: ``text/event-stream``, one event per call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from devmesh.state import ConsulChoice, admin_urls
from weft.ui import model

log = structlog.get_logger("weft.ui")
STATIC = Path(__file__).parent / "static"
MAX_CHECK_BODY = 16 * 1024


class Dashboard:
    """Keeps the latest overview (refreshed every ``interval`` seconds) and answers the page."""

    def __init__(self, consul: ConsulChoice, *, interval: float = 2.0) -> None:
        self.consul = consul
        self.interval = interval
        self.overview: dict[str, Any] = {"topology": {"nodes": [], "edges": []}, "services": [], "intentions": {},
                                         "problems": ["collecting..."], "updated": None}
        self._prev: list[Any] = []
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    # -- background refresh ------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _loop(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            while not self._stop.is_set():
                try:
                    await self.refresh(session)
                except Exception as exc:  # Consul away, a bug in one round: show it, keep the last view
                    log.warning("refresh_failed", error=str(exc)[:300])
                    self.overview = {**self.overview, "problems": [f"refresh failed: {type(exc).__name__}: {exc}"]}
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.interval)

    async def refresh(self, session: Any) -> None:
        from catalog.client import ConsulClient
        from weft.cmd_intention import list_rows, read_sources
        from weft.cmd_status import collect
        from weft.cmd_top import discover_targets, edge_stats, scrape_all

        targets, problems = await discover_targets(admin_urls(self.consul), self.consul.env)
        cur, errors = await scrape_all(session, [t.url for t in targets])
        stats = edge_stats(self._prev, cur) if self._prev else []
        self._prev = cur
        declared: set[tuple[str, str]] = set()
        async with ConsulClient.from_env(self.consul.env) as consul:
            _, services = await consul.catalog_services()
            for name in services:
                if not name.endswith("-sidecar-proxy"):
                    continue
                _, instances = await consul.health_service(name, passing=False)
                for inst in instances:
                    if inst.proxy is not None:
                        for up in inst.proxy.upstreams:
                            declared.add((inst.proxy.destination_service_name, up.destination_name))
            rows, intention_problems = list_rows(await read_sources(consul), None)
        report = await collect(self.consul)
        names = {s for s in services if not s.endswith("-sidecar-proxy")}
        self.overview = {
            "topology": model.topology(names, declared, stats),
            "services": model.services_view(report),
            "intentions": model.intentions_by_destination(rows),
            "problems": problems + errors + report.problems + intention_problems,
            "updated": time.time(),
            "interval": self.interval,
        }

    # -- handlers ----------------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def get_overview(self, request: web.Request) -> web.Response:
        return web.json_response(self.overview, headers={"Cache-Control": "no-store"})

    async def post_check(self, request: web.Request) -> web.Response:
        from catalog.client import ConsulClient, ConsulError
        from policies.evaluate import authorize
        from weft.cmd_intention import IntentionError, find_table, parse_request

        if (request.content_length or 0) > MAX_CHECK_BODY:
            return web.json_response({"error": "request body too large"}, status=413)
        try:
            body = json.loads(await request.read())
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object")
            source, destination = str(body.get("source") or ""), str(body.get("destination") or "")
            if not source or not destination:
                raise ValueError("source and destination are required")
            headers = body.get("headers") or {}
            if not isinstance(headers, dict):
                raise ValueError("headers must be an object of name: value")
            args = argparse.Namespace(header=[f"{k}={v}" for k, v in headers.items()],
                                      grpc_method=body.get("grpc_method") or None,
                                      http_method=body.get("http_method") or None, path=body.get("path") or None)
            req = parse_request(args)
            async with ConsulClient.from_env(self.consul.env) as consul:
                table, where = await find_table(consul, destination, "deny")
        except (ValueError, IntentionError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except ConsulError as exc:
            return web.json_response({"error": f"Consul: {exc}"}, status=502)
        decision = authorize(table, source, req)
        return web.json_response({**decision.to_json(), "Table": where, "TableVersion": table.version})

    async def get_tap(self, request: web.Request) -> web.StreamResponse:
        import aiohttp

        from sidecar.tap import TapError, TapFilter, filter_query, parse_filter
        from weft.cmd_tap import find_sidecars

        q = request.query
        service = q.get("service", "")
        try:
            flt = parse_filter(filter_query(TapFilter(
                source=q.get("source") or None, destination=q.get("to") or None, method=q.get("method") or None,
                direction=q.get("direction") or None, payload=q.get("payload") in ("1", "true"))))  # default max_rps
            if not service:
                raise TapError("service is required")
        except TapError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        from catalog.client import ConsulError

        try:
            urls, problems = await find_sidecars(service, self.consul)
        except ConsulError as exc:
            return web.json_response({"error": f"Consul: {exc}"}, status=502)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        await resp.prepare(request)

        async def event(kind: str, data: Any) -> None:
            await resp.write(f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode())

        await event("hello", {"service": service, "sidecars": urls, "problems": problems})
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=1000)

        async def pump(session: aiohttp.ClientSession, url: str) -> None:
            try:
                async with session.get(f"{url}/tap?{filter_query(flt)}",
                                       timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)) as r:
                    if r.status != 200:
                        await queue.put(("problem", f"{url}/tap answered {r.status}"))
                        return
                    async for raw in r.content:
                        with contextlib.suppress(ValueError):
                            await queue.put(("call", {**json.loads(raw), "sidecar": url}))
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                await queue.put(("problem", f"{url}: {type(exc).__name__}: {exc}"))

        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.ensure_future(pump(session, u)) for u in urls]
            try:
                while True:
                    try:
                        kind, data = await asyncio.wait_for(queue.get(), 15)
                    except TimeoutError:
                        await resp.write(b": keep-alive\n\n")  # also finds out when the browser left
                        continue
                    await event(kind, data)
            except (ConnectionResetError, asyncio.CancelledError):
                pass  # the browser closed the tap
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return resp


def allowed_host(host_header: str, bound_host: str) -> bool:
    """Whether a request's Host names this server: loopback names, or the address it was told to bind.

    A page on another site that rebinds its DNS name to 127.0.0.1 sends its own name as Host: refused,
    so that it cannot read live calls (payloads included) from a dashboard on loopback."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host in ("127.0.0.1", "localhost", "::1") or (bool(bound_host) and host == bound_host.lower()
                                                          and bound_host not in ("0.0.0.0", "::"))


def make_app(dashboard: Dashboard, bound_host: str = "127.0.0.1") -> web.Application:
    @web.middleware
    async def only_our_host(request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if not allowed_host(request.headers.get("Host", ""), bound_host) and bound_host not in ("0.0.0.0", "::"):
            return web.Response(status=403, text="weft ui: unexpected Host header\n")
        return await handler(request)

    app = web.Application(client_max_size=MAX_CHECK_BODY, middlewares=[only_our_host])
    app.router.add_get("/", dashboard.index)
    app.router.add_get("/api/overview", dashboard.get_overview)
    app.router.add_post("/api/check", dashboard.post_check)
    app.router.add_get("/api/tap", dashboard.get_tap)
    app.router.add_static("/static/", STATIC)

    async def on_startup(_: web.Application) -> None:
        await dashboard.start()

    async def on_cleanup(_: web.Application) -> None:
        await dashboard.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
