"""Traffic management with real processes on loopback: the dev agent, the CA, the policy service, echo
apps (api v1 and v2) and `weft sidecar`s; config entries written with `weft config write`, KV documents
with the KV API. One mesh for the module; tests run in file order.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.apps.echo import echo_pb2, echo_pb2_grpc
from tests.integration.sidecar.test_mesh import Mesh, sys_python
from tests.support import WEFT, DevAgent, free_port, http_ok, wait_for

pytestmark = pytest.mark.integration

ENTRIES = {
    "defaults.hcl": 'Kind = "service-defaults"\nName = "api"\nProtocol = "grpc"\n',
    "resolver.hcl": '''Kind = "service-resolver"
Name = "api"
DefaultSubset = "v1"
Subsets = {
  v1 = { Filter = "Service.Meta.version == v1" }
  v2 = { Filter = "Service.Meta.version == v2" }
}
Failover = { v1 = { ServiceSubset = "v2" } }
''',
    "splitter.hcl": '''Kind = "service-splitter"
Name = "api"
Splits = [
  { Weight = 80, ServiceSubset = "v1" },
  { Weight = 20, ServiceSubset = "v2" },
]
''',
    "router.hcl": '''Kind = "service-router"
Name = "api"
Routes = [
  {
    Match { HTTP { Header = [{ Name = "x-canary", Exact = "1" }] } }
    Destination { ServiceSubset = "v2" }
  },
  {
    Match { HTTP { PathExact = "/weft.test.echo.v1.Echo/ServerStream" } }
    Destination { ServiceSubset = "v1", RequestTimeout = "500ms" }
  },
]
''',
}


class TrafficMesh(Mesh):
    def register_versioned(self, sid: str, version: str, port: int, public: int) -> None:
        self.consul("PUT", "/v1/agent/service/register", {
            "ID": sid, "Name": "api", "Address": "127.0.0.1", "Port": port,
            "Meta": {"protocol": "grpc", "version": version},
            "Connect": {"SidecarService": {"Port": public}}})

    def weft(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*WEFT, *args], input=stdin, capture_output=True, text=True, timeout=60,
                              env=self.env, check=False)

    def start_caller(self, upstreams: list[tuple[str, int]]) -> None:
        """Register web-1 calling ``upstreams`` (name, local port) and start its sidecar."""
        web_public = free_port()
        self.register("web-1", "web", free_port(), web_public, upstreams)
        admin = free_port()
        proc = self.proc("sidecar-web-1", [*WEFT, "sidecar", "--sidecar-for", "web-1", "--admin-port", str(admin),
                                           "--bind", "127.0.0.1", "--watch-wait", "10"])
        self.sidecars["web-1"] = (proc, admin, web_public)

    def kv(self, key: str, doc: Any | None) -> None:
        if doc is None:
            self.consul("DELETE", f"/v1/kv/{key}")
        else:
            self.consul("PUT", f"/v1/kv/{key}", json.dumps(doc).encode())


def call(port: int, *, metadata: tuple[tuple[str, str], ...] = (), timeout: float = 10) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
        resp: echo_pb2.EchoResponse = stub.Unary(echo_pb2.EchoRequest(text="t"), metadata=metadata, timeout=timeout)
        return str(resp.instance)


def calls(port: int, n: int, *, metadata: tuple[tuple[str, str], ...] = ()) -> Counter[str]:
    out: Counter[str] = Counter()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
        for _ in range(n):
            try:
                resp = stub.Unary(echo_pb2.EchoRequest(text="t"), metadata=metadata, timeout=10)
                out[resp.instance] += 1
            except grpc.RpcError as exc:
                out[exc.code().name] += 1  # type: ignore[attr-defined]
    return out


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrafficMesh]:
    agent = DevAgent()
    tmp = tmp_path_factory.mktemp("traffic")
    m = TrafficMesh(agent=agent, tmp=tmp)
    try:
        m.proc("ca", [*WEFT, "ca", "serve", "-dev", "--listen", f"127.0.0.1:{free_port()}"])
        m.proc("policy", [*WEFT, "policy", "serve", "-grpc-addr", f"127.0.0.1:{free_port()}"])
        m.intention("allow")
        for name, text in ENTRIES.items():
            (tmp / name).write_text(text)
        for name in ENTRIES:  # dependency order: defaults, resolver, splitter, router
            r = m.weft("config", "write", str(tmp / name))
            assert r.returncode == 0, r.stderr
        for sid, version in (("api-v1", "v1"), ("api-v2", "v2")):
            port = free_port()
            m.apps[sid] = m.proc(sid, [sys_python(), "-m", "tests.apps.echo", "--port", str(port), "--name", sid])
            public = free_port()
            m.register_versioned(sid, version, port, public)
            m.start_sidecar(sid, public)
        m.web_local = free_port()
        m.start_caller([("api", m.web_local)])
        wait_for(lambda: http_ok(f"{agent.url}/v1/kv/weft/ca/roots"), timeout=60, what="the CA's roots")
        m.wait_ready("api-v1", "api-v2", "web-1")

        def chain_known() -> bool:
            chain = m.config("web-1")["snapshot"]["upstreams"]["api"]["chain"]
            targets = chain["targets"] if chain else {}
            return bool(targets) and all(t["endpoints"] for t in targets.values())

        wait_for(chain_known, timeout=60, interval=0.3, what="web's sidecar to know api's chain and subsets")
        wait_for(lambda: call(m.web_local, timeout=2) != "", timeout=60, interval=0.3, what="a first call")
        yield m
    finally:
        for p in reversed(m.procs):
            p.stop()
        agent.stop()


def test_split_converges_and_the_header_route_picks_v2(mesh: TrafficMesh) -> None:
    counts = calls(mesh.web_local, 1000)
    assert counts["api-v1"] + counts["api-v2"] == 1000, counts
    assert abs(counts["api-v2"] / 1000 - 0.20) <= 0.05, counts
    assert calls(mesh.web_local, 20, metadata=(("x-canary", "1"),)) == {"api-v2": 20}
    config = mesh.config("web-1")
    chain = config["snapshot"]["upstreams"]["api"]["chain"]
    assert chain["start"] == "router:api.default.default"
    assert config["traffic"]["api"]["splits"] == [{"weight": 80.0, "target": "v1.api.default.default.dc1"},
                                                  {"weight": 20.0, "target": "v2.api.default.default.dc1"}]
    assert mesh.metric("web-1", 'weft_routed_requests_total{route="0",status="OK",subset="v2",upstream="api"}') >= 20
    status = mesh.weft("status")
    assert status.returncode == 0 and "80% v1.api" in status.stdout and "20% v2.api" in status.stdout, status.stdout


def test_a_bad_entry_is_refused_and_the_last_good_stays(mesh: TrafficMesh, tmp_path: Path) -> None:
    bad = tmp_path / "bad.hcl"
    bad.write_text('Kind = "service-splitter"\nName = "api"\nSplits = [{ Weight = 50, ServiceSubset = "v9" }, '
                   '{ Weight = 50 }]\n')
    r = mesh.weft("config", "write", str(bad))
    assert r.returncode == 1 and 'does not have a subset named "v9"' in r.stderr
    bad_doc = {"PerCaller": {"RequestsPerSecond": "lots"}}
    mesh.kv("weft/ratelimits/api", bad_doc)
    time.sleep(1.0)
    assert calls(mesh.web_local, 50).keys() <= {"api-v1", "api-v2"}  # no limit took effect
    mesh.kv("weft/ratelimits/api", None)


def test_failover_moves_to_v2_when_v1_is_critical(mesh: TrafficMesh) -> None:
    mesh.consul("PUT", "/v1/agent/service/maintenance/api-v1?enable=true&reason=failover-test")
    try:
        wait_for(lambda: not mesh.config("web-1")["snapshot"]["upstreams"]["api"]["chain"]["targets"][
            "v1.api.default.default.dc1"]["endpoints"], timeout=30, interval=0.2, what="v1 to leave")
        assert calls(mesh.web_local, 30) == {"api-v2": 30}
    finally:
        mesh.consul("PUT", "/v1/agent/service/maintenance/api-v1?enable=false")
    wait_for(lambda: bool(mesh.config("web-1")["snapshot"]["upstreams"]["api"]["chain"]["targets"][
        "v1.api.default.default.dc1"]["endpoints"]), timeout=30, interval=0.2, what="v1 back")


def test_route_timeout_limits_and_faults(mesh: TrafficMesh) -> None:
    # a route timeout ends a slow call with DEADLINE_EXCEEDED
    with grpc.insecure_channel(f"127.0.0.1:{mesh.web_local}") as ch:
        stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ServerStream(echo_pb2.EchoRequest(), metadata=(("x-echo-delay-ms", "2000"),), timeout=10))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    # a per-caller limit holds under a burst from web
    mesh.kv("weft/ratelimits/api", {"Callers": {"web": {"RequestsPerSecond": 2, "RequestsMaxBurst": 4}}})
    wait_for(lambda: calls(mesh.web_local, 30)["RESOURCE_EXHAUSTED"] > 0, timeout=20, interval=0.5,
             what="the limit to apply")
    burst = calls(mesh.web_local, 40)
    assert burst["RESOURCE_EXHAUSTED"] >= 25, burst
    assert mesh.metric("api-v1", "weft_ratelimited_total") + mesh.metric("api-v2", "weft_ratelimited_total") > 0
    mesh.kv("weft/ratelimits/api", None)
    wait_for(lambda: calls(mesh.web_local, 20)["RESOURCE_EXHAUSTED"] == 0, timeout=20, interval=0.5,
             what="the limit to go")
    # a fault document makes its share of calls fail; removing it restores them
    mesh.kv("weft/faults/api", {"Abort": {"Percent": 50, "GrpcStatus": 14}})
    wait_for(lambda: calls(mesh.web_local, 20)["UNAVAILABLE"] > 0, timeout=20, interval=0.5, what="faults")
    share = calls(mesh.web_local, 200)
    assert 60 <= share["UNAVAILABLE"] <= 140, share
    mesh.kv("weft/faults/api", None)
    wait_for(lambda: calls(mesh.web_local, 30)["UNAVAILABLE"] == 0, timeout=20, interval=0.5, what="faults off")
