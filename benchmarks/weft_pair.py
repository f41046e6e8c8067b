"""The Weft side of the sidecar benchmark, started for real on loopback.

dev agent (`weft agent -dev`), CA (`weft ca serve -dev`), policy service (`weft policy serve`),
the echo app registered as service `echo` (gRPC) and the TCP echo app as `tcpecho` (TCP), a
`client` service whose sidecar has both as upstreams, an intention allowing `client` -> each, and
one sidecar per service (`weft sidecar --sidecar-for ID`). The same echo app is also registered as
`echol7`, whose intention allows `client` by an L7 permission (gRPC path prefix), so that its sidecar
authorizes every call on the full path instead of passing an L4-allowed connection through: the
informational path `weft_l7`. For the memory scenario: a `memclient`
service with ten upstreams `mem0`..`mem9` (ten more sidecars, all in front of the same echo app).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.harness import load, memory_breakdown_mb, ready_grpc, rss_mb
from benchmarks.lean_venv import lean_interpreter
from tests.support import REPO, WEFT, DevAgent, Proc, free_port, http_ok, wait_for

MEM_UPSTREAMS = 10
TRACED_CALLS = 20000  # calls through the traced sidecar (steady state is reached well before)
TRACE_FRAMES = 16     # frames kept per allocation: enough to see past the import machinery


class Stack:
    def __init__(self, workdir: Path, app_port: int, tcp_port: int) -> None:
        self.workdir = workdir
        self.app_port = app_port
        self.tcp_port = tcp_port
        self.agent: DevAgent | None = None
        self.procs: list[Proc] = []
        self.sidecars: dict[str, tuple[Proc, int]] = {}  # service id -> (process, admin port)
        self.public_ports: dict[str, int] = {}
        self.ca_addr = ""
        self.grpc_local = free_port()
        self.tcp_local = free_port()
        self.l7_local = free_port()

    # -- helpers ------------------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        assert self.agent is not None
        return self.agent.env

    def _consul(self, method: str, path: str, body: Any = None) -> Any:
        assert self.agent is not None
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.agent.url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{method} {path}: HTTP {exc.code}: {exc.read()[:500]!r}") from None
        return json.loads(raw) if raw.strip() else None

    def _proc(self, name: str, args: list[str]) -> Proc:
        proc = Proc(args, env=self.env, log=self.workdir / f"{name}.log")
        self.procs.append(proc)
        return proc

    def _register(self, name: str, port: int, protocol: str, upstreams: list[tuple[str, int]]) -> None:
        public = self.public_ports[name] = free_port()
        self._consul("PUT", "/v1/agent/service/register", {
            "ID": name, "Name": name, "Address": "127.0.0.1", "Port": port, "Meta": {"protocol": protocol},
            "Connect": {"SidecarService": {"Port": public, "Proxy": {"Upstreams": [
                {"DestinationName": dest, "LocalBindPort": local, "LocalBindAddress": "127.0.0.1"}
                for dest, local in upstreams]}}},
        })

    def _allow(self, source: str, destination: str, *, l7_prefix: str = "") -> None:
        """An L4 allow, or with `l7_prefix` an L7 one (HTTP PathPrefix), which puts every call on the full path."""
        rule: dict[str, Any] = {"Name": source, "Action": "allow"}
        if l7_prefix:
            rule = {"Name": source, "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": l7_prefix}}]}
        doc = {"Kind": "service-intentions", "Name": destination, "Sources": [rule]}
        self._consul("PUT", f"/v1/kv/weft/intentions/{destination}", json.dumps(doc).encode())

    def _sidecar(self, service_id: str, env: dict[str, str] | None = None, python: str | None = None) -> None:
        admin = free_port()
        weft = [python, *WEFT[1:]] if python else WEFT
        proc = Proc([*weft, "sidecar", "--sidecar-for", service_id, "--admin-port", str(admin),
                     "--public-port", str(self.public_ports[service_id]), "--ca-addr", self.ca_addr],
                    env={**self.env, **(env or {})}, log=self.workdir / f"sidecar-{service_id}.log")
        self.procs.append(proc)
        self.sidecars[service_id] = (proc, admin)

    def _wait_ready(self, ids: list[str], timeout: float = 90) -> None:
        def ready() -> bool:
            for sid in ids:
                proc = self.sidecars[sid][0]
                if not proc.alive():
                    raise RuntimeError(f"sidecar {sid} exited:\n{proc.output()[-3000:]}")
            return all(http_ok(f"http://127.0.0.1:{self.sidecars[s][1]}/ready") for s in ids)
        try:
            wait_for(ready, timeout=timeout, interval=0.2, what=f"sidecars {ids} ready")
        except TimeoutError as exc:
            logs = "\n".join(f"--- {s}\n{self.sidecars[s][0].output()[-1500:]}" for s in ids)
            raise RuntimeError(f"{exc}\n{logs}") from None

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.agent = DevAgent()
        self.ca_addr = f"127.0.0.1:{free_port()}"
        ca = self._proc("ca", [*WEFT, "ca", "serve", "-dev", "--listen", self.ca_addr])
        policy = self._proc("policy", [*WEFT, "policy", "serve", "-grpc-addr", f"127.0.0.1:{free_port()}"])
        self._register("echo", self.app_port, "grpc", [])
        self._register("tcpecho", self.tcp_port, "tcp", [])
        self._register("echol7", self.app_port, "grpc", [])
        self._register("client", free_port(), "grpc", [("echo", self.grpc_local), ("tcpecho", self.tcp_local),
                                                       ("echol7", self.l7_local)])
        self._allow("client", "echo")
        self._allow("client", "tcpecho")
        self._allow("client", "echol7", l7_prefix="/weft.test.echo.v1.Echo/")
        for sid in ("echo", "tcpecho", "echol7", "client"):
            self._sidecar(sid)
        for proc, what in ((ca, "CA"), (policy, "policy service")):
            if not proc.alive():
                raise RuntimeError(f"{what} exited:\n{proc.output()[-3000:]}")
        self._wait_ready(["echo", "tcpecho", "echol7", "client"])
        wait_for(ready_grpc(self.grpc_target), timeout=60, interval=0.5, what="a call through the weft pair")
        wait_for(ready_grpc(self.l7_target), timeout=60, interval=0.5, what="a call through the weft L7 pair")

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_local}"

    @property
    def tcp_target(self) -> str:
        return f"127.0.0.1:{self.tcp_local}"

    @property
    def l7_target(self) -> str:
        return f"127.0.0.1:{self.l7_local}"

    @property
    def l7_pids(self) -> list[int]:
        return [self.sidecars["client"][0].pid, self.sidecars["echol7"][0].pid]

    @property
    def grpc_pids(self) -> list[int]:
        return [self.sidecars["client"][0].pid, self.sidecars["echo"][0].pid]

    @property
    def tcp_pids(self) -> list[int]:
        return [self.sidecars["client"][0].pid, self.sidecars["tcpecho"][0].pid]

    def metrics(self, service_id: str) -> str:
        admin = self.sidecars[service_id][1]
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as resp:
            return str(resp.read().decode())

    def modes(self) -> dict[str, list[str]]:
        """What the sidecars say they did: inbound handling modes and request counts (from /metrics)."""
        wanted = ("weft_inbound_connections_total{", "weft_requests_total{", "weft_authz_decisions_total{")
        out: dict[str, list[str]] = {}
        for sid in ("client", "echo", "echol7", "tcpecho"):
            try:
                text = self.metrics(sid)
            except OSError as exc:
                out[sid] = [f"metrics unavailable: {exc}"]
                continue
            out[sid] = [line for line in text.splitlines() if line.startswith(wanted)][:20]
        return out

    def memory(self, calls: int, max_seconds: float) -> dict[str, Any]:
        """RSS of a sidecar with ten upstreams after `calls` calls spread over them, and after as many more;
        the memory scenario's sidecars run on a production-like interpreter (`benchmarks.lean_venv`)."""
        interp = lean_interpreter(REPO)
        locals_ = [free_port() for _ in range(MEM_UPSTREAMS)]
        names = [f"mem{i}" for i in range(MEM_UPSTREAMS)]
        for name in names:
            self._register(name, self.app_port, "grpc", [])
            self._allow("memclient", name)
        self._register("memclient", free_port(), "grpc", list(zip(names, locals_, strict=True)))
        for sid in (*names, "memclient"):
            self._sidecar(sid, python=interp.python)
        self._wait_ready([*names, "memclient"], timeout=180)
        targets = [f"127.0.0.1:{p}" for p in locals_]
        for target in targets:  # ready sidecars may not know every upstream's healthy endpoints yet
            wait_for(ready_grpc(target), timeout=60, interval=0.5, what=f"a call through {target}")
        pid = self.sidecars["memclient"][0].pid
        out: dict[str, Any] = {"interpreter": interp.note, "upstreams": MEM_UPSTREAMS,
                               "rss_mb_start": round(rss_mb(pid), 1)}
        phases = []
        for label in ("first", "second"):
            t0 = time.monotonic()
            result = load("unary", targets, "--calls", str(calls), "--concurrency", "32",
                          "--max-seconds", str(max_seconds), timeout=max_seconds + 120)
            phases.append(result)
            out[f"calls_{label}"] = result["calls"]
            out[f"errors_{label}"] = result["errors"]
            out[f"seconds_{label}"] = round(time.monotonic() - t0, 1)
            out[f"rps_{label}"] = result["rps"]
            out[f"rss_mb_after_{label}"] = round(rss_mb(pid), 1)
            out[f"breakdown_after_{label}"] = memory_breakdown_mb(pid)
        out["rss_growth_after_second"] = round(out["rss_mb_after_second"] / out["rss_mb_after_first"] - 1, 4)
        out["completed"] = all(p["calls"] >= calls for p in phases)
        out["server_sidecar_rss_mb_max"] = round(max(rss_mb(self.sidecars[n][0].pid) for n in names), 1)
        out["rss_mb"] = out["rss_mb_after_second"]
        out["by_package"] = self._traced_breakdown(names, locals_, min(calls, TRACED_CALLS), max_seconds,
                                                   interp.python)
        return out

    def _traced_breakdown(self, names: list[str], locals_: list[int], calls: int,
                          max_seconds: float, python: str) -> dict[str, Any]:
        """Where the memory goes, by top-level package: a second client sidecar like `memclient`, started
        with tracemalloc on (which costs memory of its own, so the RSS figures above come from the
        untraced one), after `calls` calls over the same ten upstreams; its admin API's /memory."""

        binds = [free_port() for _ in names]
        for name in names:
            self._allow("memtrace", name)
        self._register("memtrace", free_port(), "grpc", list(zip(names, binds, strict=True)))
        self._sidecar("memtrace", env={"PYTHONTRACEMALLOC": str(TRACE_FRAMES)}, python=python)
        self._wait_ready(["memtrace"], timeout=180)
        admin = self.sidecars["memtrace"][1]
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/memory", timeout=300) as resp:
            at_start = json.loads(resp.read())
        result = load("unary", [f"127.0.0.1:{p}" for p in binds], "--calls", str(calls), "--concurrency", "32",
                      "--max-seconds", str(max_seconds), timeout=max_seconds + 120)
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/memory", timeout=300) as resp:
            after = json.loads(resp.read())
        return {"calls": result["calls"], "tracemalloc_frames": TRACE_FRAMES, "ready": at_start, "after_calls": after}

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        if self.agent is not None:
            self.agent.stop()
