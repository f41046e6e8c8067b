"""`greeter`: says hello over gRPC (`weft.demo.v1.Greeter`), counting visits in `store`.

It reaches `store` through its sidecar's local upstream port (plaintext to 127.0.0.1; the sidecars
carry the call over mTLS). A failed store call fails the greeting with the store's own status, so a
denial further down the chain is visible at the top.

    python -m weft.demo.greeter -port 19200 -store-addr 127.0.0.1:19202 [-version v2]

With `-version` every answer carries the response metadata `x-greeter-version` (the tour runs a v1
and a v2 instance behind a service-splitter: the frontend shows which one answered).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Sequence

import grpc
import structlog

from weft import logsetup, runner
from weft.demo.common import add_common_arguments, start_grpc_server, upstream_default
from weft.demo.v1 import demo_pb2, demo_pb2_grpc

log = structlog.get_logger("weft.demo.greeter")

MAX_STREAM = 100
STREAM_INTERVAL = 0.05  # seconds between streamed replies
STORE_TIMEOUT = 5.0


class Greeter(demo_pb2_grpc.GreeterServicer):  # type: ignore[misc]
    def __init__(self, store: demo_pb2_grpc.StoreStub, version: str = "") -> None:
        self._store = store
        self._version = version

    async def _announce(self, context: grpc.aio.ServicerContext[object, object]) -> None:
        if self._version:
            await context.send_initial_metadata((("x-greeter-version", self._version),))

    async def _visit(self, name: str, context: grpc.aio.ServicerContext[object, object]) -> int:
        try:
            counter: demo_pb2.Counter = await self._store.Increment(
                demo_pb2.IncrementRequest(key=name, delta=1), timeout=STORE_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            log.warning("store call failed", code=exc.code().name, details=exc.details())
            await context.abort(exc.code(), f"store: {exc.details()}")
        return int(counter.value)

    async def SayHello(self, request: demo_pb2.HelloRequest,
                       context: grpc.aio.ServicerContext[object, object]) -> demo_pb2.HelloReply:
        name = request.name or "world"
        visits = await self._visit(name, context)
        await self._announce(context)
        return demo_pb2.HelloReply(message=f"Hello, {name}!", visits=visits)

    async def SayHelloStream(self, request: demo_pb2.HelloRequest,
                             context: grpc.aio.ServicerContext[object, object]) -> AsyncIterator[demo_pb2.HelloReply]:
        name = request.name or "world"
        count = request.count or 3
        if not 1 <= count <= MAX_STREAM:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"count must be 1..{MAX_STREAM}, got {count}")
        await self._announce(context)
        for i in range(count):
            visits = await self._visit(name, context)
            yield demo_pb2.HelloReply(message=f"Hello, {name}! ({i + 1}/{count})", visits=visits)
            if i + 1 < count:
                await asyncio.sleep(STREAM_INTERVAL)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weft.demo.greeter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, default_port=19200)
    parser.add_argument("-store-addr", "--store-addr", default=upstream_default("STORE_ADDR", "127.0.0.1:19202"),
                        help="host:port of the store upstream: the sidecar's local port (env STORE_ADDR)")
    parser.add_argument("-version", "--version", default="",
                        help="send this version as response metadata x-greeter-version (the tour's canary)")
    args = parser.parse_args(argv)
    logsetup.configure(args.log_level)

    async def serve(stop: asyncio.Event) -> int:
        async with grpc.aio.insecure_channel(args.store_addr) as channel:
            greeter = Greeter(demo_pb2_grpc.StoreStub(channel), args.version)  # type: ignore[no-untyped-call]
            server, _ = await start_grpc_server(
                args.host, args.port, ["Greeter"],
                [lambda s: demo_pb2_grpc.add_GreeterServicer_to_server(greeter, s)])  # type: ignore[no-untyped-call]
            log.info("greeter listening", address=f"{args.host}:{args.port}", store=args.store_addr)
            await stop.wait()
            await server.stop(grace=2)
        return 0

    return runner.run(serve)


if __name__ == "__main__":
    sys.exit(main())
