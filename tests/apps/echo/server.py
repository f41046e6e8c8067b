"""The echo gRPC app: grpc.aio server with reflection and grpc.health.v1; behaviour from metadata.

See `tests.apps.echo.script` for the metadata keys that script a call.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tests.apps.echo import echo_pb2, echo_pb2_grpc, script

SERVICE_NAME = echo_pb2.DESCRIPTOR.services_by_name["Echo"].full_name
_CODES: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}
Metadata = list[tuple[str, str | bytes]]


def _request_metadata(context: grpc.aio.ServicerContext[Any, Any]) -> Metadata:
    return [(str(k), v) for k, v in (context.invocation_metadata() or ())]


class EchoServicer(echo_pb2_grpc.EchoServicer):
    def __init__(self, name: str) -> None:
        self.name = name

    async def _begin(self, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[script.Script, Metadata]:
        md = _request_metadata(context)
        try:
            plan = script.parse(md)
        except script.ScriptError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc),
                                trailing_metadata=((script.INSTANCE_KEY, self.name),))
            raise AssertionError("unreachable") from None  # abort raises
        await context.send_initial_metadata([*script.echoed(md), (script.INSTANCE_KEY, self.name)])
        return plan, md

    async def _abort(self, context: grpc.aio.ServicerContext[Any, Any], status: script.Status) -> None:
        trailers = ((script.INSTANCE_KEY, self.name), (script.TRAILER_KEY, status.message),
                    (script.DETAIL_BIN_KEY, status.message.encode()))
        await context.abort(_CODES[status.code], status.message, trailing_metadata=trailers)

    def _finish(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        context.set_trailing_metadata(((script.INSTANCE_KEY, self.name), (script.TRAILER_KEY, "ok")))

    @staticmethod
    async def _delay(plan: script.Script) -> None:
        if plan.delay_ms:
            await asyncio.sleep(plan.delay_ms / 1000)

    def _response(self, request: echo_pb2.EchoRequest, method: str, received: int, md: Metadata,
                  context: grpc.aio.ServicerContext[Any, Any]) -> echo_pb2.EchoResponse:
        payload = b"x" * request.response_size if request.response_size > 0 else request.payload
        return echo_pb2.EchoResponse(payload=payload, text=request.text, sequence=request.sequence,
                                     instance=self.name, method=method, received=received,
                                     metadata=script.text_metadata(md), peer=context.peer())

    async def Unary(self, request: echo_pb2.EchoRequest,
                    context: grpc.aio.ServicerContext[Any, Any]) -> echo_pb2.EchoResponse:
        plan, md = await self._begin(context)
        await self._delay(plan)
        if plan.status is not None:
            await self._abort(context, plan.status)
        self._finish(context)
        return self._response(request, "Unary", 1, md, context)

    async def ServerStream(self, request: echo_pb2.EchoRequest,
                           context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[echo_pb2.EchoResponse]:
        plan, md = await self._begin(context)
        for i in range(plan.count):
            await self._delay(plan)
            response = self._response(request, "ServerStream", 1, md, context)
            response.sequence = request.sequence + i
            yield response
        if plan.status is not None:
            if plan.count == 0:
                await self._delay(plan)
            await self._abort(context, plan.status)
        self._finish(context)

    async def ClientStream(self, request_iterator: AsyncIterator[echo_pb2.EchoRequest],
                           context: grpc.aio.ServicerContext[Any, Any]) -> echo_pb2.EchoResponse:
        plan, md = await self._begin(context)
        await self._delay(plan)
        if plan.status is not None:
            await self._abort(context, plan.status)
        received = 0
        payload = bytearray()
        last = echo_pb2.EchoRequest()
        async for request in request_iterator:
            received += 1
            payload += request.payload
            last = request
        self._finish(context)
        response = self._response(last, "ClientStream", received, md, context)
        if last.response_size <= 0:
            response.payload = bytes(payload)
        return response

    async def Bidi(self, request_iterator: AsyncIterator[echo_pb2.EchoRequest],
                   context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[echo_pb2.EchoResponse]:
        plan, md = await self._begin(context)
        if plan.status is not None and plan.status_after == 0:
            await self._delay(plan)
            await self._abort(context, plan.status)
        received = 0
        async for request in request_iterator:
            received += 1
            for _ in range(plan.count):
                await self._delay(plan)
                yield self._response(request, "Bidi", received, md, context)
            if plan.status is not None and received >= plan.status_after:
                await self._abort(context, plan.status)
        self._finish(context)


async def start(port: int = 0, *, name: str | None = None, host: str = "127.0.0.1",
                max_message_bytes: int = 16 * 1024 * 1024) -> tuple[grpc.aio.Server, int, Any]:
    """Start an echo server; returns (server, bound port, health servicer). Stop it with `server.stop`."""
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"echo: cannot listen on {host}:{port}")
    echo_pb2_grpc.add_EchoServicer_to_server(  # type: ignore[no-untyped-call]
        EchoServicer(name or f"echo-{bound}"), server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


async def serve(args: Any, stop: asyncio.Event) -> int:
    server, port, health_servicer = await start(args.port, name=args.name, host=args.host,
                                                max_message_bytes=args.max_message_bytes)
    print(json.dumps({"event": "listening", "app": "echo", "port": port, "name": args.name or f"echo-{port}"}),
          flush=True)
    await stop.wait()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=1.0)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from weft.runner import run

    parser = argparse.ArgumentParser(prog="python -m tests.apps.echo", description="gRPC echo test app")
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--name", default=None, help="instance name put in every response (default echo-PORT)")
    parser.add_argument("--max-message-bytes", type=int, default=16 * 1024 * 1024)
    args = parser.parse_args(argv)

    async def _main(stop: asyncio.Event) -> int:
        return await serve(args, stop)

    return run(_main)


if __name__ == "__main__":
    sys.exit(main())
