"""The demo apps on their own (no sidecars): the chain works, errors map to HTTP, health and reflection answer."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import Proc, free_port, http_ok, wait_for
from weft.demo.v1 import demo_pb2, demo_pb2_grpc

pytestmark = pytest.mark.integration


def _get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


@pytest.fixture(scope="module")
def chain() -> Iterator[dict[str, int]]:
    ports = {"store": free_port(), "greeter": free_port(), "frontend": free_port()}
    py = [sys.executable, "-m"]
    procs = [
        Proc([*py, "weft.demo.store", "-port", str(ports["store"])]),
        Proc([*py, "weft.demo.greeter", "-port", str(ports["greeter"]),
              "-store-addr", f"127.0.0.1:{ports['store']}"]),
        Proc([*py, "weft.demo.frontend", "-port", str(ports["frontend"]),
              "-greeter-addr", f"127.0.0.1:{ports['greeter']}"]),
    ]
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{ports['frontend']}/healthz"), timeout=30, what="frontend")
        yield ports
    finally:
        for p in procs:
            p.stop()


def test_hello_and_stream_through_the_chain(chain: dict[str, int]) -> None:
    base = f"http://127.0.0.1:{chain['frontend']}"
    wait_for(lambda: _get(base + "/hello?name=zoe")[0] == 200, timeout=30, what="greeter and store")
    status, body = _get(base + "/hello?name=ada")
    assert status == 200 and body == {"message": "Hello, ada!", "visits": 1}
    status, body = _get(base + "/stream?name=ada&count=4")
    assert status == 200
    assert body["messages"] == [f"Hello, ada! ({i}/4)" for i in range(1, 5)]
    assert body["visits"] == 5  # one visit per streamed reply, counted by the store


def test_errors_map_to_http_statuses(chain: dict[str, int]) -> None:
    base = f"http://127.0.0.1:{chain['frontend']}"
    status, body = _get(base + "/stream?name=ada&count=500")
    assert status == 400 and body["error"] == "INVALID_ARGUMENT"
    assert "count must be 1..100" in str(body["detail"])


def test_health_and_reflection(chain: dict[str, int]) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    for name, service in (("greeter", "weft.demo.v1.Greeter"), ("store", "weft.demo.v1.Store")):
        with grpc.insecure_channel(f"127.0.0.1:{chain[name]}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            [answer] = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
                list_services="")]), timeout=10))
            names = {s.name for s in answer.list_services_response.service}
            assert service in names and "grpc.health.v1.Health" in names


def test_store_rejects_empty_keys(chain: dict[str, int]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{chain['store']}") as channel:
        store = demo_pb2_grpc.StoreStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as err:
            store.Increment(demo_pb2.IncrementRequest(key=""), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert store.Get(demo_pb2.GetRequest(key="nobody"), timeout=10).value == 0


def test_a_missing_upstream_is_a_503(chain: dict[str, int]) -> None:
    port = free_port()
    dead = free_port()  # nothing listens here
    proc = Proc([sys.executable, "-m", "weft.demo.frontend", "-port", str(port), "-greeter-addr", f"127.0.0.1:{dead}"])
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), timeout=30, what="frontend")
        status, body = _get(f"http://127.0.0.1:{port}/hello?name=ada")
        assert status == 503 and body["error"] == "UNAVAILABLE"
    finally:
        proc.stop()
