"""`frontend`: a small HTTP app (aiohttp) that calls `greeter` through its sidecar.

    GET /hello?name=ada           one unary SayHello            -> {"message": ..., "visits": N[, "version": V]}
    GET /stream?name=ada&count=3  one server-streaming call      -> {"messages": [...], "visits": N}
    GET /healthz                  health check (does not call greeter)

A failed greeter call answers with the gRPC status mapped to HTTP (PERMISSION_DENIED -> 403,
UNAVAILABLE -> 503, DEADLINE_EXCEEDED -> 504, INVALID_ARGUMENT -> 400, anything else -> 502) and a
JSON body {"error": CODE, "detail": message}, so a denial by an intention shows up as a 403.

A request header `x-canary` is passed on to greeter as gRPC metadata (a service-router can route on
it), and the greeter instance's version (its `x-greeter-version` response metadata, when it sends
one) is shown as "version": the tour's canary is visible in the answers.

    python -m weft.demo.frontend -port 19100 -greeter-addr 127.0.0.1:19101
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator, Sequence

import grpc
import structlog
from aiohttp import web

from weft import logsetup, runner
from weft.demo.common import upstream_default
from weft.demo.v1 import demo_pb2, demo_pb2_grpc

log = structlog.get_logger("weft.demo.frontend")

GREETER_TIMEOUT = 5.0
_HTTP_STATUS = {
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
GREETER_KEY = web.AppKey("greeter", demo_pb2_grpc.GreeterStub)


def http_status_for(code: grpc.StatusCode) -> int:
    return _HTTP_STATUS.get(code, 502)


def _error(exc: grpc.aio.AioRpcError) -> web.Response:
    log.warning("greeter call failed", code=exc.code().name, details=exc.details())
    return web.json_response({"error": exc.code().name, "detail": exc.details() or ""},
                             status=http_status_for(exc.code()))


def _name(request: web.Request) -> str:
    name = request.query.get("name", "world")
    if not 0 < len(name) <= 64:
        raise web.HTTPBadRequest(text="name must be 1..64 characters\n")
    return name


FORWARDED_HEADERS = ("x-canary",)
VERSION_KEY = "x-greeter-version"


def _metadata(request: web.Request) -> tuple[tuple[str, str], ...]:
    return tuple((h, request.headers[h][:128]) for h in FORWARDED_HEADERS if h in request.headers)


async def hello(request: web.Request) -> web.Response:
    greeter = request.app[GREETER_KEY]
    try:
        call = greeter.SayHello(demo_pb2.HelloRequest(name=_name(request)), timeout=GREETER_TIMEOUT,
                                metadata=_metadata(request))
        reply: demo_pb2.HelloReply = await call
        initial = await call.initial_metadata()
    except grpc.aio.AioRpcError as exc:
        return _error(exc)
    body: dict[str, object] = {"message": reply.message, "visits": reply.visits}
    version = dict(initial or ()).get(VERSION_KEY)
    if version:
        body["version"] = str(version)
    return web.json_response(body)


async def stream(request: web.Request) -> web.Response:
    greeter = request.app[GREETER_KEY]
    try:
        count = int(request.query.get("count", "3"))
    except ValueError:
        raise web.HTTPBadRequest(text="count must be an integer\n") from None
    messages: list[str] = []
    visits = 0
    try:
        call = greeter.SayHelloStream(demo_pb2.HelloRequest(name=_name(request), count=count),
                                      timeout=GREETER_TIMEOUT)
        async for reply in call:
            messages.append(reply.message)
            visits = reply.visits
    except grpc.aio.AioRpcError as exc:
        return _error(exc)
    return web.json_response({"messages": messages, "visits": visits})


async def healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def index(_: web.Request) -> web.Response:
    return web.Response(text="weft demo frontend: try /hello?name=ada or /stream?name=ada&count=3\n")


def make_app(greeter_addr: str) -> web.Application:
    app = web.Application()

    async def channel_ctx(app: web.Application) -> AsyncIterator[None]:
        channel = grpc.aio.insecure_channel(greeter_addr)
        app[GREETER_KEY] = demo_pb2_grpc.GreeterStub(channel)  # type: ignore[no-untyped-call]
        yield
        await channel.close(None)

    app.cleanup_ctx.append(channel_ctx)
    app.router.add_get("/", index)
    app.router.add_get("/hello", hello)
    app.router.add_get("/stream", stream)
    app.router.add_get("/healthz", healthz)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weft.demo.frontend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-port", "--port", type=int, default=19100, help="HTTP port (default 19100)")
    parser.add_argument("-host", "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("-greeter-addr", "--greeter-addr",
                        default=upstream_default("GREETER_ADDR", "127.0.0.1:19101"),
                        help="host:port of the greeter upstream: the sidecar's local port (env GREETER_ADDR)")
    parser.add_argument("-log-level", "--log-level", default=os.environ.get("WEFT_LOG_LEVEL", "info"))
    args = parser.parse_args(argv)
    logsetup.configure(args.log_level)

    async def serve(stop: asyncio.Event) -> int:
        runner_ = web.AppRunner(make_app(args.greeter_addr), access_log=None)
        await runner_.setup()
        site = web.TCPSite(runner_, args.host, args.port)
        await site.start()
        log.info("frontend listening", address=f"{args.host}:{args.port}", greeter=args.greeter_addr)
        await stop.wait()
        await runner_.cleanup()
        return 0

    return runner.run(serve)


if __name__ == "__main__":
    sys.exit(main())
