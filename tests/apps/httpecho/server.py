"""The HTTP/1.1 echo app (aiohttp): answers every method and path with what it received.

Response: JSON `{"instance", "method", "path", "query", "headers", "body", "body_bytes", "peer"}` and the
header `x-echo-instance`. Request headers script it:
- `x-echo-status: NNN` answers with that HTTP status (100..599 are refused below 200);
- `x-echo-delay-ms: N` waits N ms first;
- `x-echo-raw: 1` sends the request body back as is (`application/octet-stream`) instead of JSON.
`GET /healthz` answers 200 `ok` (for Consul HTTP checks).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

MAX_DELAY_MS = 600_000


def _bad(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


class Instance:
    def __init__(self, name: str) -> None:
        self.name = name


NAME = web.AppKey("instance", Instance)


async def _handle(request: web.Request) -> web.StreamResponse:
    name = request.app[NAME].name
    headers = {"x-echo-instance": name}
    status = 200
    if "x-echo-status" in request.headers:
        text = request.headers["x-echo-status"].strip()
        if not text.isdigit() or not 200 <= int(text) <= 599:
            return _bad(f"x-echo-status: expected an HTTP status 200..599, got {text!r}")
        status = int(text)
    if "x-echo-delay-ms" in request.headers:
        text = request.headers["x-echo-delay-ms"].strip()
        if not text.isdigit() or int(text) > MAX_DELAY_MS:
            return _bad(f"x-echo-delay-ms: expected 0..{MAX_DELAY_MS}, got {text!r}")
        await asyncio.sleep(int(text) / 1000)
    body = await request.read()
    if request.headers.get("x-echo-raw") == "1":
        return web.Response(body=body, status=status, headers=headers, content_type="application/octet-stream")
    peer = request.transport.get_extra_info("peername") if request.transport else None
    doc: dict[str, Any] = {
        "instance": name, "method": request.method, "path": request.path, "query": dict(request.query),
        "headers": dict(request.headers), "body": body.decode("utf-8", "replace"), "body_bytes": len(body),
        "peer": f"{peer[0]}:{peer[1]}" if peer else "",
    }
    return web.json_response(doc, status=status, headers=headers)


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok", headers={"x-echo-instance": request.app[NAME].name})


def make_app(name: str) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[NAME] = Instance(name)
    app.router.add_get("/healthz", _healthz)
    app.router.add_route("*", "/{tail:.*}", _handle)
    return app


async def start(port: int = 0, *, name: str | None = None, host: str = "127.0.0.1") -> tuple[web.AppRunner, int]:
    """Start the app; returns (runner, bound port). Stop it with `await runner.cleanup()`."""
    app = make_app(name or "httpecho")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound = int(runner.addresses[0][1])
    if name is None:
        app[NAME].name = f"httpecho-{bound}"  # the default name is the port, known only now
    return runner, bound


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from weft.runner import run

    parser = argparse.ArgumentParser(prog="python -m tests.apps.httpecho", description="HTTP/1.1 echo test app")
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default=None, help="instance name (default httpecho-PORT)")
    args = parser.parse_args(argv)

    async def _main(stop: asyncio.Event) -> int:
        runner, port = await start(args.port, name=args.name, host=args.host)
        print(json.dumps({"event": "listening", "app": "httpecho", "port": port}), flush=True)
        await stop.wait()
        await runner.cleanup()
        return 0

    return run(_main)


if __name__ == "__main__":
    sys.exit(main())
