"""The sidecar as real processes on loopback: dev agent, CA, policy service, echo apps and `weft sidecar`s.

One mesh for the whole module (the box is small): `web` calls `api` (two instances) through its
sidecar. Tests run in file order; the last one stops Consul.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from tests.apps.echo import echo_pb2, echo_pb2_grpc
from tests.support import WEFT, DevAgent, Proc, free_port, http_ok, wait_for
from tests.unit.sidecar.pki import Authority

pytestmark = pytest.mark.integration


@dataclass
class Mesh:
    agent: DevAgent
    tmp: Path
    procs: list[Proc] = field(default_factory=list)
    sidecars: dict[str, tuple[Proc, int, int]] = field(default_factory=dict)  # id -> (proc, admin, public)
    apps: dict[str, Proc] = field(default_factory=dict)
    web_local: int = 0
    expired: Path | None = None  # a 10 s leaf of web, signed at start, expired by the time it is used

    @property
    def env(self) -> dict[str, str]:
        return {**self.agent.env, "WEFT_LOG_LEVEL": "info"}

    def consul(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.agent.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw.strip() else None

    def proc(self, name: str, args: list[str]) -> Proc:
        p = Proc(args, env=self.env, log=self.tmp / f"{name}.log")
        self.procs.append(p)
        return p

    def register(self, sid: str, name: str, port: int, public: int, upstreams: list[tuple[str, int]]) -> None:
        self.consul("PUT", "/v1/agent/service/register", {
            "ID": sid, "Name": name, "Address": "127.0.0.1", "Port": port, "Meta": {"protocol": "grpc"},
            "Connect": {"SidecarService": {"Port": public, "Proxy": {"Upstreams": [
                {"DestinationName": d, "LocalBindPort": p} for d, p in upstreams]}}}})

    def start_sidecar(self, sid: str, public: int) -> None:
        admin = free_port()
        proc = self.proc(f"sidecar-{sid}-{len(self.procs)}",
                         [*WEFT, "sidecar", "--sidecar-for", sid, "--admin-port", str(admin), "--bind", "127.0.0.1",
                          "--drain-timeout", "3", "--watch-wait", "10", "--leaf-ttl", "12"])
        self.sidecars[sid] = (proc, admin, public)

    def wait_ready(self, *sids: str) -> None:
        def ready() -> bool:
            for sid in sids:
                proc = self.sidecars[sid][0]
                if not proc.alive():
                    raise RuntimeError(f"sidecar {sid} exited:\n{proc.output()[-3000:]}")
            return all(http_ok(f"http://127.0.0.1:{self.sidecars[s][1]}/ready") for s in sids)
        wait_for(ready, timeout=90, interval=0.2, what=f"sidecars {sids} ready")

    def admin(self, sid: str, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.sidecars[sid][1]}{path}", timeout=10) as resp:
            return str(resp.read().decode())

    def config(self, sid: str) -> dict[str, Any]:
        return dict(json.loads(self.admin(sid, "/config")))

    def metric(self, sid: str, prefix: str) -> float:
        total = 0.0
        for line in self.admin(sid, "/metrics").splitlines():
            if line.startswith(prefix):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def intention(self, action: str) -> None:
        doc = {"Kind": "service-intentions", "Name": "api", "Sources": [{"Name": "web", "Action": action}]}
        self.consul("PUT", "/v1/kv/weft/intentions/api", json.dumps(doc).encode())


def unary(port: int, timeout: float = 10, **kw: Any) -> echo_pb2.EchoResponse:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
        resp: echo_pb2.EchoResponse = stub.Unary(echo_pb2.EchoRequest(text="hi"), timeout=timeout, **kw)
        return resp


class Traffic:
    """Calls in a loop on one channel from a thread; counts successes and failures by instance."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok: dict[str, int] = {}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
            while not self._stop.is_set():
                try:
                    resp = stub.Unary(echo_pb2.EchoRequest(text="t"), timeout=10)
                    self.ok[resp.instance] = self.ok.get(resp.instance, 0) + 1
                except grpc.RpcError as exc:
                    self.failures.append(f"{exc.code()}: {exc.details()}")  # type: ignore[attr-defined]
                time.sleep(0.005)

    @property
    def total(self) -> int:
        return sum(self.ok.values())

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    agent = DevAgent()
    m = Mesh(agent=agent, tmp=tmp_path_factory.mktemp("mesh"))
    try:
        m.proc("ca", [*WEFT, "ca", "serve", "-dev", "--listen", f"127.0.0.1:{free_port()}"])
        m.proc("policy", [*WEFT, "policy", "serve", "-grpc-addr", f"127.0.0.1:{free_port()}"])
        m.intention("allow")
        for sid in ("api-1", "api-2"):
            port = free_port()
            m.apps[sid] = m.proc(sid, [sys_python(), "-m", "tests.apps.echo", "--port", str(port), "--name", sid])
            public = free_port()
            m.register(sid, "api", port, public, [])
            m.start_sidecar(sid, public)
        m.web_local = free_port()
        web_public = free_port()
        m.register("web-1", "web", free_port(), web_public, [("api", m.web_local)])
        m.start_sidecar("web-1", web_public)
        wait_for(lambda: http_ok(f"{agent.url}/v1/kv/weft/ca/roots"), timeout=60, what="the CA's roots")
        m.expired = _sign(m, "web", "10s")
        m.wait_ready("api-1", "api-2", "web-1")
        wait_for(lambda: unary(m.web_local, timeout=2) is not None, timeout=60, interval=0.3, what="a first call")
        yield m
    finally:
        for p in reversed(m.procs):
            p.stop()
        agent.stop()


