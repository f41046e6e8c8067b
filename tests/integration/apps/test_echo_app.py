"""The echo gRPC app in-process on loopback: every RPC kind and every scripted behaviour."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.apps.echo import echo_pb2, echo_pb2_grpc, server

pytestmark = pytest.mark.integration


@pytest.fixture
async def stub() -> AsyncIterator[echo_pb2_grpc.EchoStub]:
    srv, port, _ = await server.start(0, name="inst-a")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
    await srv.stop(None)


async def test_unary_echoes_and_names_instance(stub: echo_pb2_grpc.EchoStub) -> None:
    call = stub.Unary(echo_pb2.EchoRequest(payload=b"\x00hi", text="t", sequence=7),
                      metadata=(("x-trace", "abc"), ("x-blob-bin", b"\x01\x02")))
    response = await call
    assert (response.payload, response.text, response.sequence) == (b"\x00hi", "t", 7)
    assert response.instance == "inst-a" and response.method == "Unary"
    assert response.metadata["x-trace"] == "abc" and response.peer
    initial = dict(await call.initial_metadata())
    assert initial["x-trace"] == "abc" and initial["x-blob-bin"] == b"\x01\x02"
    assert initial["x-echo-instance"] == "inst-a"
    assert dict(await call.trailing_metadata())["x-echo-trailer"] == "ok"


async def test_scripted_status_with_trailers(stub: echo_pb2_grpc.EchoStub) -> None:
    call = stub.Unary(echo_pb2.EchoRequest(), metadata=(("x-echo-status", "PERMISSION_DENIED:go away"),))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and info.value.details() == "go away"
    trailers: dict[str, Any] = dict(cast(Any, info.value.trailing_metadata()) or ())
    assert trailers["x-echo-trailer"] == "go away" and trailers["x-echo-detail-bin"] == b"go away"
    assert trailers["x-echo-instance"] == "inst-a"


async def test_bad_script_is_invalid_argument(stub: echo_pb2_grpc.EchoStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Unary(echo_pb2.EchoRequest(), metadata=(("x-echo-count", "many"),))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "x-echo-count" in (info.value.details() or "")


async def test_delay_meets_deadline(stub: echo_pb2_grpc.EchoStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Unary(echo_pb2.EchoRequest(), metadata=(("x-echo-delay-ms", "2000"),), timeout=0.2)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_server_stream_count_then_status(stub: echo_pb2_grpc.EchoStub) -> None:
    got = [r.sequence async for r in stub.ServerStream(echo_pb2.EchoRequest(sequence=10, response_size=5),
                                                          metadata=(("x-echo-count", "3"),))]
    assert got == [10, 11, 12]
    call = stub.ServerStream(echo_pb2.EchoRequest(), metadata=(("x-echo-count", "2"), ("x-echo-status", "ABORTED")))
    seen = 0
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            seen += 1
    assert seen == 2 and info.value.code() == grpc.StatusCode.ABORTED


async def test_client_stream_counts(stub: echo_pb2_grpc.EchoStub) -> None:
    async def requests() -> AsyncIterator[echo_pb2.EchoRequest]:
        for i in range(4):
            yield echo_pb2.EchoRequest(payload=bytes([i]), sequence=i)

    response = await stub.ClientStream(requests())
    assert response.received == 4 and response.payload == b"\x00\x01\x02\x03" and response.sequence == 3


async def test_bidi_echoes_each_and_aborts_after(stub: echo_pb2_grpc.EchoStub) -> None:
    call = stub.Bidi(metadata=(("x-echo-count", "2"),))
    for i in range(3):
        await call.write(echo_pb2.EchoRequest(sequence=i))
        assert [(await call.read()).sequence for _ in range(2)] == [i, i]
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK

    call = stub.Bidi(metadata=(("x-echo-status", "RESOURCE_EXHAUSTED:full"), ("x-echo-status-after", "1")))
    await call.write(echo_pb2.EchoRequest(sequence=5))
    assert (await call.read()).sequence == 5
    assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and await call.details() == "full"


async def test_health_and_reflection() -> None:
    srv, port, _ = await server.start(0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=server.SERVICE_NAME))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            call = refl.ServerReflectionInfo()
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            listed = {s.name for s in (await call.read()).list_services_response.service}
            await call.done_writing()
            assert server.SERVICE_NAME in listed
    finally:
        await srv.stop(None)
