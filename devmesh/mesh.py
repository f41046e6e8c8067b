"""`weft dev` assembled: the dev agent (or the Consul already running), the CA, the policy service,
the demo apps and their sidecars, traffic and the dashboard, each a real process; the demo's service
registrations, config entries and intentions written; readiness awaited; the tour printed; and
everything stopped in reverse order, also when start-up fails half-way (an ExitStack holds each
step's undo). `weft/cmd_dev.py` only parses flags and calls :func:`run`.

The plan (ports, commands, the tour) is pure, in :mod:`devmesh.plan`; processes are in
:mod:`devmesh.processes`, probes in :mod:`devmesh.probes`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from catalog.servicedef import ServiceDefinitionError, parse
from devmesh import state
from devmesh.plan import (
    DASHBOARD_PORT,
    INTENTIONS,
    DemoFiles,
    DevError,
    Plan,
    app_command,
    consul_address,
    make_plan,
    summary,
)
from devmesh.probes import free_port, http_ok, http_status, port_free, tcp_open, upstreams_known
from devmesh.processes import Supervisor, reap_stale


class Stopped(Exception):
    """Ctrl-C / SIGTERM arrived while starting."""


@dataclass(frozen=True)
class DevOptions:
    """What `weft dev`'s flags choose (see weft/cmd_dev.py for their meaning)."""

    state_dir: Path
    demo: DemoFiles
    free_ports: bool = False
    rps: float = 2.0
    no_traffic: bool = False
    log_level: str = "info"
    ready_timeout: float = 90.0
    stop_timeout: float = 8.0


def load_definitions(directory: Path) -> list[dict[str, Any]]:
    """The register payloads of every *.hcl and *.json file in `directory` (sorted), as Consul's
    config dir and `weft register DIR` read them."""
    files = sorted(p for p in directory.iterdir() if p.suffix in (".hcl", ".json") and p.is_file()) \
        if directory.is_dir() else []
    if not files:
        raise ServiceDefinitionError("", "no .hcl or .json files in this directory", str(directory))
    out: list[dict[str, Any]] = []
    for path in files:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ServiceDefinitionError("", f"cannot read: {exc.strerror}", str(path)) from None
        out.extend(parse(text, source=str(path)))
    return out


