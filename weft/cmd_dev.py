"""`weft dev`: the whole mesh and a demo on this machine, in one command (`make dev` runs it).

What it starts, in order, each as a child process in its own process group with its log in
`.weft-dev/logs/<name>.log`:

1. the dev agent (`weft agent -dev`) at `CONSUL_HTTP_ADDR` (default 127.0.0.1:8500), unless a Consul
   already answers there (then that one is used, and the demo's old registrations are removed first);
2. the CA (`weft ca serve -dev`) and the policy service (`weft policy serve`, default deny);
3. the demo services registered from their Consul service definitions (`weft/demo/services/*.hcl|json`),
   and the intentions frontend -> greeter and greeter -> store (everything else is denied by default);
4. the three apps (`python -m weft.demo.frontend|greeter|store`) and a sidecar for each
   (`weft sidecar --sidecar-for <id> --admin-port <port>`);
5. a gentle traffic generator (`python -m weft.demo.traffic`) calling the frontend.

Then it prints what runs where and what to try. Ctrl-C (or SIGTERM) stops everything: SIGTERM to
every child's process group, SIGKILL to what is left after `-stop-timeout`. The pids (with their
start times) are kept in `.weft-dev/state.json`; a `weft dev` after a crash first reaps whatever the
crashed one left running, and children also get SIGTERM from the kernel when `weft dev` dies
(Linux). The dev agent keeps everything in memory, so no stale registrations survive it.

Ports are the fixed defaults of the service definitions (apps 19100/19200/19300, upstream binds
19101/19201, sidecars 21100/21200/21300, admin 19102/19202/19302, CA 8553, policy 8507) and a busy one
is a clear error; `-free-ports` picks free ones instead (tests use it) and rewrites the definitions.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from weft import devstate

DEMO_SERVICES = Path(__file__).resolve().parent / "demo" / "services"
DEMO_CONFIG = Path(__file__).resolve().parent / "demo" / "config"  # the canary's config entries
# start order: callees first; key -> the service ID of its definition (greeter-v2 is greeter's canary)
DEMO_ORDER = ("store", "greeter", "greeter-v2", "frontend")
DEMO_IDS = {"store": "store-1", "greeter": "greeter-1", "greeter-v2": "greeter-2", "frontend": "frontend-1"}
ADMIN_PORTS = {"frontend": 19102, "greeter": 19202, "greeter-v2": 19212, "store": 19302}
CA_PORT = 8553
POLICY_PORT = 8507
INTENTIONS = (("frontend", "greeter"), ("greeter", "store"))
STATE_FILE = devstate.STATE_FILE


class DevError(Exception):
    """Something that stops `weft dev` from starting; the message says what and what to do."""


# ---------------------------------------------------------------------------------------------------
# Pure: the plan


@dataclass(frozen=True)
class DemoService:
    key: str  # unique in the demo: the service name, or "greeter-v2" for greeter's second version
    name: str  # the Consul service name
    id: str
    port: int
    sidecar_port: int
    admin_port: int
    upstreams: tuple[tuple[str, int], ...]  # (destination, local bind port)
    payload: Mapping[str, Any]
    version: str = ""  # Meta.version: the app announces it (x-greeter-version)


@dataclass(frozen=True)
class Plan:
    consul_host: str
    consul_port: int
    ca_port: int
    policy_port: int
    services: tuple[DemoService, ...]

    def service(self, key: str) -> DemoService:
        for s in self.services:
            if s.key == key:
                return s
        raise KeyError(key)

    def ports(self) -> dict[str, int]:
        """Every port the plan listens on, by role (for the busy-port check and state.json)."""
        out = {"consul": self.consul_port, "ca": self.ca_port, "policy": self.policy_port}
        for s in self.services:
            out[f"{s.key}.app"] = s.port
            out[f"{s.key}.sidecar"] = s.sidecar_port
            out[f"{s.key}.admin"] = s.admin_port
            for dest, bind in s.upstreams:
                out[f"{s.key}.upstream.{dest}"] = bind
        return out


def rewrite_ports(payload: Mapping[str, Any], mapping: Mapping[int, int]) -> dict[str, Any]:
    """A copy of a register payload with every port in `mapping` replaced: the service and sidecar
    `Port`, upstream `LocalBindPort`s, and the ports inside check targets (HTTP URLs, host:port)."""
    out: dict[str, Any] = copy.deepcopy(dict(payload))

    def fix_target(target: str) -> str:
        # the port of the authority only: "host:port[/...]" or "scheme://host:port[/...]"
        scheme, sep, rest = target.partition("://")
        if not sep:
            scheme, rest = "", target
        authority, slash, tail = rest.partition("/")
        host, colon, port = authority.rpartition(":")
        if colon and port.isdigit():
            authority = f"{host}:{mapping.get(int(port), int(port))}"
        return (f"{scheme}://" if sep else "") + authority + slash + tail

    def fix_checks(checks: list[dict[str, Any]]) -> None:
        for check in checks:
            for key in ("HTTP", "TCP", "GRPC", "H2PING", "UDP"):
                if isinstance(check.get(key), str):
                    check[key] = fix_target(check[key])

    if "Port" in out:
        out["Port"] = mapping.get(out["Port"], out["Port"])
    fix_checks(out.get("Checks") or [])
    sidecar = (out.get("Connect") or {}).get("SidecarService")
    if sidecar is not None:
        if "Port" in sidecar:
            sidecar["Port"] = mapping.get(sidecar["Port"], sidecar["Port"])
        fix_checks(sidecar.get("Checks") or [])
        for up in (sidecar.get("Proxy") or {}).get("Upstreams") or []:
            up["LocalBindPort"] = mapping.get(up["LocalBindPort"], up["LocalBindPort"])
    return out


def demo_services(payloads: Sequence[Mapping[str, Any]], admin_ports: Mapping[str, int]) -> list[DemoService]:
    """The demo's services from their register payloads, in start order; checks that they are complete."""
    by_id = {p.get("ID") or p["Name"]: p for p in payloads}
    missing = [DEMO_IDS[k] for k in DEMO_ORDER if DEMO_IDS[k] not in by_id]
    if missing:
        raise DevError(f"demo service definitions lack {', '.join(missing)} (in {DEMO_SERVICES})")
    out = []
    for key in DEMO_ORDER:
        p = by_id[DEMO_IDS[key]]
        name = p["Name"]
        sidecar = (p.get("Connect") or {}).get("SidecarService")
        if sidecar is None or "Port" not in sidecar:
            raise DevError(f"{name}: the demo definition needs connect.sidecar_service with a port")
        ups = tuple((u["DestinationName"], int(u["LocalBindPort"]))
                    for u in (sidecar.get("Proxy") or {}).get("Upstreams") or [])
        out.append(DemoService(key=key, name=name, id=p.get("ID") or name, port=int(p["Port"]),
                               sidecar_port=int(sidecar["Port"]), admin_port=admin_ports[key], upstreams=ups,
                               payload=p, version=str((p.get("Meta") or {}).get("version", ""))))
    return out