def sys_python() -> str:
    return sys.executable


def test_calls_flow_and_registration(mesh: Mesh) -> None:
    wait_for(lambda: len(mesh.config("web-1")["snapshot"]["upstreams"]["api"]["endpoints"]) == 2, timeout=30,
             what="web's sidecar knows both api instances")
    seen: set[str] = set()

    def both() -> bool:
        seen.add(unary(mesh.web_local).instance)
        return seen == {"api-1", "api-2"}

    wait_for(both, timeout=30, what="calls reach both instances")
    with grpc.insecure_channel(f"127.0.0.1:{mesh.web_local}") as ch:
        stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
        got = list(stub.ServerStream(echo_pb2.EchoRequest(sequence=1), metadata=(("x-echo-count", "3"),), timeout=10))
        assert [r.sequence for r in got] == [1, 2, 3]
    # the sidecars are registered as Consul registers them, and healthy
    entries = mesh.consul("GET", "/v1/health/connect/api?passing")
    assert sorted(e["Service"]["ID"] for e in entries) == ["api-1-sidecar-proxy", "api-2-sidecar-proxy"]
    svc = entries[0]["Service"]
    assert svc["Kind"] == "connect-proxy" and svc["Proxy"]["DestinationServiceName"] == "api"
    admin = mesh.sidecars[svc["Proxy"]["DestinationServiceID"]][1]
    assert svc["Meta"]["weft-admin-addr"] == f"127.0.0.1:{admin}" and svc["Meta"]["protocol"] == "grpc"
    checks = mesh.consul("GET", "/v1/agent/checks")
    names: dict[str, list[str]] = {c["ServiceID"]: [] for c in checks.values()}
    for c in checks.values():
        names[c["ServiceID"]].append(c["Type"] or c["Name"])
    assert any("ttl" in t.lower() for t in names["web-1-sidecar-proxy"])
    assert any("alias" in t.lower() for t in names["web-1-sidecar-proxy"])
    # callers learned api's methods: per-method metrics on the outbound side
    cfg = mesh.config("web-1")
    assert cfg["snapshot"]["upstreams"]["api"]["methods"]["/weft.test.echo.v1.Echo/Unary"] == "unary"
    assert "PRIVATE KEY" not in json.dumps(cfg)
    assert mesh.metric("web-1", 'weft_requests_total{destination="api",direction="outbound",'
                                'method="/weft.test.echo.v1.Echo/Unary"') >= 2


def test_a_sidecar_that_needs_no_grpc_does_not_load_it(mesh: Mesh) -> None:
    """With the frame-level HTTP/2 data path, the CA's calls and reflection on the sidecar's own client, a
    running sidecar (after start-up, calls and method discovery) has not mapped grpc's compiled core."""
    for sid in ("web-1", "api-1"):
        proc = mesh.sidecars[sid][0]
        assert proc.alive(), sid
        with open(f"/proc/{proc.pid}/maps") as f:
            maps = f.read()
        assert "_cython" not in maps and "/grpc/" not in maps, sid
        assert "/uvloop/" in maps, sid  # the check reads the right process's maps


