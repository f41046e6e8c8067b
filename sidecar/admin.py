"""The admin API (aiohttp, loopback by default): ``/ready``, ``/live``, ``/metrics``, ``/config``.

- ``/live``: 200 while the process runs its event loop.
- ``/ready``: 200 once a complete snapshot is published and the listeners are up, 503 before that
  and while draining (the body says why).
- ``/metrics``: Prometheus text format (see ``sidecar.telemetry``).
- ``/config``: the current snapshot as JSON: registration, certificate (serial, expiry, PEM of the
  leaf only), policy version, upstreams with endpoints and methods. Never a private key.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from sidecar.snapshot import Snapshot
from sidecar.telemetry import Telemetry


class Admin:
    def __init__(self, snapshot: Callable[[], Snapshot | None], telemetry: Telemetry,
                 ready: Callable[[], tuple[bool, str]], extra: Callable[[], dict[str, Any]] | None = None) -> None:
        self._snapshot = snapshot
        self._telemetry = telemetry
        self._ready = ready
        self._extra = extra
        self._started = time.time()
        app = web.Application()
        app.router.add_get("/ready", self._get_ready)
        app.router.add_get("/live", self._get_live)
        app.router.add_get("/metrics", self._get_metrics)
        app.router.add_get("/config", self._get_config)
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

    async def _get_ready(self, request: web.Request) -> web.Response:
        ok, why = self._ready()
        return web.Response(status=200 if ok else 503, text=why + "\n")

    async def _get_live(self, request: web.Request) -> web.Response:
        return web.Response(text="live\n")

    async def _get_metrics(self, request: web.Request) -> web.Response:
        resp = web.Response(body=self._telemetry.render())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def _get_config(self, request: web.Request) -> web.Response:
        snap = self._snapshot()
        body: dict[str, Any] = {"uptime_seconds": round(time.time() - self._started, 1)}
        if snap is None:
            body["snapshot"] = None
        else:
            body["snapshot"] = snap.describe()
        if self._extra is not None:
            body.update(self._extra())
        return web.Response(text=json.dumps(body, indent=2, sort_keys=True) + "\n", content_type="application/json")
