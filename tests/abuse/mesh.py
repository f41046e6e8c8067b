"""The mesh the abuse tier attacks, the victims that keep calling through it, and the checks.

One mesh for the whole tier, real processes on loopback: a dev agent, the CA, the policy service,
the gRPC echo app ``echo`` behind its sidecar (``echo-1``, default limits), the HTTP echo app
``httpapi`` behind its sidecar (``httpapi-1``), and a caller ``web`` whose sidecar (``web-1``) has
upstreams to both. Intentions for each: ``web`` allowed at L4 (its connections are passed through
to the app), ``l7caller`` allowed by an L7 rule (every call on the sidecar's per-call full path),
``intruder`` denied. The attacker holds certificates of those three identities from the dev CA
(``weft ca sign``).

Targets (where an attack is aimed, and which sidecar it attacks):

- ``outbound``: ``web-1``'s outbound listener, as a local app (plaintext HTTP/2);
- ``passthrough``: ``echo-1``'s public port as ``web`` (bytes passed through to the app);
- ``l7``: ``echo-1``'s public port as ``l7caller`` (the full path);
- ``denied``: ``echo-1``'s public port as ``intruder`` (every call refused);
- ``http_outbound`` / ``http_l7``: the same two for ``httpapi`` (HTTP/1.1).

While an attack runs, a victim client keeps calling through the attacked sidecar on connections
of its own (for the public port both through ``web``'s sidecar, pass-through, and directly as
``l7caller``, full path) and counts what succeeded. :class:`Watch` records the attacked sidecar's
RSS (peak, sampled from /proc) and metrics before and after, and collects every unmet condition of
issue 9's "Done when" into one failure message.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from tests.apps.echo import echo_pb2, echo_pb2_grpc
from tests.support import WEFT, DevAgent, Proc, free_port, http_ok, wait_for

ECHO_PATH = "/weft.test.echo.v1.Echo/"
UNARY = ECHO_PATH + "Unary"
SERVER_STREAM = ECHO_PATH + "ServerStream"
MAX_RSS_GROWTH_MB = 64.0
MIN_VICTIM_SUCCESS = 0.99
SETTLE = 0.3          # seconds the victim keeps calling after an attack, before the checks
H2_ERRORS = "weft_h2_protocol_errors_total"
REFUSED = "weft_connections_refused_total"
TLS_ERRORS = "weft_tls_handshake_errors_total"

# Extra flags per sidecar. The caller's: a small connection cap, so that the cap is reached cheaply;
# the caller's and the HTTP service's: a 1-second HTTP header timeout, so that slow clients are
# dropped within the test's bounds; the gRPC destination runs with the default limits.
FLAGS: dict[str, tuple[str, ...]] = {"web-1": ("--max-connections", "512", "--http-header-timeout", "1"),
                                     "echo-1": (),
                                     "httpapi-1": ("--http-header-timeout", "1")}


@dataclass(frozen=True)
class Target:
    name: str
    sidecar: str                  # the attacked sidecar's service id
    identity: str | None = None   # certificate the attacker presents (None: plaintext local app)
    service: str = "echo"         # the destination service: "echo" (gRPC) or "httpapi" (HTTP/1.1)

    def __str__(self) -> str:
        return self.name


OUTBOUND = Target("outbound", "web-1")
PASSTHROUGH = Target("passthrough", "echo-1", "web")
L7 = Target("l7", "echo-1", "l7caller")
DENIED = Target("denied", "echo-1", "intruder")
ALL_TARGETS = (OUTBOUND, PASSTHROUGH, L7, DENIED)
HTTP_OUTBOUND = Target("http_outbound", "web-1", None, "httpapi")
HTTP_L7 = Target("http_l7", "httpapi-1", "l7caller", "httpapi")


def rss_mb(pid: int) -> float:
    """VmRSS of a process in MiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class Sidecar:
    sid: str
    proc: Proc
    admin: int
    public: int
    baseline_rss: float = 0.0