def test_a_grpc_only_sidecar_does_not_load_aiohttp(mesh: Mesh) -> None:
    """Every service in this mesh speaks gRPC: the sidecars talk to Consul over catalog.http1 and never
    import sidecar.http_proxy, so aiohttp and what only it loads (multidict, yarl, frozenlist) are not
    mapped (their compiled extensions would be)."""
    for sid in ("web-1", "api-1"):
        proc = mesh.sidecars[sid][0]
        assert proc.alive(), sid
        with open(f"/proc/{proc.pid}/maps") as f:
            maps = f.read()
        for package in ("aiohttp", "multidict", "yarl", "frozenlist"):
            assert f"/{package}/" not in maps, (sid, package)
        assert "/uvloop/" in maps, sid  # the check reads the right process's maps


def test_intentions_flip_allow_and_deny(mesh: Mesh) -> None:
    def denied() -> bool:
        try:
            unary(mesh.web_local, timeout=5)
            return False
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined,no-any-return]

    t0 = time.monotonic()
    mesh.intention("deny")
    wait_for(denied, timeout=15, interval=0.05, what="calls denied after the intention changed")
    flip = time.monotonic() - t0
    with pytest.raises(grpc.RpcError) as err:
        unary(mesh.web_local)
    assert "web -> api" in (err.value.details() or "")  # type: ignore[attr-defined]
    assert mesh.metric("api-1", 'weft_authz_decisions_total{decision="deny"') + \
        mesh.metric("api-2", 'weft_authz_decisions_total{decision="deny"') >= 1
    t0 = time.monotonic()
    mesh.intention("allow")
    wait_for(lambda: unary(mesh.web_local, timeout=5) is not None, timeout=15, interval=0.05, what="allowed again")
    print(f"deny took effect after {flip:.2f}s, allow after {time.monotonic() - t0:.2f}s")


