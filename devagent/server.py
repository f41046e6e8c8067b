"""The dev agent's aiohttp application: endpoint discovery, Consul's error and header conventions, run.

Endpoint modules are the ``devagent/api_*.py`` files, found at start-up (see the package
docstring). Every endpoint is served through the dispatcher ``_make_dispatch`` builds: it answers
OPTIONS and wrong methods (405 with ``Allow``), turns exceptions into Consul's plain-text error
answers (so a bad request ends only that request), adds the headers every Consul answer carries,
and with ``-data-dir`` holds the answer until the journal is on disk. Unmatched paths get an empty
404 from a catch-all route.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import os
import pkgutil
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

import structlog
from aiohttp import web

import devagent
from devagent import acl, logstream, telemetry
from devagent.agent import Agent, AgentConfig
from devagent.codec import DecodeError
from devagent.http import Endpoint, HTTPError, Req, text_response

log = structlog.get_logger("weft.devagent")

AGENT_KEY: web.AppKey[Agent] = web.AppKey("agent", Agent)
SHUTDOWN_TIMEOUT = 2.0  # seconds in-flight requests get at shutdown
STOP_DEADLINE = 15.0  # seconds after a stop request at which a shutdown that hangs is cut short
EXIT_STUCK = 70  # the exit status then (EX_SOFTWARE)
UI_DISABLED = ("Consul Agent: UI disabled. To enable, set ui_config.enabled=true in the agent configuration "
               "and restart.")


def endpoint_modules() -> list[ModuleType]:
    """Every ``devagent.api_*`` module, sorted by name."""
    mods = []
    for info in sorted(pkgutil.iter_modules(devagent.__path__), key=lambda i: i.name):
        if info.name.startswith("api_"):
            mods.append(importlib.import_module(f"devagent.{info.name}"))
    return mods


def _acl_policy_header(agent: Agent) -> str:
    return agent.config.acl_default_policy if agent.config.acl_enabled else "allow"


def _make_dispatch(agent: Agent, endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    methods = {m.upper(): h for m, h in endpoint.methods.items()}
    allow = ",".join(["OPTIONS", *methods])
    policy = _acl_policy_header(agent)
    route = telemetry.route_label(endpoint.path)

    async def answer(request: web.Request) -> web.StreamResponse:
        if request.method == "OPTIONS":
            return web.Response(status=200, headers={"Allow": allow})
        handler = methods.get(request.method)
        if handler is None:
            return text_response(f"method {request.method} not allowed", 405, {"Allow": allow})
        r = Req(request, agent)
        try:
            resp = await handler(r)
            if not isinstance(resp, web.StreamResponse):
                raise TypeError(f"handler for {endpoint.path} returned {type(resp).__name__}")
            return resp
        except HTTPError as exc:
            return text_response(exc.reason, exc.status, exc.headers)
        except DecodeError as exc:
            return text_response(str(exc), 400)
        except (acl.PermissionDenied, acl.ACLNotFound) as exc:
            return text_response(str(exc), 403)
        except (asyncio.CancelledError, web.HTTPException):
            raise
        except Exception as exc:
            log.error("request failed", method=request.method, path=request.path, error=repr(exc),
                      trace=traceback.format_exc(limit=8))
            return text_response(str(exc) or type(exc).__name__, 500)

    async def dispatch(request: web.Request) -> web.StreamResponse:
        """Every answer carries ``X-Consul-Default-ACL-Policy``, as Consul's do, and leaves only once
        the journal (with -data-dir) holds on disk every write the answer may reflect."""
        started = time.monotonic()
        resp = await answer(request)
        # Consul's consul.api.http timing sample (milliseconds), labelled by method and route
        agent.metrics.sample("consul.api.http", time.time(), (time.monotonic() - started) * 1000.0,
                             {"method": request.method, "path": route})
        headers = resp.headers
        headers.setdefault("X-Consul-Default-Acl-Policy", policy)
        headers.setdefault("Vary", "Accept-Encoding")  # Consul's gzip handler always says so
        durable = agent.durable
        if durable is not None:
            try:
                await durable()
            except OSError as exc:
                log.error("journal fsync failed", error=repr(exc))
                return text_response(f"failed to persist the write: {exc}", 500)
        return resp

    return dispatch


def _make_not_found(agent: Agent) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    policy = _acl_policy_header(agent)

    async def not_found(request: web.Request) -> web.StreamResponse:
        """Unknown paths answer an empty 404, as Consul's index handler does."""
        return web.Response(status=404, headers={"X-Consul-Default-Acl-Policy": policy})

    return not_found


