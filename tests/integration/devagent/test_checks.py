"""Health checks that really run: TTL, HTTP, TCP, gRPC and alias go critical and recover;
DeregisterCriticalServiceAfter reaps. One agent with a short reap interval and a 1s minimum."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import consul
import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.integration.devagent.b_http import call
from tests.support import DevAgent, free_port, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def agent() -> Iterator[DevAgent]:
    a = DevAgent("-check-reap-interval", "100ms", "-check-deregister-interval-min", "1s")
    try:
        yield a
    finally:
        a.stop()


def _c(agent: DevAgent) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=agent.port)


def _check(agent: DevAgent, cid: str) -> dict[str, Any]:
    return dict(_c(agent).agent.checks().get(cid) or {})


def _status_becomes(agent: DevAgent, cid: str, status: str, timeout: float = 30) -> dict[str, Any]:
    wait_for(lambda: _check(agent, cid).get("Status") == status, timeout=timeout, what=f"{cid} {status}")
    return _check(agent, cid)


class _Health(BaseHTTPRequestHandler):
    status = 200
    seen: ClassVar[list[tuple[str, str]]] = []

    def _answer(self) -> None:
        type(self).seen.append((self.command, self.headers.get("X-Probe", "")))
        body = b"hello from app"
        self.send_response(type(self).status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_ttl_expires_and_recovers(agent: DevAgent) -> None:
    c = _c(agent)
    c.agent.service.register("ttlsvc", service_id="ttlsvc-1", port=1, check=consul.Check.ttl("1s"))
    c.agent.check.ttl_pass("service:ttlsvc-1", "fine")
    assert _check(agent, "service:ttlsvc-1")["Status"] == "passing"
    chk = _status_becomes(agent, "service:ttlsvc-1", "critical")
    assert chk["Output"] == "TTL expired (last output before timeout follows): fine"
    c.agent.check.ttl_pass("service:ttlsvc-1")
    assert _check(agent, "service:ttlsvc-1")["Status"] == "passing"
    c.agent.service.deregister("ttlsvc-1")


def test_http_check_states(agent: DevAgent) -> None:
    port = free_port()
    _Health.status = 200
    server = ThreadingHTTPServer(("127.0.0.1", port), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{port}/healthz"
        status, _, _ = call(agent.url, "PUT", "/v1/agent/service/register", {
            "Name": "httpsvc", "ID": "httpsvc-1", "Port": port,
            "Check": {"HTTP": url, "Interval": "1s", "Timeout": "2s", "Method": "POST",
                      "Header": {"X-Probe": ["yes"]}}})
        assert status == 200
        chk = _status_becomes(agent, "service:httpsvc-1", "passing")
        assert chk["Output"] == f"HTTP POST {url}: 200 OK Output: hello from app"
        assert ("POST", "yes") in _Health.seen
        _Health.status = 429
        _status_becomes(agent, "service:httpsvc-1", "warning")
        _Health.status = 503
        chk = _status_becomes(agent, "service:httpsvc-1", "critical")
        assert "503 Service Unavailable" in chk["Output"]
        _Health.status = 200
        _status_becomes(agent, "service:httpsvc-1", "passing")
    finally:
        server.shutdown()
        server.server_close()
    chk = _status_becomes(agent, "service:httpsvc-1", "critical")
    assert "connection refused" in chk["Output"]
    _c(agent).agent.service.deregister("httpsvc-1")


def test_tcp_check_states(agent: DevAgent) -> None:
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    try:
        c = _c(agent)
        c.agent.service.register("tcpsvc", service_id="tcpsvc-1", port=port,
                                 check=consul.Check.tcp("127.0.0.1", port, "1s"))
        chk = _status_becomes(agent, "service:tcpsvc-1", "passing")
        assert chk["Output"] == f"TCP connect 127.0.0.1:{port}: Success"
    finally:
        listener.close()
    chk = _status_becomes(agent, "service:tcpsvc-1", "critical")
    assert chk["Output"] == f"dial tcp 127.0.0.1:{port}: connect: connection refused"
    listener = socket.create_server(("127.0.0.1", port))
    try:
        _status_becomes(agent, "service:tcpsvc-1", "passing")
    finally:
        listener.close()
    _c(agent).agent.service.deregister("tcpsvc-1")


def test_grpc_check_states(agent: DevAgent) -> None:
    port = free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        servicer.set("pkg.Svc", health_pb2.HealthCheckResponse.SERVING)
        target = f"127.0.0.1:{port}/pkg.Svc"
        c = _c(agent)
        c.agent.service.register("grpcsvc", service_id="grpcsvc-1", port=port, check=consul.Check.grpc(target, "1s"))
        chk = _status_becomes(agent, "service:grpcsvc-1", "passing")
        assert chk["Output"] == f"gRPC check {target}: success"
        assert chk["Type"] == "grpc"
        servicer.set("pkg.Svc", health_pb2.HealthCheckResponse.NOT_SERVING)
        chk = _status_becomes(agent, "service:grpcsvc-1", "critical")
        assert "NOT_SERVING" in chk["Output"]
        servicer.set("pkg.Svc", health_pb2.HealthCheckResponse.SERVING)
        _status_becomes(agent, "service:grpcsvc-1", "passing")
    finally:
        server.stop(None)
    _status_becomes(agent, "service:grpcsvc-1", "critical")
    _c(agent).agent.service.deregister("grpcsvc-1")


def test_alias_follows_the_aliased_service(agent: DevAgent) -> None:
    c = _c(agent)
    c.agent.service.register("base", service_id="base-1", port=1, check=consul.Check.ttl("60s"))
    status, _, _ = call(agent.url, "PUT", "/v1/agent/service/register", {
        "Name": "follower", "ID": "follower-1", "Port": 2, "Check": {"AliasService": "base-1"}})
    assert status == 200
    chk = _status_becomes(agent, "service:follower-1", "critical")
    assert chk["Output"].startswith('Aliased check "Service \'base\' check" failing')
    c.agent.check.ttl_pass("service:base-1")
    chk = _status_becomes(agent, "service:follower-1", "passing")
    assert chk["Output"] == "All checks passing."
    c.agent.check.ttl_warn("service:base-1")
    _status_becomes(agent, "service:follower-1", "warning")
    c.agent.service.deregister("base-1")
    chk = _status_becomes(agent, "service:follower-1", "critical")
    assert chk["Output"].startswith("Service base-1 could not be found on node")
    c.agent.service.deregister("follower-1")


def test_deregister_critical_service_after_reaps(agent: DevAgent) -> None:
    c = _c(agent)
    status, _, _ = call(agent.url, "PUT", "/v1/agent/service/register", {
        "Name": "doomed", "ID": "doomed-1", "Port": 1,
        "Connect": {"SidecarService": {}},
        "Check": {"TTL": "1s", "DeregisterCriticalServiceAfter": "1s", "Status": "passing"}})
    assert status == 200
    c.agent.service.register("survivor", service_id="survivor-1", port=2,
                             check=consul.Check.ttl("60s"))  # critical, but no deregister timeout
    assert "doomed-1" in c.agent.services()
    wait_for(lambda: "doomed-1" not in c.agent.services(), timeout=30, what="reaped")
    assert "doomed-1-sidecar-proxy" not in c.agent.services()
    assert "survivor-1" in c.agent.services()
    c.agent.service.deregister("survivor-1")


def test_check_runner_stops_on_deregistration(agent: DevAgent) -> None:
    port = free_port()
    _Health.status = 200
    _Health.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", port), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        c = _c(agent)
        c.agent.service.register("stopper", service_id="stopper-1", port=port,
                                 check=consul.Check.http(f"http://127.0.0.1:{port}/", "1s"))
        _status_becomes(agent, "service:stopper-1", "passing")
        c.agent.service.deregister("stopper-1")
        seen = len(_Health.seen)
        time.sleep(2.5)  # more than two intervals: a runner left behind would probe again
        assert len(_Health.seen) <= seen + 1  # at most a probe already in flight
    finally:
        server.shutdown()
        server.server_close()