@dataclass
class Mesh:
    agent: DevAgent
    tmp: Path
    procs: list[Proc] = field(default_factory=list)
    sidecars: dict[str, Sidecar] = field(default_factory=dict)
    echo_app: Proc | None = None
    http_app: Proc | None = None
    echo_port: int = 0
    http_port: int = 0
    web_local: int = 0             # web's outbound listener for echo
    http_local: int = 0            # web's outbound listener for httpapi
    certs: dict[str, Path] = field(default_factory=dict)
    trust_domain: str = ""
    restarts: list[str] = field(default_factory=list)

    # -- processes ---------------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        return {**self.agent.env, "WEFT_LOG_LEVEL": "warn"}

    def consul(self, method: str, path: str, body: Any = None) -> Any:
        payload = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.agent.url + path, data=payload, method=method)
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw.strip() else None

    def proc(self, name: str, args: list[str]) -> Proc:
        p = Proc(args, env=self.env, log=self.tmp / f"{name}-{len(self.procs)}.log")
        self.procs.append(p)
        return p

    def start_echo_app(self) -> None:
        self.echo_app = self.proc("echo-app", [sys.executable, "-m", "tests.apps.echo", "--port",
                                               str(self.echo_port), "--name", "echo-1"])
        wait_for(lambda: _connects(self.echo_port), timeout=30, what="the echo app listening")

    def start_http_app(self) -> None:
        self.http_app = self.proc("http-app", [sys.executable, "-m", "tests.apps.httpecho", "--port",
                                               str(self.http_port), "--name", "httpapi-1"])
        wait_for(lambda: _connects(self.http_port), timeout=30, what="the HTTP echo app listening")

    def register(self, sid: str, name: str, port: int, public: int, upstreams: list[tuple[str, int]],
                 protocol: str = "grpc") -> None:
        self.consul("PUT", "/v1/agent/service/register", {
            "ID": sid, "Name": name, "Address": "127.0.0.1", "Port": port, "Meta": {"protocol": protocol},
            "Connect": {"SidecarService": {"Port": public, "Proxy": {"Upstreams": [
                {"DestinationName": d, "LocalBindPort": p, "LocalBindAddress": "127.0.0.1"}
                for d, p in upstreams]}}}})

    def start_sidecar(self, sid: str, public: int, flags: Sequence[str] = ()) -> None:
        admin = free_port()
        proc = self.proc(f"sidecar-{sid}", [*WEFT, "sidecar", "--sidecar-for", sid, "--admin-port", str(admin),
                                            "--bind", "127.0.0.1", "--drain-timeout", "1", "--watch-wait", "10",
                                            *flags])
        self.sidecars[sid] = Sidecar(sid, proc, admin, public)

    def wait_ready(self, *sids: str, timeout: float = 90) -> None:
        def ready() -> bool:
            for sid in sids:
                sc = self.sidecars[sid]
                if not sc.proc.alive():
                    raise RuntimeError(f"sidecar {sid} exited:\n{sc.proc.output()[-3000:]}")
            return all(http_ok(f"http://127.0.0.1:{self.sidecars[s].admin}/ready") for s in sids)
        wait_for(ready, timeout=timeout, interval=0.2, what=f"sidecars {sids} ready")

    def wait_calls(self) -> None:
        wait_for(lambda: unary(f"127.0.0.1:{self.web_local}", timeout=3) is not None, timeout=60, interval=0.3,
                 what="a call through web's sidecar")
        wait_for(lambda: self.l7_call(timeout=3) is not None, timeout=60, interval=0.3,
                 what="a call as l7caller on echo's full path")
        wait_for(lambda: self.http_get(None) and self.http_get("l7caller"), timeout=60, interval=0.3,
                 what="HTTP requests to httpapi through web's sidecar and as l7caller")

    def sign(self, service: str) -> Path:
        out = self.tmp / f"cert-{service}"
        res = subprocess.run([*WEFT, "ca", "sign", "--service", service, "--out", str(out), "--ttl", "2h"],
                             env={**os.environ, **self.env}, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"weft ca sign --service {service}: {res.stderr}")
        (out / "full.pem").write_text((out / "cert.pem").read_text() + (out / "chain.pem").read_text())
        return out

    def healthy(self, sid: str) -> tuple[bool, str]:
        sc = self.sidecars[sid]
        if not sc.proc.alive():
            return False, f"sidecar {sid} exited with {sc.proc.popen.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{sc.admin}/ready", timeout=2) as resp:
                if resp.status != 200:
                    return False, f"sidecar {sid} not ready ({resp.status})"
        except OSError as exc:
            return False, f"sidecar {sid} does not answer its admin API: {exc!r}"
        rss = rss_mb(sc.proc.pid)
        if rss > sc.baseline_rss + MAX_RSS_GROWTH_MB:
            return False, f"sidecar {sid} at {rss:.0f} MiB of RSS (started at {sc.baseline_rss:.0f})"
        return True, "ok"

    def calls_work(self) -> bool:
        try:
            unary(f"127.0.0.1:{self.web_local}", timeout=3)
            self.l7_call(timeout=3)
        except grpc.RpcError:
            return False
        return self.http_get(None) and self.http_get("l7caller")

    def restart_sidecar(self, sid: str) -> None:
        sc = self.sidecars[sid]
        sc.proc.kill()
        self.start_sidecar(sid, sc.public, FLAGS[sid])
        self.wait_ready(sid)

    def restore(self) -> None:
        """After a test: restart the echo app or a sidecar that an attack left dead, stuck, bloated or
        unable to carry calls (a leaked window), so that one successful attack does not fail the tests
        after it."""
        restarted = []
        if self.echo_app is not None and not self.echo_app.alive():
            restarted.append("echo app")
            self.start_echo_app()
        if self.http_app is not None and not self.http_app.alive():
            restarted.append("http app")
            self.start_http_app()
        for sid in FLAGS:
            ok, why = self.healthy(sid)
            if not ok:
                restarted.append(f"{sid} ({why})")
                self.restart_sidecar(sid)
        if not self.calls_work():
            for sid in FLAGS:
                if sid not in " ".join(restarted):
                    restarted.append(f"{sid} (calls through it fail)")
                    self.restart_sidecar(sid)
        if restarted:
            self.restarts.extend(restarted)
            self.wait_calls()
            for sid in FLAGS:
                self.sidecars[sid].baseline_rss = rss_mb(self.sidecars[sid].proc.pid)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.agent.stop()

    # -- talking to it -----------------------------------------------------------------------------
    def metrics_text(self, sid: str, timeout: float = 2.0) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.sidecars[sid].admin}/metrics",
                                        timeout=timeout) as resp:
                return str(resp.read().decode())
        except OSError:
            return None

    def metric(self, sid: str, prefix: str) -> float:
        """Sum of every series of a metric on a sidecar's admin /metrics (-1 when unreadable)."""
        return metric_sum(self.metrics_text(sid), prefix)

    def tls_context(self, identity: str, alpn: str = "h2") -> ssl.SSLContext:
        d = self.certs[identity]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(str(d / "roots.pem"))
        ctx.load_cert_chain(str(d / "full.pem"), str(d / "key.pem"))
        ctx.set_alpn_protocols([alpn])
        return ctx

    def connect(self, target: Target, *, rcvbuf: int | None = None, timeout: float = 10.0) -> socket.socket:
        """A connection to the target as the attacker: plaintext to web's outbound listener for the
        target's service, or mTLS with the target's identity to the service's public port (the
        handshake done; ALPN h2 for gRPC, http/1.1 for HTTP)."""
        http = target.service == "httpapi"
        if target.identity is None:
            port = self.http_local if http else self.web_local
        else:
            port = self.sidecars[f"{target.service}-1"].public
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(timeout)
        raw.connect(("127.0.0.1", port))
        if target.identity is None:
            return raw
        ctx = self.tls_context(target.identity, "http/1.1" if http else "h2")
        return ctx.wrap_socket(raw, server_hostname=target.service)

    def http_get(self, identity: str | None, timeout: float = 3.0) -> bool:
        """One GET to httpapi: through web's sidecar (``identity`` None) or on a fresh mTLS connection to
        httpapi's public port as ``identity``; True when it answered 200."""
        if identity is None:
            url, ctx = f"http://127.0.0.1:{self.http_local}/victim", None
        else:
            url, ctx = f"https://127.0.0.1:{self.sidecars['httpapi-1'].public}/victim", \
                self.tls_context(identity, "http/1.1")
        try:
            with urllib.request.urlopen(url, timeout=timeout, context=ctx) as resp:
                resp.read()
                return bool(resp.status == 200)
        except OSError:
            return False

    def grpc_credentials(self, identity: str) -> grpc.ChannelCredentials:
        d = self.certs[identity]
        return grpc.ssl_channel_credentials((d / "roots.pem").read_bytes(), (d / "key.pem").read_bytes(),
                                            (d / "full.pem").read_bytes())

    def l7_channel(self) -> grpc.Channel:
        """A fresh mTLS channel to echo's public port as ``l7caller`` (the full path)."""
        return grpc.secure_channel(f"127.0.0.1:{self.sidecars['echo-1'].public}", self.grpc_credentials("l7caller"),
                                   options=[("grpc.ssl_target_name_override", f"echo.svc.default.{self.trust_domain}"),
                                            ("grpc.use_local_subchannel_pool", 1)])

    def l7_call(self, timeout: float = 10, **kw: Any) -> echo_pb2.EchoResponse:
        with self.l7_channel() as ch:
            stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
            resp: echo_pb2.EchoResponse = stub.Unary(echo_pb2.EchoRequest(text="fresh"), timeout=timeout, **kw)
            return resp

    def victim_channels(self, target: Target) -> list[tuple[str, grpc.Channel]]:
        web = ("via web's sidecar", grpc.insecure_channel(f"127.0.0.1:{self.web_local}",
                                                          options=[("grpc.use_local_subchannel_pool", 1)]))
        if target.sidecar == "web-1":
            return [web]
        return [web, ("as l7caller, full path", self.l7_channel())]

    def victim_for(self, target: Target, response_size: int = 0) -> Victim:
        """Calls through the attacked sidecar on connections of their own: gRPC unary calls to echo (on
        channels opened before the attack) or HTTP GETs to httpapi, the way the target's other
        callers make them."""
        if target.service == "httpapi":
            calls: list[tuple[str, Callable[[], None]]] = [("GET via web's sidecar", lambda: _http_ok(self, None))]
            if target.sidecar != "web-1":
                calls.append(("GET as l7caller, fresh mTLS", lambda: _http_ok(self, "l7caller")))
            return Victim(calls, [])
        channels = self.victim_channels(target)
        request = echo_pb2.EchoRequest(text="victim", response_size=response_size)

        def caller(ch: grpc.Channel) -> Callable[[], None]:
            stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
            return lambda: stub.Unary(request, timeout=5)

        return Victim([(name, caller(ch)) for name, ch in channels], [ch.close for _, ch in channels])

    def watch(self, target: Target) -> Watch:
        return Watch(self, target)