async def _index(request: web.Request) -> web.StreamResponse:
    agent = request.app[AGENT_KEY]
    return text_response(UI_DISABLED, 200, {"X-Consul-Default-Acl-Policy": _acl_policy_header(agent)})


def make_app(agent: Agent, modules: list[ModuleType] | None = None) -> web.Application:
    """The aiohttp application serving every endpoint module's routes for ``agent``."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[AGENT_KEY] = agent
    seen: dict[str, str] = {}
    for mod in modules if modules is not None else endpoint_modules():
        routes = getattr(mod, "routes", None)
        if routes is None:
            continue
        for endpoint in routes(agent):
            if endpoint.path in seen:
                raise RuntimeError(f"{endpoint.path} is served by both {seen[endpoint.path]} and {mod.__name__}")
            seen[endpoint.path] = mod.__name__
            app.router.add_route("*", endpoint.path, _make_dispatch(agent, endpoint))
    app.router.add_route("GET", "/", _index)
    app.router.add_route("*", "/{tail:.*}", _make_not_found(agent))  # last: anything unmatched
    return app


async def start(config: AgentConfig) -> tuple[Agent, web.AppRunner]:
    """Build the agent, load its data dir, start its modules and serve HTTP; returns (agent, runner)."""
    from devagent import persist  # local: persistence is optional

    modules = endpoint_modules()
    agent = Agent(config)
    logstream.install(agent.logs, config.log_level)  # before anything logs: /v1/agent/monitor sees it all
    for mod in modules:
        setup: Callable[[Agent], None] | None = getattr(mod, "setup", None)
        if setup is not None:
            setup(agent)
    if config.data_dir:
        persist.attach(agent, config.data_dir)
    agent.ensure_local_node()
    for mod in modules:
        start_fn: Callable[[Agent], Awaitable[None]] | None = getattr(mod, "start", None)
        if start_fn is not None:
            await start_fn(agent)
    app = make_app(agent, modules)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    site = web.TCPSite(runner, config.client_addr, config.http_port, reuse_address=True)
    await site.start()
    return agent, runner


async def serve(config: AgentConfig, stop: asyncio.Event, on_ready: Callable[[int], Any] | None = None) -> int:
    """Serve until ``stop`` is set. ``on_ready(port)`` runs once the HTTP port accepts connections."""
    agent, runner = await start(config)
    agent.request_stop = stop.set
    gc.collect()
    gc.freeze()  # start-up objects (modules, loaded state) leave the collector's working set
    port = config.http_port
    for site in runner.sites:
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            port = int(server.sockets[0].getsockname()[1])
    if on_ready is not None:
        on_ready(port)
    try:
        await stop.wait()
    finally:
        watchdog = _shutdown_watchdog(STOP_DEADLINE)
        try:
            agent.store.close_watches()  # blocking queries answer now instead of holding the shutdown
            await runner.cleanup()
            await agent.stop()
        finally:
            watchdog.cancel()
    return 0


def _shutdown_watchdog(deadline: float) -> threading.Timer:
    """The last resort of a stop request: if the shutdown has not finished after ``deadline``
    seconds (a stop hook that never returns, a task that ignores cancellation, an event loop
    that no longer turns and so no longer sees signals), log it and leave at once. Acknowledged
    writes are already on disk (with -data-dir), so nothing acknowledged is lost."""

    def expire() -> None:
        log.error("shutdown did not finish in time; exiting now", deadline_s=deadline)
        os._exit(EXIT_STUCK)

    timer = threading.Timer(deadline, expire)
    timer.daemon = True
    timer.name = "devagent-shutdown-watchdog"
    timer.start()
    return timer
