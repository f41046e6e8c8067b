"""Config-entry fields beyond routing, with real processes on loopback: the dev agent, the CA, the policy
service, a gRPC echo app (api) and an HTTP echo app (hapi) behind `weft sidecar`s, a caller sidecar (web)
and a "black hole" endpoint of each (a listener that takes connections and never answers: no TLS
handshake ever completes). One mesh for the module; tests run in file order.

- service-defaults `UpstreamConfig.Limits` (web's overrides): MaxConcurrentRequests on the gRPC (h2)
  path, MaxConnections + MaxPendingRequests on the HTTP/1.1 path;
- service-resolver `ConnectTimeout`: a call routed to the black hole fails UNAVAILABLE / 503, counted;
- service-router `IdleTimeout`: a stream with no frame for that long ends, naming it;
- resolver subsets' `OnlyPassing`: a warning instance serves until its subset says OnlyPassing.

Statuses and counts only: calls that must overlap are given seconds of server-side delay.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from tests.apps.echo import echo_pb2, echo_pb2_grpc
from tests.integration.sidecar.test_mesh import sys_python
from tests.integration.traffic.test_traffic_processes import TrafficMesh, call
from tests.support import WEFT, DevAgent, free_port, http_ok, wait_for

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec("sidecar.h2_circuit") is None,
                                 reason="needs the h2 engine's traffic hooks")]

SUBSETS = '''Subsets = {
  v1   = { Filter = "Service.Meta.version == v1" }
  hole = { Filter = "Service.Meta.version == hole" }
}'''
HOLE_ROUTE = ('{ Match { HTTP { Header = [{ Name = "x-hole", Exact = "1" }] } }, '
              'Destination { ServiceSubset = "hole" } }')
ENTRIES = {
    "api-defaults.hcl": 'Kind = "service-defaults"\nName = "api"\nProtocol = "grpc"\n',
    "api-resolver.hcl": f'Kind = "service-resolver"\nName = "api"\nDefaultSubset = "v1"\n'
                        f'ConnectTimeout = "400ms"\n{SUBSETS}\n',
    "api-router.hcl": f'''Kind = "service-router"\nName = "api"\nRoutes = [
  {HOLE_ROUTE},
  {{ Match {{ HTTP {{ PathExact = "/weft.test.echo.v1.Echo/Bidi" }} }}, Destination {{ IdleTimeout = "2s" }} }},
]
''',
    "hapi-defaults.hcl": 'Kind = "service-defaults"\nName = "hapi"\nProtocol = "http"\n',
    "hapi-resolver.hcl": f'Kind = "service-resolver"\nName = "hapi"\nDefaultSubset = "v1"\n'
                         f'ConnectTimeout = "400ms"\n{SUBSETS}\n',
    "hapi-router.hcl": f'''Kind = "service-router"\nName = "hapi"\nRoutes = [
  {HOLE_ROUTE},
  {{ Match {{ HTTP {{ PathPrefix = "/idle" }} }}, Destination {{ IdleTimeout = "1s" }} }},
]
''',
    "web-defaults.hcl": '''Kind = "service-defaults"
Name = "web"
Protocol = "grpc"
UpstreamConfig {
  Overrides = [
    { Name = "api", Limits { MaxConcurrentRequests = 2 } },
    { Name = "hapi", Limits { MaxConnections = 1, MaxPendingRequests = 1 } },
  ]
}
''',
}
V1 = "v1.{}.default.default.dc1"
HOLE = "hole.{}.default.default.dc1"


class BlackHole:
    """Accepts TCP connections and never reads or writes (held open until stopped)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


class FieldsMesh(TrafficMesh):
    hweb_local: int = 0

    def register_app(self, sid: str, service: str, version: str, protocol: str, port: int, public: int) -> None:
        self.consul("PUT", "/v1/agent/service/register", {
            "ID": sid, "Name": service, "Address": "127.0.0.1", "Port": port,
            "Meta": {"protocol": protocol, "version": version},
            "Connect": {"SidecarService": {"Port": public}}})

    def targets(self, upstream: str) -> dict[str, Any]:
        chain = self.config("web-1")["snapshot"]["upstreams"][upstream]["chain"]
        return dict(chain["targets"]) if chain else {}