def make_plan(payloads: Sequence[Mapping[str, Any]], *, consul_host: str, consul_port: int,
              free_port: Callable[[], int] | None = None) -> Plan:
    """The fixed-port plan, or with `free_port` every port (but Consul's) freshly chosen."""
    services = demo_services(payloads, ADMIN_PORTS)
    if free_port is None:
        return Plan(consul_host, consul_port, CA_PORT, POLICY_PORT, tuple(services))
    mapping: dict[int, int] = {}
    admin: dict[str, int] = {}
    for s in services:
        for port in (s.port, s.sidecar_port, *(b for _, b in s.upstreams)):
            if port not in mapping:
                mapping[port] = free_port()
        admin[s.key] = free_port()
    rewritten = [rewrite_ports(p, mapping) for p in payloads]
    return Plan(consul_host, consul_port, free_port(), free_port(), tuple(demo_services(rewritten, admin)))


def app_command(python: str, service: DemoService, log_level: str) -> list[str]:
    args = [python, "-m", f"weft.demo.{service.name}", "-port", str(service.port), "-log-level", log_level]
    for dest, bind in service.upstreams:
        args += [f"-{dest}-addr", f"127.0.0.1:{bind}"]
    if service.version:
        args += ["-version", service.version]
    return args


def summary(plan: Plan, *, started_agent: bool, state_dir: Path, traffic_rps: float | None,
            default_consul: bool) -> str:
    consul_url = f"http://{plan.consul_host}:{plan.consul_port}"
    logs = state_dir / "logs"
    lines = [
        "",
        f"weft dev: the mesh is up. Logs in {logs}/, state in {state_dir / STATE_FILE}.",
        "",
        f"  Consul       {consul_url}" + ("  (weft agent -dev, in memory)" if started_agent else "  (already running)"),
        f"  CA           127.0.0.1:{plan.ca_port}  (weft ca serve -dev; trust bundle in KV weft/ca/roots)",
        f"  policy       127.0.0.1:{plan.policy_port}  (weft policy serve; tables in KV weft/policy/compiled/)",
        "",
    ]
    head = ("SERVICE", "APP", "SIDECAR (mTLS)", "ADMIN (/metrics /config /ready)", "UPSTREAMS")
    rows = []
    for s in reversed(plan.services):
        ups = ", ".join(f"{d} at 127.0.0.1:{b}" for d, b in s.upstreams) or "-"
        rows.append((s.key, f"127.0.0.1:{s.port}", f"127.0.0.1:{s.sidecar_port}",
                     f"http://127.0.0.1:{s.admin_port}", ups))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    frontend = plan.service("frontend")
    lines.append("")
    lines.append("  intentions   frontend -> greeter allowed, greeter -> store allowed, everything else denied")
    lines.append("  canary       greeter: 90 % to v1, 10 % to v2, header x-canary: 1 to v2 "
                 f"(config entries in {DEMO_CONFIG})")
    if traffic_rps:
        lines.append(f"  traffic      {traffic_rps:g} requests/s to http://127.0.0.1:{frontend.port}")
    lines += ["", "Try (in another terminal):"]
    if not default_consul or (plan.consul_host, plan.consul_port) != ("127.0.0.1", 8500):
        # weft status/top/intention find this agent through the state file when run here; other
        # tools (curl, consul, consul-template) need the address
        lines.append(f"  export CONSUL_HTTP_ADDR={plan.consul_host}:{plan.consul_port}")
    lines += [
        f"  curl 'http://127.0.0.1:{frontend.port}/hello?name=ada'",
        f"  curl 'http://127.0.0.1:{frontend.port}/stream?name=ada&count=3'",
        f"  curl -H 'x-canary: 1' 'http://127.0.0.1:{frontend.port}/hello?name=ada'   # always greeter v2",
        "  weft config read -kind service-splitter -name greeter",
        "  weft top                                  # live rps, success rate, p50/p99 per edge",
        "  weft tap greeter                          # live calls into and out of greeter, one line each",
        "  weft status                               # services, sidecars, certificates, policy versions",
        "  weft intention deny frontend greeter      # frontend's calls now fail with 403 PERMISSION_DENIED",
        "  weft intention allow frontend greeter     # and succeed again",
        f"  curl http://127.0.0.1:{frontend.admin_port}/metrics | grep weft_requests_total",
        "",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# I/O: processes


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when weft dev dies
    except (OSError, AttributeError):
        pass


# the process helpers live with the state file's reader (weft.devstate); the names here stay for callers
_start_time = devstate.process_start_time
_running = devstate.running


@dataclass
class Child:
    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    started: str
    tier: int = 0  # stopped from the highest tier down: what depends on others goes first

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])