class DevMesh:
    """One `weft dev`: :meth:`run` starts the mesh, supervises it until Ctrl-C, and stops it."""

    def __init__(self, options: DevOptions) -> None:
        self.options = options
        self.state_dir = options.state_dir.resolve()
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
        deadline = time.monotonic() + (timeout or self.options.ready_timeout)
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
        """Start, supervise, stop; 0 after Ctrl-C, 1 when start-up failed (the reason on stderr)."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as undo:  # unwound in reverse: children, pointer, lock
            undo.enter_context(self._lock())
            state.write_pointer(os.environ, self.state_dir)  # weft status & co. find this weft dev from anywhere
            undo.callback(state.remove_pointer, os.environ, self.state_dir)
            stale = reap_stale(self.state_dir)
            if stale:
                self.say(f"weft dev: stopped {len(stale)} process(es) left by an earlier weft dev: {', '.join(stale)}")
            undo.callback(self.stop)
            try:
                self.start()
            except Stopped:
                self.say("weft dev: interrupted while starting; stopping")
                return 0
            except DevError as exc:
                print(f"weft dev: {exc}", file=sys.stderr, flush=True)
                return 1
            self._supervise()
            return 0

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

    def start(self) -> None:
        """Each step waits for what the next one needs; a DevError says which part did not come up."""
        plan, default_consul, consul_up = self._plan()
        started_agent = self._consul_agent(plan, consul_up)
        self._control_plane(plan)
        self._demo(plan)
        rps = self._traffic(plan)
        self.say(summary(plan, started_agent=started_agent, state_dir=self.state_dir, traffic_rps=rps,
                         default_consul=default_consul, demo_config=self.options.demo.config))
        self._dashboard()

    def _plan(self) -> tuple[Plan, bool, bool]:
        """The plan, its ports checked free, recorded in the state file; with whether CONSUL_HTTP_ADDR
        was left at its default and whether a Consul already answers there."""
        host, port, default_consul = consul_address(self.env)
        if default_consul and self.options.free_ports:
            port = free_port()  # -free-ports covers the dev agent too, unless CONSUL_HTTP_ADDR names one
        source = self.options.demo.services
        try:
            payloads = load_definitions(source)
        except ServiceDefinitionError as exc:
            raise DevError(str(exc)) from None
        consul_url = f"http://{host}:{port}"
        consul_up = http_status(consul_url + "/v1/status/leader") == 200
        plan = make_plan(payloads, consul_host=host, consul_port=port,
                         free_port=free_port if self.options.free_ports else None, source=source)
        self._check_ports(plan, skip_consul=consul_up)
        self.env["CONSUL_HTTP_ADDR"] = f"{host}:{port}"
        self.sup.info = {"consul": consul_url, "ports": plan.ports(),
                         "admin": {s.key: f"http://127.0.0.1:{s.admin_port}" for s in plan.services},
                         "frontend": f"http://127.0.0.1:{plan.service('frontend').port}"}
        self.sup.save()
        return plan, default_consul, consul_up

    def _consul_agent(self, plan: Plan, consul_up: bool) -> bool:
        """The dev agent started (True), or the Consul already there cleared of the demo's leftovers."""
        host, port = plan.consul_host, plan.consul_port
        consul_url = f"http://{host}:{port}"
        if consul_up:
            self.say(f"weft dev: using the Consul that answers at {consul_url}")
            self._deregister_leftovers(plan)
            self.external_plan = plan  # deregister the demo from it again on the way out
            return False
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise DevError(f"no Consul answers at {consul_url}, and weft dev starts its dev agent on loopback "
                           "only; unset CONSUL_HTTP_ADDR or point it at 127.0.0.1:<port>")
        self.say(f"weft dev: starting the dev agent at {consul_url}")
        self.sup.start("agent", [*self.weft, "agent", "-dev", "-http-port", str(port), "-client", host,
                                 "-log-level", self.options.log_level], tier=0)
        self.wait_for("the dev agent", lambda: http_status(consul_url + "/v1/status/leader") == 200)
        return True

    def _control_plane(self, plan: Plan) -> None:
        """The CA and the policy service, and the demo's registrations, config entries and intentions."""
        consul_url = f"http://{plan.consul_host}:{plan.consul_port}"
        self.say("weft dev: starting the CA and the policy service")
        self.sup.start("ca", [*self.weft, "ca", "serve", "-dev", "--listen", f"127.0.0.1:{plan.ca_port}",
                              "--log-level", self.options.log_level], tier=1)
        self.sup.start("policy", [*self.weft, "policy", "serve", "-grpc-addr", f"127.0.0.1:{plan.policy_port}",
                                  "-log-level", self.options.log_level], tier=1)
        self._register(plan)
        self._config_entries()
        self._intentions()
        self.wait_for("the CA's trust bundle (KV weft/ca/roots)",
                      lambda: http_status(consul_url + "/v1/kv/weft/ca/roots") == 200)
        self.wait_for("the policy service's tables (KV weft/policy/compiled/)",
                      lambda: http_status(consul_url + "/v1/kv/weft/policy/compiled/?keys") == 200)

    def _demo(self, plan: Plan) -> None:
        """The apps and their sidecars, up and knowing their upstreams, and a first call through them."""
        self.say("weft dev: starting the demo apps and their sidecars")
        for s in plan.services:
            self.sup.start(s.key, app_command(sys.executable, s, self.options.log_level), tier=2)
        for s in plan.services:
            self.sup.start(f"{s.key}-sidecar", [*self.weft, "sidecar", "--sidecar-for", s.id,
                                                 "--admin-port", str(s.admin_port), "--bind", "127.0.0.1",
                                                 "--log-level", self.options.log_level], tier=3)
        for s in plan.services:
            self.wait_for(f"{s.key} on port {s.port}", functools.partial(tcp_open, "127.0.0.1", s.port))
        for s in plan.services:
            admin = f"http://127.0.0.1:{s.admin_port}"
            self.wait_for(f"{s.key}'s sidecar ({admin}/ready)", functools.partial(http_ok, admin + "/ready"))
        for s in plan.services:  # a sidecar is ready before it knows its upstreams' endpoints
            admin = f"http://127.0.0.1:{s.admin_port}"
            self.wait_for(f"{s.key}'s sidecar to know its upstreams' endpoints ({admin}/config)",
                          functools.partial(upstreams_known, admin + "/config"))
        frontend = f"http://127.0.0.1:{plan.service('frontend').port}"
        # each failed probe is a warning in the frontend's log: not too often
        self.wait_for("a first call frontend -> greeter -> store through the sidecars",
                      lambda: http_status(frontend + "/hello?name=weft-dev", timeout=5) == 200, interval=0.5)

    def _traffic(self, plan: Plan) -> float | None:
        """The traffic generator, unless -no-traffic; its rate."""
        if self.options.no_traffic:
            return None
        frontend = f"http://127.0.0.1:{plan.service('frontend').port}"
        rps = self.options.rps
        self.sup.start("traffic", [sys.executable, "-m", "weft.demo.traffic", "-url", frontend,
                                   "-rps", str(rps), "-log-level", self.options.log_level], tier=4)
        return rps

    def _dashboard(self) -> None:
        """`weft ui` on loopback: 8580, or a free port when that is taken or with -free-ports."""
        port = DASHBOARD_PORT
        if self.options.free_ports or not port_free("127.0.0.1", port):
            port = free_port()
        url = f"http://127.0.0.1:{port}/"
        self.sup.start("ui", [*self.weft, "ui", "-http-addr", f"127.0.0.1:{port}", "-state-dir", str(self.state_dir)],
                       tier=4)
        self.sup.info["ui"] = url
        self.sup.save()
        self.wait_for(f"the dashboard ({url})", functools.partial(http_ok, url))
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
                 + f" from {self.options.demo.services}")

    def _config_entries(self) -> None:
        """The canary's config entries (greeter: service-defaults, resolver, splitter, router), in
        dependency order, as `weft config write` would write them."""
        from catalog import configentry
        from catalog.client import ConsulError

        files = sorted(self.options.demo.config.glob("*.hcl"))
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

    def stop(self) -> None:
        """Every child stopped, highest tier first; a Consul we did not start left clean; the state file gone."""
        if not self.sup.children:
            return
        self.stopping = True
        self.say(f"weft dev: stopping {len(self.sup.children)} process(es) (Ctrl-C again to kill them)")
        killed = self.sup.stop_all(self.options.stop_timeout, hurry=lambda: self.hurry)
        if killed:
            why = "on a second Ctrl-C" if self.hurry else f"(no exit within {self.options.stop_timeout:g}s)"
            self.say(f"weft dev: killed {why}: {', '.join(killed)}")
        if self.external_plan is not None:  # a Consul we did not start keeps running: leave it clean
            from catalog.client import ConsulError

            try:
                self._deregister_leftovers(self.external_plan)
                self.say("weft dev: deregistered the demo services from " + self.sup.info.get("consul", "Consul"))
            except (ConsulError, ValueError) as exc:
                self.say(f"weft dev: could not deregister the demo services: {exc}")
        with contextlib.suppress(OSError):
            (self.state_dir / state.STATE_FILE).unlink()
        self.say("weft dev: stopped")


def run(options: DevOptions) -> int:
    """`weft dev`: 0 after Ctrl-C, 1 when it could not start (the reason on stderr)."""
    try:
        return DevMesh(options).run()
    except DevError as exc:
        print(f"weft dev: {exc}", file=sys.stderr)
        return 1