def _sign(mesh: Mesh, service: str, ttl: str) -> Path:
    out = mesh.tmp / f"cert-{service}-{ttl}"
    res = subprocess.run([*WEFT, "ca", "sign", "--service", service, "--out", str(out), "--ttl", ttl],
                         env={**os.environ, **mesh.env}, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return out


def _ctx(d: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(d / "roots.pem"))
    chain = d / "full.pem"
    chain.write_text((d / "cert.pem").read_text() + (d / "chain.pem").read_text())
    ctx.load_cert_chain(str(chain), str(d / "key.pem"))
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _refused(port: int, ctx: ssl.SSLContext | None) -> bool:
    """True when the public port ends the connection without answering HTTP/2."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            s: Any = ctx.wrap_socket(raw, server_hostname="api") if ctx else raw
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            return bool(s.recv(100) == b"")
        except (ssl.SSLError, ConnectionError):
            return True


def test_public_port_refuses_foreign_plaintext_expired_and_wrong_identity(mesh: Mesh) -> None:
    expired = mesh.expired
    assert expired is not None
    intruder = _sign(mesh, "intruder", "1h")
    public = mesh.sidecars["api-1"][2]
    before = mesh.metric("api-1", "weft_tls_handshake_errors_total")
    # plaintext
    assert _refused(public, None)
    # a certificate from a foreign CA
    foreign = Authority.root("Foreign")
    fdir = mesh.tmp / "foreign"
    fdir.mkdir(exist_ok=True)
    creds = foreign.leaf("web")
    (fdir / "cert.pem").write_text(creds.cert_pem)
    (fdir / "chain.pem").write_text("")
    (fdir / "key.pem").write_text(creds.key_pem)
    (fdir / "roots.pem").write_text((expired / "roots.pem").read_text())
    assert _refused(public, _ctx(fdir))
    # an expired certificate of this mesh
    not_after = x509.load_pem_x509_certificate((expired / "cert.pem").read_bytes()).not_valid_after_utc.timestamp()
    time.sleep(max(0.0, not_after - time.time() + 1.5))
    assert _refused(public, _ctx(expired))
    # a valid certificate of an identity no rule allows: PERMISSION_DENIED naming the rule
    creds_grpc = grpc.ssl_channel_credentials(
        (intruder / "roots.pem").read_bytes(), (intruder / "key.pem").read_bytes(),
        (intruder / "cert.pem").read_bytes() + (intruder / "chain.pem").read_bytes())
    td = mesh.config("api-1")["snapshot"]["certificate"]["trust_domain"]
    with grpc.secure_channel(f"127.0.0.1:{public}", creds_grpc,
                             options=[("grpc.ssl_target_name_override", f"api.svc.default.{td}")]) as ch:
        with pytest.raises(grpc.RpcError) as err:
            echo_pb2_grpc.EchoStub(ch).Unary(echo_pb2.EchoRequest(), timeout=10)  # type: ignore[no-untyped-call]
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert "intruder" in (err.value.details() or "")  # type: ignore[attr-defined]
    wait_for(lambda: mesh.metric("api-1", "weft_tls_handshake_errors_total") >= before + 3, timeout=10,
             what="handshake errors counted")
    text = mesh.admin("api-1", "/metrics")
    for reason in ("not_tls", "unknown_ca", "expired"):
        assert f'reason="{reason}"' in text
    # and the sidecar keeps serving the others
    assert {unary(mesh.web_local).instance for _ in range(10)} <= {"api-1", "api-2"}


def test_leaf_and_root_rotation_under_traffic(mesh: Mesh) -> None:
    ids = ("api-1", "api-2", "web-1")

    def serials() -> dict[str, str]:
        return {sid: mesh.config(sid)["snapshot"]["certificate"]["serial"] for sid in ids}

    def roots() -> dict[str, str]:
        return {sid: mesh.config(sid)["snapshot"]["certificate"]["roots_version"] for sid in ids}

    first, first_roots = serials(), roots()
    with Traffic(mesh.web_local) as traffic:
        # leaves are 12 s long: every sidecar renews within ~11 s
        wait_for(lambda: all(serials()[s] != first[s] for s in first), timeout=40, interval=0.5,
                 what="every sidecar renewed its leaf")
        res = subprocess.run([*WEFT, "ca", "rotate"], env={**os.environ, **mesh.env},
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        wait_for(lambda: all(roots()[s] != first_roots[s] for s in first_roots), timeout=40,
                 interval=0.5, what="every sidecar has the new roots")
        renewed = serials()
        wait_for(lambda: all(serials()[s] != renewed[s] for s in renewed), timeout=40, interval=0.5,
                 what="every sidecar renewed under the new root")
        time.sleep(1)
    assert traffic.failures == []
    assert traffic.total > 20


def test_drain_on_sigterm_then_instance_killed(mesh: Mesh) -> None:
    proc, _, public = mesh.sidecars["api-2"]
    with Traffic(mesh.web_local) as traffic:
        time.sleep(0.5)
        proc.signal(signal.SIGTERM)
        wait_for(lambda: not proc.alive(), timeout=30, what="the sidecar to drain and exit")
        time.sleep(0.5)
    assert proc.popen.returncode == 0, proc.output()[-2000:]
    # the agent made this proxy registration (Connect.SidecarService): it is put back as the agent had
    # it, critical while nothing listens, so that a restarted sidecar finds its port and upstreams
    passing = mesh.consul("GET", "/v1/health/connect/api?passing")
    assert [e["Service"]["ID"] for e in passing] == ["api-1-sidecar-proxy"]
    restored = mesh.consul("GET", "/v1/agent/service/api-2-sidecar-proxy")
    assert restored["Port"] == public and restored["Kind"] == "connect-proxy"
    assert traffic.failures == []
    # back again, then killed mid-traffic: calls move to the other instance
    mesh.start_sidecar("api-2", public)
    mesh.wait_ready("api-2")
    wait_for(lambda: len(mesh.consul("GET", "/v1/health/connect/api?passing")) == 2, timeout=30, what="api-2 back")
    wait_for(lambda: "api-2" in {unary(mesh.web_local).instance for _ in range(10)}, timeout=30, what="api-2 used")
    with Traffic(mesh.web_local) as traffic:
        time.sleep(0.5)
        mesh.sidecars["api-2"][0].kill()
        time.sleep(2.0)
        ok_before = dict(traffic.ok)
        time.sleep(2.0)
    moved = {k: traffic.ok.get(k, 0) - ok_before.get(k, 0) for k in traffic.ok}
    assert moved.get("api-2", 0) == 0 and moved.get("api-1", 0) > 0
    assert len(traffic.failures) <= 3, traffic.failures


def test_consul_stopped_traffic_continues(mesh: Mesh) -> None:
    mesh.agent.stop()
    with Traffic(mesh.web_local) as traffic:
        time.sleep(3)
    assert traffic.failures == []
    assert traffic.ok.get("api-1", 0) > 10
    assert http_ok(f"http://127.0.0.1:{mesh.sidecars['web-1'][1]}/ready")