def http_get(port: int, headers: dict[str, str] | None = None, timeout: float = 15,
             path: str = "/x") -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def grpc_failure(port: int, metadata: tuple[tuple[str, str], ...], timeout: float = 15) -> tuple[str, str]:
    """(status name, details) of a unary call, ("OK", "") when it succeeds."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
        try:
            stub.Unary(echo_pb2.EchoRequest(text="t"), metadata=metadata, timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or ""  # type: ignore[attr-defined]
    return "OK", ""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FieldsMesh]:
    agent = DevAgent()
    tmp = tmp_path_factory.mktemp("fields")
    m = FieldsMesh(agent=agent, tmp=tmp)
    holes = [BlackHole(), BlackHole()]
    try:
        m.proc("ca", [*WEFT, "ca", "serve", "-dev", "--listen", f"127.0.0.1:{free_port()}"])
        m.proc("policy", [*WEFT, "policy", "serve", "-grpc-addr", f"127.0.0.1:{free_port()}"])
        for service in ("api", "hapi"):
            doc = {"Kind": "service-intentions", "Name": service, "Sources": [{"Name": "web", "Action": "allow"}]}
            m.consul("PUT", f"/v1/kv/weft/intentions/{service}", json.dumps(doc).encode())
        for name, text in ENTRIES.items():
            (tmp / name).write_text(text)
            r = m.weft("config", "write", str(tmp / name))
            assert r.returncode == 0, (name, r.stderr)
        port = free_port()
        m.apps["api-v1"] = m.proc("api-v1", [sys_python(), "-m", "tests.apps.echo", "--port", str(port),
                                             "--name", "api-v1"])
        public = free_port()
        m.register_app("api-v1", "api", "v1", "grpc", port, public)
        m.start_sidecar("api-v1", public)
        port = free_port()
        m.apps["hapi-v1"] = m.proc("hapi-v1", [sys_python(), "-m", "tests.apps.httpecho", "--port", str(port),
                                               "--name", "hapi-v1"])
        public = free_port()
        m.register_app("hapi-v1", "hapi", "v1", "http", port, public)
        m.start_sidecar("hapi-v1", public)
        for service, hole in zip(("api", "hapi"), holes, strict=True):  # endpoints that never answer
            m.register_app(f"{service}-hole", service, "hole", "grpc" if service == "api" else "http",
                           free_port(), hole.port)
        m.web_local, m.hweb_local = free_port(), free_port()
        m.start_caller([("api", m.web_local), ("hapi", m.hweb_local)])
        wait_for(lambda: http_ok(f"{agent.url}/v1/kv/weft/ca/roots"), timeout=60, what="the CA's roots")
        m.wait_ready("api-v1", "hapi-v1", "web-1")

        def chains_known() -> bool:
            return all(m.targets(u).get(t.format(u), {}).get("endpoints") for u in ("api", "hapi") for t in (V1, HOLE))

        wait_for(chains_known, timeout=90, interval=0.3, what="web's sidecar to know both chains and their subsets")
        wait_for(lambda: call(m.web_local, timeout=2) == "api-v1", timeout=60, interval=0.3, what="a first gRPC call")
        wait_for(lambda: http_get(m.hweb_local, timeout=2)[0] == 200, timeout=60, interval=0.3,
                 what="a first HTTP call")
        yield m
    finally:
        for p in reversed(m.procs):
            p.stop()
        for hole in holes:
            hole.close()
        agent.stop()


def test_max_concurrent_requests_on_the_grpc_path(mesh: FieldsMesh) -> None:
    slow = (("x-echo-delay-ms", "2000"),)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: grpc_failure(mesh.web_local, slow), range(6)))
    codes = Counter(code for code, _ in results)
    assert codes["OK"] >= 2 and codes["UNAVAILABLE"] >= 1 and codes.keys() <= {"OK", "UNAVAILABLE"}, results
    assert all("MaxConcurrentRequests (2) reached" in details for code, details in results if code != "OK"), results
    opened = mesh.metric("web-1", 'weft_circuit_open_total{limit="MaxConcurrentRequests",upstream="api"}')
    assert opened >= codes["UNAVAILABLE"]
    # one call at a time is never refused
    assert [grpc_failure(mesh.web_local, ())[0] for _ in range(10)] == ["OK"] * 10


def test_max_connections_and_pending_requests_on_the_http_path(mesh: FieldsMesh) -> None:
    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda _: http_get(mesh.hweb_local, {"x-echo-delay-ms": "2000"}), range(5)))
    statuses = Counter(status for status, _ in results)
    # one request holds the one connection, one waits for it, the others are refused at once
    assert statuses[200] >= 2 and statuses[503] >= 1 and statuses.keys() <= {200, 503}, results
    assert all("MaxPendingRequests (1) reached" in body for status, body in results if status == 503), results
    assert mesh.metric("web-1", 'weft_circuit_open_total{limit="MaxPendingRequests",upstream="hapi"}') >= statuses[503]
    assert [http_get(mesh.hweb_local)[0] for _ in range(10)] == [200] * 10


def test_connect_timeout_fails_the_call_and_is_counted(mesh: FieldsMesh) -> None:
    code, details = grpc_failure(mesh.web_local, (("x-hole", "1"),))
    assert code == "UNAVAILABLE", details
    assert mesh.metric("web-1", 'weft_connect_timeouts_total{upstream="api"}') >= 1
    status, body = http_get(mesh.hweb_local, {"x-hole": "1"})
    assert status == 503 and "connect timeout of 0.4s" in body, body
    assert mesh.metric("web-1", 'weft_connect_timeouts_total{upstream="hapi"}') >= 1
    assert grpc_failure(mesh.web_local, ())[0] == "OK" and http_get(mesh.hweb_local)[0] == 200


def test_idle_timeout_ends_a_silent_stream(mesh: FieldsMesh) -> None:
    release = threading.Event()

    def one_then_silence() -> Iterator[echo_pb2.EchoRequest]:
        yield echo_pb2.EchoRequest(text="one")
        release.wait(30)  # the stream stays open, silent, until the test ends it

    with grpc.insecure_channel(f"127.0.0.1:{mesh.web_local}") as ch:
        stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
        replies: list[str] = []
        try:
            with pytest.raises(grpc.RpcError) as err:
                for reply in stub.Bidi(one_then_silence(), timeout=25):
                    replies.append(reply.text)
        finally:
            release.set()
        assert replies == ["one"]
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        assert "IdleTimeout" in (err.value.details() or "")  # type: ignore[attr-defined]

        def chatty() -> Iterator[echo_pb2.EchoRequest]:  # a frame every 0.2 s for 3 s: never idle for 2 s
            for i in range(15):
                time.sleep(0.2)
                yield echo_pb2.EchoRequest(text=str(i))

        assert len(list(stub.Bidi(chatty(), timeout=25))) == 15


def test_idle_timeout_on_the_http_path(mesh: FieldsMesh) -> None:
    status, body = http_get(mesh.hweb_local, {"x-echo-delay-ms": "4000"}, path="/idle")
    assert status == 504 and "for 1s (the route's IdleTimeout)" in body, body
    assert http_get(mesh.hweb_local, {"x-echo-delay-ms": "100"}, path="/idle")[0] == 200


def test_warning_instances_serve_unless_only_passing(mesh: FieldsMesh) -> None:
    mesh.consul("PUT", "/v1/agent/check/register", {"ID": "api-v1-degraded", "Name": "degraded",
                                                    "ServiceID": "api-v1", "TTL": "600s", "Status": "warning"})
    try:

        def sidecar_statuses() -> set[str]:
            return {c["Status"] for e in mesh.consul("GET", "/v1/health/connect/api")
                    if e["Service"]["ID"] == "api-v1-sidecar-proxy" for c in e["Checks"]}

        wait_for(lambda: "warning" in sidecar_statuses(), timeout=30, interval=0.3,
                 what="api-v1's sidecar to turn warning (its alias check)")
        assert "critical" not in sidecar_statuses()
        time.sleep(1.0)  # the target watch has answered by now; a warning endpoint must have stayed
        assert mesh.targets("api")[V1.format("api")]["endpoints"], "the warning instance left subset v1"
        assert [call(mesh.web_local) for _ in range(5)] == ["api-v1"] * 5
        resolver = ENTRIES["api-resolver.hcl"].replace(
            'v1   = { Filter = "Service.Meta.version == v1" }',
            'v1   = { Filter = "Service.Meta.version == v1", OnlyPassing = true }')
        r = mesh.weft("config", "write", "-", stdin=resolver)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: not mesh.targets("api")[V1.format("api")]["endpoints"], timeout=30, interval=0.3,
                 what="the warning instance to leave v1 once it says OnlyPassing")
        assert grpc_failure(mesh.web_local, ())[0] == "UNAVAILABLE"
    finally:
        mesh.consul("PUT", "/v1/agent/check/deregister/api-v1-degraded")
        r = mesh.weft("config", "write", "-", stdin=ENTRIES["api-resolver.hcl"])
        assert r.returncode == 0, r.stderr
    wait_for(lambda: call(mesh.web_local, timeout=2) == "api-v1", timeout=30, interval=0.3, what="api-v1 back")
