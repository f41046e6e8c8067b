"""`store`: a tiny in-memory counter store over gRPC (`weft.demo.v1.Store`).

    python -m weft.demo.store -port 19300
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import grpc
import structlog

from weft import logsetup, runner
from weft.demo.common import add_common_arguments, start_grpc_server
from weft.demo.v1 import demo_pb2, demo_pb2_grpc

log = structlog.get_logger("weft.demo.store")

MAX_KEY = 256


class Store(demo_pb2_grpc.StoreServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self._values: dict[str, int] = {}

    async def Increment(self, request: demo_pb2.IncrementRequest,
                        context: grpc.aio.ServicerContext[object, object]) -> demo_pb2.Counter:
        key = _valid_key(request.key)
        if key is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"key must be 1..{MAX_KEY} characters")
        delta = request.delta or 1
        value = self._values.get(request.key, 0) + delta
        self._values[request.key] = value
        return demo_pb2.Counter(key=request.key, value=value)

    async def Get(self, request: demo_pb2.GetRequest,
                  context: grpc.aio.ServicerContext[object, object]) -> demo_pb2.Counter:
        if _valid_key(request.key) is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"key must be 1..{MAX_KEY} characters")
        return demo_pb2.Counter(key=request.key, value=self._values.get(request.key, 0))


def _valid_key(key: str) -> str | None:
    return key if 0 < len(key) <= MAX_KEY else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weft.demo.store", description=__doc__)
    add_common_arguments(parser, default_port=19300)
    args = parser.parse_args(argv)
    logsetup.configure(args.log_level)

    async def serve(stop: asyncio.Event) -> int:
        store = Store()
        server, _ = await start_grpc_server(
            args.host, args.port, ["Store"], [lambda s: demo_pb2_grpc.add_StoreServicer_to_server(store, s)])  # type: ignore[no-untyped-call]
        log.info("store listening", address=f"{args.host}:{args.port}")
        await stop.wait()
        await server.stop(grace=2)
        return 0

    return runner.run(serve)


if __name__ == "__main__":
    sys.exit(main())