def metric_sum(text: str | None, prefix: str) -> float:
    if text is None:
        return -1.0
    total = 0.0
    for line in text.splitlines():
        if line.startswith(prefix) and line[len(prefix):len(prefix) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _connects(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def unary(target: str, timeout: float = 10, **kw: Any) -> echo_pb2.EchoResponse:
    with grpc.insecure_channel(target) as ch:
        stub = echo_pb2_grpc.EchoStub(ch)  # type: ignore[no-untyped-call]
        resp: echo_pb2.EchoResponse = stub.Unary(echo_pb2.EchoRequest(text="hi"), timeout=timeout, **kw)
        return resp


def _http_ok(mesh: Mesh, identity: str | None) -> None:
    if not mesh.http_get(identity, timeout=5):
        raise OSError("the GET did not answer 200")


class Victim:
    """Calls in a loop from a thread (each ``call`` raises when it fails), warmed up before the attack;
    counts successes and failures. ``closers`` run at the end (the gRPC channels)."""

    def __init__(self, calls: Sequence[tuple[str, Callable[[], object]]], closers: list[Callable[[], None]]) -> None:
        self.calls = calls
        self.closers = closers
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="victim")

    def _call(self, name: str, call: Callable[[], object]) -> None:
        try:
            call()
            self.ok += 1
        except grpc.RpcError as exc:
            self.failures.append(f"{name}: {exc.code()}: {exc.details()}")  # type: ignore[attr-defined]
        except OSError as exc:
            self.failures.append(f"{name}: {exc!r}")

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, call in self.calls:
                self._call(name, call)
            time.sleep(0.01)

    @property
    def total(self) -> int:
        return self.ok + len(self.failures)

    def start(self) -> None:
        for _name, call in self.calls:  # connected and warm before the attack; not counted
            deadline = time.monotonic() + 15
            while True:
                try:
                    call()
                    break
                except (grpc.RpcError, OSError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        for close in self.closers:
            close()


class PeakRss:
    """Samples a process's VmRSS every 50 ms from a thread; ``peak`` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss")

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mb(self.pid))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, rss_mb(self.pid))


class Watch:
    """Around one attack: the attacked sidecar's RSS and metrics, a victim calling through it, and
    the list of unmet conditions (``problems``), asserted at the end by :meth:`verify`."""

    def __init__(self, mesh: Mesh, target: Target) -> None:
        self.mesh = mesh
        self.target = target
        self.sidecar = mesh.sidecars[target.sidecar]
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.victim = mesh.victim_for(target)
        self.rss = PeakRss(self.sidecar.proc.pid)
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}
        self.rss_before = 0.0
        self.rss_after = 0.0

    def __enter__(self) -> Watch:
        self.victim.start()
        text = self.mesh.metrics_text(self.target.sidecar)
        for name in (H2_ERRORS, REFUSED, TLS_ERRORS):
            self.before[name] = metric_sum(text, name)
        self.rss_before = rss_mb(self.sidecar.proc.pid)
        self.rss.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(SETTLE)  # the victim keeps calling a little after the attack
        self.rss.stop()
        self.victim.stop()
        self.rss_after = rss_mb(self.sidecar.proc.pid)
        text = self.mesh.metrics_text(self.target.sidecar)
        for name in (H2_ERRORS, REFUSED, TLS_ERRORS):
            self.after[name] = metric_sum(text, name)

    def expect(self, condition: bool, what: str, detail: str = "") -> None:
        """One required behaviour of the sidecar toward the attacker."""
        if not condition:
            self.problems.append(f"expected {what}" + (f"; got: {detail}" if detail else ""))

    def counted(self, metric: str) -> float:
        return self.after.get(metric, 0.0) - self.before.get(metric, 0.0)

    def verify(self, *, counted: str | None = None, at_least: float = 1) -> None:
        """Assert issue 9's "Done when" for this attack: the sidecar alive (and answering), RSS growth
        (peak during the attack) under 64 MB, the victim's calls >= 99 % successful, every expected
        refusal seen by the attacker, and (``counted``) the refusal counted in that metric."""
        sid = self.target.sidecar
        alive, why = self.mesh.healthy(sid)
        if not self.sidecar.proc.alive():
            self.problems.append(f"the sidecar {sid} died: {self.sidecar.proc.output()[-1500:]}")
        elif not alive and "RSS" not in why:
            self.problems.append(why)
        growth = max(self.rss.peak, self.rss_after) - self.rss_before
        if growth >= MAX_RSS_GROWTH_MB:
            self.problems.append(f"RSS of {sid} grew by {growth:.0f} MiB (from {self.rss_before:.0f}, peak "
                                 f"{self.rss.peak:.0f}, after {self.rss_after:.0f}); limit {MAX_RSS_GROWTH_MB:.0f}")
        v = self.victim
        if v.total == 0 or v.ok / v.total < MIN_VICTIM_SUCCESS:
            self.problems.append(f"victim calls: {v.ok} of {v.total} succeeded; first failures: {v.failures[:3]}")
        if counted is not None and self.counted(counted) < at_least:
            self.problems.append(f"{counted} on {sid} went from {self.before.get(counted)} to "
                                 f"{self.after.get(counted)} (at least +{at_least:g} expected)")
        summary = (f"[{self.target}] victim {v.ok}/{v.total} ok; RSS {self.rss_before:.0f} -> peak "
                   f"{self.rss.peak:.0f} -> {self.rss_after:.0f} MiB; "
                   + "; ".join(f"{k} +{self.counted(k):g}" for k in self.before) + "".join(
                       f"; {n}" for n in self.notes))
        print(summary)
        assert not self.problems, summary + "\n" + "\n".join(f"- {p}" for p in self.problems)


def start_mesh(tmp: Path) -> Mesh:
    agent = DevAgent()
    m = Mesh(agent=agent, tmp=tmp)
    try:
        m.proc("ca", [*WEFT, "ca", "serve", "-dev", "--listen", f"127.0.0.1:{free_port()}"])
        m.proc("policy", [*WEFT, "policy", "serve", "-grpc-addr", f"127.0.0.1:{free_port()}"])
        intentions = {"Kind": "service-intentions", "Name": "echo", "Sources": [
            {"Name": "web", "Action": "allow"},
            {"Name": "l7caller", "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": ECHO_PATH}}]},
            {"Name": "intruder", "Action": "deny"}]}
        m.consul("PUT", "/v1/kv/weft/intentions/echo", json.dumps(intentions).encode())
        intentions = {"Kind": "service-intentions", "Name": "httpapi", "Sources": [
            {"Name": "web", "Action": "allow"},
            {"Name": "l7caller", "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]},
            {"Name": "intruder", "Action": "deny"}]}
        m.consul("PUT", "/v1/kv/weft/intentions/httpapi", json.dumps(intentions).encode())
        m.echo_port, m.http_port = free_port(), free_port()
        m.start_echo_app()
        m.start_http_app()
        publics = {sid: free_port() for sid in FLAGS}
        m.register("echo-1", "echo", m.echo_port, publics["echo-1"], [])
        m.register("httpapi-1", "httpapi", m.http_port, publics["httpapi-1"], [], protocol="http")
        m.web_local, m.http_local = free_port(), free_port()
        m.register("web-1", "web", free_port(), publics["web-1"], [("echo", m.web_local), ("httpapi", m.http_local)])
        for sid, flags in FLAGS.items():
            m.start_sidecar(sid, publics[sid], flags)
        wait_for(lambda: http_ok(f"{agent.url}/v1/kv/weft/ca/roots"), timeout=60, what="the CA's roots")
        for identity in ("web", "l7caller", "intruder"):
            m.certs[identity] = m.sign(identity)
        m.wait_ready(*FLAGS)
        with urllib.request.urlopen(f"http://127.0.0.1:{m.sidecars['echo-1'].admin}/config", timeout=10) as resp:
            m.trust_domain = json.loads(resp.read())["snapshot"]["certificate"]["trust_domain"]
        m.wait_calls()
        for sc in m.sidecars.values():
            sc.baseline_rss = rss_mb(sc.proc.pid)
        return m
    except BaseException:
        m.stop()
        raise


def connection_count_fits(n: int) -> bool:
    """Whether this process may open ``n`` more sockets (the tier holds thousands at once)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft == resource.RLIM_INFINITY or soft > n + 200