@dataclass
class Supervisor:
    state_dir: Path
    env: dict[str, str]
    children: list[Child] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], tier: int = 0) -> Child:
        logs = self.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        log: IO[bytes] = open(log_path, "wb")  # the child has its own copy; closed below
        try:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True, preexec_fn=_pdeathsig)
        finally:
            log.close()
        child = Child(name, argv, popen, log_path, _start_time(popen.pid), tier)
        self.children.append(child)
        self.save()
        return child

    def save(self) -> None:
        state = dict(self.info)
        state["supervisor_pid"] = os.getpid()
        state["supervisor_started"] = _start_time(os.getpid())
        state["children"] = [{"name": c.name, "pid": c.pid, "started": c.started, "argv": c.argv}
                             for c in self.children]
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_dir / STATE_FILE)

    def dead(self) -> list[Child]:
        return [c for c in self.children if not c.alive()]

    def stop_all(self, timeout: float, hurry: Callable[[], bool] = lambda: False) -> list[str]:
        """Stop tier by tier, highest first (traffic, sidecars, apps, the control plane, then
        the agent, so that sidecars can still deregister): SIGTERM to each child's process group,
        SIGKILL to what remains after `timeout` (at once when `hurry()` turns true: a second Ctrl-C).
        Returns the names that had to be killed."""
        killed = []
        for tier in sorted({c.tier for c in self.children}, reverse=True):
            group = [c for c in self.children if c.tier == tier]
            for c in reversed(group):
                _signal_group(c.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and any(c.alive() for c in group) and not hurry():
                time.sleep(0.05)
            for c in group:
                if c.alive():
                    killed.append(c.name)
                _signal_group(c.pid, signal.SIGKILL)  # also catches a grandchild left in the group
            for c in group:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.popen.wait(5)
        return killed


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def reap_stale(state_dir: Path, timeout: float = 5.0) -> list[str]:
    """Stop what a crashed `weft dev` left running (only processes whose pid *and* start time match
    what it recorded, so a recycled pid is never touched). Returns the names stopped."""
    path = state_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    stale = []
    for entry in state.get("children", []):
        pid, started = int(entry.get("pid", 0)), str(entry.get("started", ""))
        if pid > 0 and started and _running(pid, started):
            stale.append((str(entry.get("name", pid)), pid, started))
    for _, pid, _ in stale:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_running(pid, st) for _, pid, st in stale):
        time.sleep(0.05)
    for _, pid, st in stale:
        if _running(pid, st):
            _signal_group(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        path.unlink()
    return [name for name, _, _ in stale]


# ---------------------------------------------------------------------------------------------------
# I/O: readiness


def _http_status(url: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0


def _http_ok(url: str, timeout: float = 1.0) -> bool:
    return _http_status(url, timeout) == 200


def _upstreams_known(config_url: str, timeout: float = 1.0) -> bool:
    """A sidecar's /config shows at least one endpoint for each of its upstreams."""
    try:
        with urllib.request.urlopen(config_url, timeout=timeout) as resp:
            doc = json.loads(resp.read(1 << 20))
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
        return False
    snapshot = doc.get("snapshot") if isinstance(doc, dict) else None
    if not isinstance(snapshot, dict):
        return False
    upstreams = snapshot.get("upstreams") or {}
    return all(isinstance(u, dict) and u.get("endpoints") for u in upstreams.values())


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stopped(Exception):
    """Ctrl-C / SIGTERM arrived while starting."""


def consul_address(env: Mapping[str, str]) -> tuple[str, int, bool]:
    """(host, port, is_default) of CONSUL_HTTP_ADDR; `weft dev` only runs its agent on plain http."""
    raw = env.get("CONSUL_HTTP_ADDR", "").strip()
    if not raw:
        return "127.0.0.1", 8500, True
    if raw.startswith("unix://") or raw.startswith("https://"):
        raise DevError(f"CONSUL_HTTP_ADDR={raw}: weft dev needs a plain http address (host:port)")
    parsed = urllib.parse.urlsplit(raw if "://" in raw else f"http://{raw}")
    if not parsed.hostname:
        raise DevError(f"CONSUL_HTTP_ADDR={raw}: expected host:port")
    return parsed.hostname, parsed.port or 8500, False


# ---------------------------------------------------------------------------------------------------
# The command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-state-dir", "--state-dir", default=".weft-dev",
                        help="where pids, ports and logs go (default .weft-dev)")
    parser.add_argument("-free-ports", "--free-ports", action="store_true",
                        help="pick free ports instead of the fixed defaults (the dev agent's too, "
                             "unless CONSUL_HTTP_ADDR is set)")
    parser.add_argument("-rps", "--rps", type=float, default=2.0, help="demo traffic, requests/s (default 2)")
    parser.add_argument("-no-traffic", "--no-traffic", action="store_true", help="do not start the traffic generator")
    parser.add_argument("-log-level", "--log-level", default="info", help="log level of the children (default info)")
    parser.add_argument("-ready-timeout", "--ready-timeout", type=float, default=90.0,
                        help="seconds to wait for each part to come up (default 90)")
    parser.add_argument("-stop-timeout", "--stop-timeout", type=float, default=8.0,
                        help="seconds between SIGTERM and SIGKILL when stopping (default 8)")


class _Dev:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.state_dir = Path(args.state_dir).resolve()
        self.stop_requested = False
        self.stopping = False
        self.hurry = False
        self.weft = [sys.executable, "-m", "weft.cli"]
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.sup = Supervisor(self.state_dir, self.env)
        self.external_plan: Plan | None = None

    def say(self, text: str) -> None:
        print(text, flush=True)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.stopping:
            self.hurry = True  # a second Ctrl-C while stopping: kill what is left
        self.stop_requested = True

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float | None = None,
                 interval: float = 0.1) -> None:
        deadline = time.monotonic() + (timeout or self.args.ready_timeout)
        while True:
            if self.stop_requested:
                raise Stopped()
            dead = self.sup.dead()
            if dead:
                c = dead[0]
                raise DevError(f"{c.name} exited with status {c.popen.returncode} while waiting for {what}; "
                               f"its log ({c.log_path}) ends with:\n{c.tail()}")
            try:
                if predicate():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise DevError(f"timed out waiting for {what}")
            time.sleep(interval)

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lock = self._lock()
        devstate.write_pointer(os.environ, self.state_dir)  # weft status & co. find this weft dev from anywhere
        try:
            stale = reap_stale(self.state_dir)
            if stale:
                self.say(f"weft dev: stopped {len(stale)} process(es) left by an earlier weft dev: {', '.join(stale)}")
            try:
                self._start()
            except Stopped:
                self.say("weft dev: interrupted while starting; stopping")
            except DevError as exc:
                print(f"weft dev: {exc}", file=sys.stderr, flush=True)
                self._stop()
                return 1
            else:
                self._supervise()
            self._stop()
            return 0
        finally:
            devstate.remove_pointer(os.environ, self.state_dir)
            with contextlib.suppress(OSError):
                lock.close()

    def _lock(self) -> IO[str]:
        import fcntl

        lock = open(self.state_dir / "lock", "w")  # held for the life of the process
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise DevError(f"another weft dev is running with state in {self.state_dir}; stop it first "
                           "(or use -state-dir)") from None
        return lock

    def _start(self) -> None:
        from catalog.servicedef import ServiceDefinitionError
        from weft.cmd_register import load_files

        host, port, default_consul = consul_address(self.env)
        if default_consul and self.args.free_ports:
            port = free_port()  # -free-ports covers the dev agent too, unless CONSUL_HTTP_ADDR names one
        try:
            payloads = [payload for _, payload in load_files([DEMO_SERVICES])]
        except ServiceDefinitionError as exc:
            raise DevError(str(exc)) from None
        consul_url = f"http://{host}:{port}"
        consul_up = _http_status(consul_url + "/v1/status/leader") == 200
        plan = make_plan(payloads, consul_host=host, consul_port=port,
                         free_port=free_port if self.args.free_ports else None)
        self._check_ports(plan, skip_consul=consul_up)
        self.env["CONSUL_HTTP_ADDR"] = f"{host}:{port}"
        self.sup.info = {"consul": consul_url, "ports": plan.ports(),
                         "admin": {s.key: f"http://127.0.0.1:{s.admin_port}" for s in plan.services},
                         "frontend": f"http://127.0.0.1:{plan.service('frontend').port}"}
        self.sup.save()

        started_agent = False
        if consul_up:
            self.say(f"weft dev: using the Consul that answers at {consul_url}")
            self._deregister_leftovers(plan)
            self.external_plan = plan  # deregister the demo from it again on the way out
        else:
            if host not in ("127.0.0.1", "localhost", "::1"):
                raise DevError(f"no Consul answers at {consul_url}, and weft dev starts its dev agent on loopback "
                               "only; unset CONSUL_HTTP_ADDR or point it at 127.0.0.1:<port>")
            self.say(f"weft dev: starting the dev agent at {consul_url}")
            self.sup.start("agent", [*self.weft, "agent", "-dev", "-http-port", str(port), "-client", host,
                                     "-log-level", self.args.log_level], tier=0)
            started_agent = True
            self.wait_for("the dev agent", lambda: _http_status(consul_url + "/v1/status/leader") == 200)

        self.say("weft dev: starting the CA and the policy service")
        self.sup.start("ca", [*self.weft, "ca", "serve", "-dev", "--listen", f"127.0.0.1:{plan.ca_port}",
                              "--log-level", self.args.log_level], tier=1)
        self.sup.start("policy", [*self.weft, "policy", "serve", "-grpc-addr", f"127.0.0.1:{plan.policy_port}",
                                  "-log-level", self.args.log_level], tier=1)
        self._register(plan)
        self._config_entries()
        self._intentions()
        self.wait_for("the CA's trust bundle (KV weft/ca/roots)",
                      lambda: _http_status(consul_url + "/v1/kv/weft/ca/roots") == 200)
        self.wait_for("the policy service's tables (KV weft/policy/compiled/)",
                      lambda: _http_status(consul_url + "/v1/kv/weft/policy/compiled/?keys") == 200)

        self.say("weft dev: starting the demo apps and their sidecars")
        for s in plan.services:
            self.sup.start(s.key, app_command(sys.executable, s, self.args.log_level), tier=2)
        for s in plan.services:
            self.sup.start(f"{s.key}-sidecar", [*self.weft, "sidecar", "--sidecar-for", s.id,
                                                 "--admin-port", str(s.admin_port), "--bind", "127.0.0.1",
                                                 "--log-level", self.args.log_level], tier=3)
        for s in plan.services:
            self.wait_for(f"{s.key} on port {s.port}", functools.partial(_tcp_open, "127.0.0.1", s.port))
        for s in plan.services:
            admin = f"http://127.0.0.1:{s.admin_port}"
            self.wait_for(f"{s.key}'s sidecar ({admin}/ready)", functools.partial(_http_ok, admin + "/ready"))
        for s in plan.services:  # a sidecar is ready before it knows its upstreams' endpoints
            admin = f"http://127.0.0.1:{s.admin_port}"
            self.wait_for(f"{s.key}'s sidecar to know its upstreams' endpoints ({admin}/config)",
                          functools.partial(_upstreams_known, admin + "/config"))
        frontend = f"http://127.0.0.1:{plan.service('frontend').port}"
        # each failed probe is a warning in the frontend's log: not too often
        self.wait_for("a first call frontend -> greeter -> store through the sidecars",
                      lambda: _http_status(frontend + "/hello?name=weft-dev", timeout=5) == 200, interval=0.5)
        rps: float | None = None
        if not self.args.no_traffic:
            rps = self.args.rps
            self.sup.start("traffic", [sys.executable, "-m", "weft.demo.traffic", "-url", frontend,
                                       "-rps", str(rps), "-log-level", self.args.log_level], tier=4)
        self.say(summary(plan, started_agent=started_agent, state_dir=self.state_dir, traffic_rps=rps,
                         default_consul=default_consul))
        self._dashboard()

    def _dashboard(self) -> None:
        """`weft ui` on loopback: 8580, or a free port when that is taken or with -free-ports."""
        port = 8580
        if self.args.free_ports or not port_free("127.0.0.1", port):
            port = free_port()
        url = f"http://127.0.0.1:{port}/"
        self.sup.start("ui", [*self.weft, "ui", "-http-addr", f"127.0.0.1:{port}", "-state-dir", str(self.state_dir)],
                       tier=4)
        self.sup.info["ui"] = url
        self.sup.save()
        self.wait_for(f"the dashboard ({url})", functools.partial(_http_ok, url))
        self.say(f"weft dev: dashboard at {url} (weft ui)")

    def _check_ports(self, plan: Plan, *, skip_consul: bool) -> None:
        busy = [f"{port} ({role})" for role, port in plan.ports().items()
                if not (role == "consul" and skip_consul) and not port_free("127.0.0.1", port)]
        if busy:
            raise DevError("port(s) in use: " + ", ".join(busy) + ". Stop what uses them, or run "
                           "`weft dev -free-ports` (`make dev ARGS=-free-ports`) to pick free ports.")

    def _consul(self, fn: Callable[[Any], Any]) -> Any:
        import asyncio

        from catalog.client import ConsulClient

        async def go() -> Any:
            async with ConsulClient.from_env(self.env) as consul:
                return await fn(consul)

        return asyncio.run(go())

    def _deregister_leftovers(self, plan: Plan) -> None:
        from catalog.client import ConsulNotFound

        async def go(consul: Any) -> None:
            for s in plan.services:
                for sid in (f"{s.id}-sidecar-proxy", s.id):
                    with contextlib.suppress(ConsulNotFound):
                        await consul.agent_service_deregister(sid)

        self._consul(go)

    def _register(self, plan: Plan) -> None:
        from catalog.client import ConsulError

        async def go(consul: Any) -> None:
            for s in plan.services:
                await consul.agent_service_register(s.payload, replace_existing_checks=True)

        try:
            self._consul(go)
        except ConsulError as exc:
            raise DevError(f"registering the demo services failed: {exc}") from None
        self.say("weft dev: registered " + ", ".join(f"{s.key} ({s.id})" for s in plan.services)
                 + f" from {DEMO_SERVICES}")

    def _config_entries(self) -> None:
        """The canary's config entries (greeter: service-defaults, resolver, splitter, router), in
        dependency order, as `weft config write` would write them."""
        from catalog import configentry
        from catalog.client import ConsulError

        files = sorted(DEMO_CONFIG.glob("*.hcl"))
        try:
            entries = [configentry.parse(f.read_text(), source=str(f)) for f in files]
        except configentry.ConfigEntryFileError as exc:
            raise DevError(str(exc)) from None

        async def go(consul: Any) -> None:
            for entry in entries:
                await consul.config_put(entry)

        try:
            self._consul(go)
        except ConsulError as exc:
            raise DevError(f"writing the canary's config entries failed: {exc}") from None
        self.say("weft dev: wrote " + ", ".join("/".join(configentry.kind_and_name(e)) for e in entries))

    def _intentions(self) -> None:
        # `weft intention allow` for each pair, concurrently (each writes its own destination's document)
        running = [(src, dst, subprocess.Popen(
            [*self.weft, "intention", "allow", src, dst, "--description", "weft dev demo"], env=self.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            for src, dst in INTENTIONS]
        failures = []
        for src, dst, proc in running:
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if proc.returncode != 0:
                failures.append(f"`weft intention allow {src} {dst}` failed: {err.strip()}")
        if self.stop_requested:
            raise Stopped()
        if failures:
            raise DevError("; ".join(failures))
        self.say("weft dev: intentions frontend -> greeter and greeter -> store allowed (default deny)")

    def _supervise(self) -> None:
        reported: set[str] = set()
        while not self.stop_requested:
            for c in self.sup.dead():
                if c.name not in reported:
                    reported.add(c.name)
                    print(f"weft dev: {c.name} exited with status {c.popen.returncode}; its log "
                          f"({c.log_path}) ends with:\n{c.tail()}", file=sys.stderr, flush=True)
            time.sleep(0.2)

    def _stop(self) -> None:
        if not self.sup.children:
            return
        self.stopping = True
        self.say(f"weft dev: stopping {len(self.sup.children)} process(es) (Ctrl-C again to kill them)")
        killed = self.sup.stop_all(self.args.stop_timeout, hurry=lambda: self.hurry)
        if killed:
            why = "on a second Ctrl-C" if self.hurry else f"(no exit within {self.args.stop_timeout:g}s)"
            self.say(f"weft dev: killed {why}: {', '.join(killed)}")
        if self.external_plan is not None:  # a Consul we did not start keeps running: leave it clean
            from catalog.client import ConsulError

            try:
                self._deregister_leftovers(self.external_plan)
                self.say("weft dev: deregistered the demo services from " + self.sup.info.get("consul", "Consul"))
            except (ConsulError, ValueError) as exc:
                self.say(f"weft dev: could not deregister the demo services: {exc}")
        with contextlib.suppress(OSError):
            (self.state_dir / STATE_FILE).unlink()
        self.say("weft dev: stopped")


def run(args: argparse.Namespace) -> int:
    if args.rps <= 0:
        print("weft dev: -rps must be positive", file=sys.stderr)
        return 2
    try:
        return _Dev(args).run()
    except DevError as exc:
        print(f"weft dev: {exc}", file=sys.stderr)
        return 1
