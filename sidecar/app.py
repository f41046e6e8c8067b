"""`Sidecar`: one sidecar assembled from a `SidecarConfig`, started, and drained.

`weft sidecar` only parses flags into a `sidecar.config.SidecarConfig` and calls `Sidecar(config).run(stop)`.
What `run` does, in order (every part it builds is pushed on one `AsyncExitStack`, so whatever was
built is closed in reverse order however the run ends):

1. admin API (`sidecar.admin`), answering from the start: `/live`, and `/ready` with what the sidecar
   still waits for;
2. registration: the app's (`/v1/agent/service/:id`) and the connect-proxy registration
   `<id>-sidecar-proxy` the agent made from `Connect.SidecarService` (public port, upstreams, local
   service port); without one, `config.public_port` (or a free port in 21000-21255) and
   `config.upstreams`;
3. trust bundle (KV `weft/ca/roots`) and leaf certificate for the service's SPIFFE identity from the CA
   (Consul service `weft-ca`, or `config.ca_addr`) through `ca.client.LeafManager` over
   `sidecar.ca_conn.H2CA`;
4. the first complete snapshot (`sidecar.state.SidecarState`);
5. listeners: the public mTLS port (`sidecar.inbound`) and one local port per upstream
   (`sidecar.outbound`);
6. registration as Consul registers a sidecar (Kind connect-proxy, TTL check kept passing while ready,
   alias check of the app, DeregisterCriticalServiceAfter);
7. on `stop` (SIGTERM/SIGINT): drain (`Sidecar.drain`): not ready, TTL check critical, stop accepting,
   in-flight calls get `config.drain_timeout`, then deregister (or give back the agent-made
   registration).

Nothing here imports grpc: the gRPC data path (the frame-level HTTP/2 proxy) and the CA client never need
grpc's C core (tests/integration/sidecar/test_mesh.py checks a running sidecar's /proc/PID/maps).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from ca.client import LeafManager, fixed_resolver
from ca.identity import SpiffeId
from ca.provider import TrustBundle
from catalog.client import ConsulClient, ConsulError
from catalog.models import CheckDefinition, ServiceRegistration, Upstream, parse_duration
from catalog.registration import Registered, sidecar_registration
from catalog.watch import WatchPolicy
from sidecar.admin import Admin
from sidecar.ca_conn import H2CA
from sidecar.config import SidecarConfig
from sidecar.inbound import Inbound
from sidecar.outbound import Outbound
from sidecar.snapshot import Registration, Snapshot, SnapshotError
from sidecar.state import SidecarState, protocol_of_meta, registration_of
from sidecar.telemetry import Telemetry
from sidecar.tls import TlsContexts

log = structlog.get_logger("weft.sidecar")

PORT_RANGE = (21000, 21255)
CA_SERVICE = "weft-ca"
ROOTS_KEY = "weft/ca/roots"
STILL_WAITING_EVERY = 30.0  # seconds between "still waiting" lines while a start-up step waits
TRIM_EVERY = 15.0           # seconds between malloc_trim calls (see _trim_heap)


class StartError(Exception):
    """The sidecar cannot start as configured; `exit_code` is what `weft sidecar` exits with."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- process-wide memory tuning (why: issue 13's 60 MB target; see benchmarks/README.md) ---------------

def tune_process() -> None:
    """Call once, before the event loop and any thread start.

    - glibc gives each thread that allocates its own malloc arena (64 MB of address space, a few hundred
      KB to MBs of RSS each once used); a sidecar's threads (libuv's resolver pool, the event loop)
      allocate little, so two arenas are enough and keep RSS from spreading over many.
    - libuv's worker pool only resolves Consul's and the CA's addresses here: two threads, not four.
    """
    os.environ.setdefault("UV_THREADPOOL_SIZE", "2")
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX


def _trim_heap() -> None:
    """Give the C heap's free pages back to the kernel: start-up and bursts of calls leave several MB of
    freed-but-kept pages, which glibc only returns from the top of the heap by itself."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


async def _trim_periodically(every: float = TRIM_EVERY) -> None:
    gc.collect()  # start-up garbage (import-time cycles) first, so that its memory can go back too
    while True:
        _trim_heap()  # a few milliseconds at most on a heap this size
        await asyncio.sleep(every)


# -- small start-up helpers ---------------------------------------------------------------------------

async def read_bundle(client: ConsulClient) -> TrustBundle | None:
    """The trust bundle the CA publishes in KV (None before any CA ran)."""
    _, entry = await client.kv_get(ROOTS_KEY)
    if entry is None or not entry.value:
        return None
    return TrustBundle.from_json(entry.value, entry.modify_index)


def consul_resolver(client: ConsulClient) -> Callable[[], Awaitable[list[str]]]:
    """The CA's replicas as Consul lists them (healthy instances of weft-ca), active one first."""
    async def resolve() -> list[str]:
        _, instances = await client.health_service(CA_SERVICE, passing=True)
        ranked = sorted(instances, key=lambda i: 0 if any(c.output.strip() == "active" for c in i.checks) else 1)
        return [f"{i.address}:{i.port}" for i in ranked]

    return resolve


async def datacenter_of(client: ConsulClient) -> str:
    if client.settings.datacenter:
        return str(client.settings.datacenter)
    try:
        return str((await client.agent_self()).datacenter)
    except (ConsulError, ValueError):
        return "dc1"


def restore_from_meta(reg: ServiceRegistration) -> bool:
    """True when a previous run of this sidecar replaced an agent-made registration (kept in Meta)."""
    return bool(dict(reg.meta).get("weft-agent-made") == "1")


def free_port_in_range() -> int:
    for port in range(*PORT_RANGE):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
                return port
            except OSError:
                continue
    raise OSError(f"no free port in {PORT_RANGE[0]}-{PORT_RANGE[1]}")


async def until(stop: asyncio.Event, what: str, attempt: Callable[[], Awaitable[Any]], waiting: dict[str, str],
                interval: float = 1.0) -> Any:
    """Call ``attempt()`` until it returns non-None; None if ``stop`` is set first. While it waits,
    ``waiting["what"]`` says for what and why (the admin API's ``/ready`` answers with it), and a log
    line says so at once and again every STILL_WAITING_EVERY seconds."""
    started = time.monotonic()
    next_line = started
    first = True
    while not stop.is_set():
        try:
            result = await attempt()
            if result is not None:
                waiting["what"] = ""
                return result
            why = "not there yet"
        except (ConsulError, OSError) as exc:
            why = str(exc)
        waiting["what"] = f"{what} ({why})"
        now = time.monotonic()
        if now >= next_line:
            log.info("waiting" if first else "still_waiting", what=what, why=why, waited_seconds=round(now - started))
            next_line = now + STILL_WAITING_EVERY
            first = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
    return None


# -- the plan: where this sidecar listens and what it registers -----------------------------------------

@dataclass(frozen=True)
class Plan:
    """What step 2 found: the app, its proxy registration (if the agent made one) and what follows."""

    app: ServiceRegistration
    proxy_id: str
    agent_made: bool             # the agent made <id>-sidecar-proxy from Connect.SidecarService
    port: int                    # public mTLS port
    bind: str
    address: str
    upstreams: tuple[Upstream, ...]
    local_port: int
    local_addr: str
    app_protocol: str | None    # the app's Meta protocol, None when it gives none
    datacenter: str
    reg: ServiceRegistration     # what the sidecar registers
    registration: Registration   # the snapshot's view of it


# -- drain: the order in which a running sidecar stops (kept apart so that a test can check it) ---------

class _Draining(Protocol):
    def stop_accepting(self) -> None: ...

    async def close(self, grace: float = 5.0) -> None: ...


class _Keeper(Protocol):
    def set_status(self, status: str, note: str = "") -> None: ...

    async def report(self) -> None: ...

    async def stop(self, note: str = "shutting down", *, fail: bool = True) -> None: ...


async def drain(*, inbound: _Draining, outbound: _Draining, keeper: _Keeper | None, timeout: float,
                mark_draining: Callable[[], None], unregister: Callable[[], Awaitable[None]]) -> None:
    """Stop a running sidecar in the order that loses no call: say not ready (admin /ready, then the TTL
    check critical so that Consul stops sending callers), stop accepting new connections, give in-flight
    calls up to `timeout` seconds, stop the TTL keeper, and only then deregister."""
    mark_draining()
    if keeper is not None:
        keeper.set_status("critical", "draining")
        with contextlib.suppress(ConsulError):
            await keeper.report()
    inbound.stop_accepting()
    await asyncio.gather(inbound.close(timeout), outbound.close(timeout))
    if keeper is not None:
        await keeper.stop("shut down")
    await unregister()


# -- the sidecar --------------------------------------------------------------------------------------

class Sidecar:
    def __init__(self, config: SidecarConfig, *, client: ConsulClient | None = None,
                 announce: Callable[[str], None] = lambda line: print(line, flush=True)) -> None:
        self.config = config
        self.client = client if client is not None else ConsulClient.from_env()
        self.telemetry = Telemetry(access_per_second=config.access_log_rate, access_sample=config.access_log_sample)
        self._announce = announce
        self.waiting = {"what": f"service {config.service_id} registered with the local agent"}
        self.leaf: LeafManager | None = None
        self.state: SidecarState | None = None
        self.outbound: Outbound | None = None
        self.listening: dict[str, Any] = {"up": False, "draining": False, "public": "", "admin": ""}
        self.admin = Admin(self._current_snapshot, self.telemetry, self.ready, self._extra)
        self.admin.routes["/memory"] = _memory_report  # RSS, and by package under PYTHONTRACEMALLOC

    # -- admin API views --------------------------------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        if self.listening["draining"]:
            return False, "draining"
        state, leaf = self.state, self.leaf
        if state is None or leaf is None:
            return False, "waiting for " + self.waiting["what"]
        if state.current is None:
            missing = state.builder.missing()
            if "leaf certificate" in missing and leaf.last_error:
                missing[missing.index("leaf certificate")] = f"leaf certificate ({leaf.last_error})"
            return False, "waiting for a complete snapshot: " + ", ".join(missing)
        if not self.listening["up"]:
            return False, "listeners not up"
        return True, "ready"

    def _extra(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ready": self.ready()[1], "listeners": {"public": self.listening["public"] or None,
                                                                      "admin": self.listening["admin"]}}
        if self.leaf is not None:
            out["leaf"] = {"renewals": self.leaf.renewals, "failures": self.leaf.failures,
                           "last_error": self.leaf.last_error}
        if self.outbound is not None:  # routed upstreams: splits, ejected endpoints, retry budgets, live
            out["traffic"] = self.outbound.describe_traffic()
        return out

    def _current_snapshot(self) -> Snapshot | None:
        return self.state.current if self.state is not None else None

    # -- run ------------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> int:
        """Build, start, serve until `stop`, drain. 0 when stopped (before or after ready); StartError
        (exit code 1 for a port it cannot listen on, 2 for a registration that cannot be made)."""
        async with AsyncExitStack() as stack:
            stack.push_async_callback(self.client.close)
            cfg = self.config
            try:
                admin_port = await self.admin.start(cfg.admin_bind, cfg.admin_port)
            except OSError as exc:
                raise StartError(f"cannot listen on admin port {cfg.admin_bind}:{cfg.admin_port}: {exc}", 1) from None
            self.listening["admin"] = f"{cfg.admin_bind}:{admin_port}"
            stack.push_async_callback(self.admin.close)

            plan = await self._plan(stop)
            if plan is None:
                return 0
            state = await self._start_state(stop, plan, stack)
            if state is None:
                return 0
            inbound, outbound = await self._start_listeners(plan, state, stack)
            registered = await self._register(plan, admin_port)
            log.info("ready", service=plan.app.name, public=f"{plan.bind}:{inbound.port}",
                     admin=f"{cfg.admin_bind}:{admin_port}",
                     upstreams={u.destination_name: u.local_bind_port for u in plan.registration.upstreams})
            self._announce(f"weft sidecar for {cfg.service_id}: public {plan.bind}:{inbound.port}, "
                           f"admin http://{cfg.admin_bind}:{admin_port}")
            trimmer = asyncio.ensure_future(_trim_periodically())
            stack.push_async_callback(_cancel, trimmer)

            await stop.wait()

            log.info("draining", timeout=cfg.drain_timeout)
            await drain(inbound=inbound, outbound=outbound, keeper=registered.keeper, timeout=cfg.drain_timeout,
                        mark_draining=lambda: self.listening.__setitem__("draining", True),
                        unregister=lambda: self._unregister(plan, registered))
            log.info("stopped")
            return 0
        raise AssertionError("unreachable")  # pragma: no cover (mypy: the stack does not swallow exceptions)

    async def _plan(self, stop: asyncio.Event) -> Plan | None:
        """Step 2: the app's registration and the proxy's, and what the sidecar will register."""
        cfg, client, sid = self.config, self.client, self.config.service_id

        async def get_app() -> ServiceRegistration | None:
            return (await client.agent_service(sid))[1]

        app = await until(stop, f"service {sid} registered with the local agent", get_app, self.waiting)
        if app is None:
            return None
        proxy_id = f"{sid}-sidecar-proxy"
        _, proxy = await client.agent_service(proxy_id)
        is_proxy = proxy is not None and proxy.kind == "connect-proxy" and proxy.proxy is not None
        agent_made = is_proxy and proxy is not None and proxy.meta_dict().get("weft-sidecar") != "1"
        # a sidecar that crashed left its own registration behind: it says whether the agent made the first one
        previous_agent_made = proxy is not None and proxy.meta_dict().get("weft-agent-made") == "1"
        if proxy is not None and proxy.proxy is not None and is_proxy:
            port = cfg.public_port or proxy.port or free_port_in_range()
            p = proxy.proxy
            ups = tuple(p.upstreams)
            local_port = p.local_service_port or app.port
            local_addr = p.local_service_address or "127.0.0.1"
            address = proxy.address
        else:
            port = cfg.public_port or free_port_in_range()
            ups = tuple(Upstream(name, local_port) for name, local_port in cfg.upstreams)
            local_port, local_addr, address = app.port, "127.0.0.1", ""
        app_protocol = protocol_of_meta(app.meta_dict())
        bind = cfg.bind or (address if address else "0.0.0.0")
        try:
            parse_duration(cfg.ttl, "--ttl")
            reg = sidecar_registration(
                service_id=sid, service_name=app.name, port=port, local_service_port=local_port,
                local_service_address=local_addr, address=address, upstreams=list(ups),
                # the app's meta first, as Consul's sidecar_service inherits it: service-resolver subset
                # filters (Service.Meta.version == v2) are evaluated on the sidecars' registrations
                meta={**app.meta_dict(), "protocol": app_protocol or "tcp", "weft-sidecar": "1",
                      "weft-agent-made": "1" if agent_made or previous_agent_made else "0"}, ttl=cfg.ttl,
                deregister_critical_after=cfg.deregister_after)
            dc = await datacenter_of(client)
            registration = registration_of(reg, app, protocol=app_protocol or "tcp", datacenter=dc, bind=bind)
        except (ValueError, SnapshotError) as exc:
            raise StartError(str(exc), 2) from None
        return Plan(app=app, proxy_id=proxy_id, agent_made=agent_made, port=port, bind=bind, address=address,
                    upstreams=ups, local_port=local_port, local_addr=local_addr, app_protocol=app_protocol,
                    datacenter=dc, reg=reg, registration=registration)

    async def _start_state(self, stop: asyncio.Event, plan: Plan, stack: AsyncExitStack) -> SidecarState | None:
        """Steps 3 and 4: trust bundle, leaf, and the first complete snapshot (None: stopped first)."""
        cfg, client = self.config, self.client
        bundle = await until(stop, "the trust bundle in KV weft/ca/roots", lambda: read_bundle(client), self.waiting)
        if bundle is None:
            return None
        identity = SpiffeId.for_service(bundle.trust_domain, plan.app.name, datacenter=plan.datacenter)
        token = cfg.token if cfg.token is not None else client.token
        ca = H2CA(fixed_resolver(cfg.ca_addr) if cfg.ca_addr else consul_resolver(client))
        stack.push_async_callback(ca.close)

        async def bundle_source() -> TrustBundle | None:
            try:
                return await read_bundle(client)
            except ConsulError:
                return None

        leaf = LeafManager(identity, ca, token=token, bundle=bundle, bundle_source=bundle_source, ttl=cfg.leaf_ttl)
        self.leaf = leaf
        self.waiting["what"] = "the first snapshot"
        leaf_stop = asyncio.Event()
        leaf_task = leaf.start(leaf_stop)

        async def stop_leaf() -> None:
            leaf_stop.set()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await leaf_task

        stack.push_async_callback(stop_leaf)

        state = SidecarState(client, leaf, plan.registration, app_protocol_meta=plan.app_protocol,
                             watch_policy=WatchPolicy(wait=cfg.watch_wait),
                             descriptor_methods=dict(cfg.descriptor_methods) if cfg.descriptor_methods else None,
                             reflect=cfg.reflect)
        stack.push_async_callback(state.close)
        telemetry = self.telemetry

        def on_snapshot(snap: Snapshot) -> None:
            telemetry.cert_expiry.set(snap.credentials.not_after)
            telemetry.set_policy_version(snap.policy_version)
            telemetry.snapshot_version.set(snap.version)

        state.listeners.append(on_snapshot)
        self.state = state
        state.start()
        log.info("starting", service=plan.app.name, service_id=cfg.service_id, identity=str(identity),
                 public_port=plan.port)
        waiter = asyncio.ensure_future(state.ready.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopper.cancel()
        return None if stop.is_set() else state

    async def _start_listeners(self, plan: Plan, state: SidecarState,
                               stack: AsyncExitStack) -> tuple[Inbound, Outbound]:
        """Step 5: the public mTLS listener and one local listener per upstream."""
        cfg = self.config
        tls = TlsContexts()
        inbound = Inbound(state.snapshot, self.telemetry, tls, max_message_bytes=cfg.max_message_bytes,
                          passthrough_enabled=cfg.passthrough, limits=cfg.limits)
        outbound = Outbound(state.snapshot, self.telemetry, tls, max_message_bytes=cfg.max_message_bytes,
                            limits=cfg.limits)
        self.outbound = outbound

        async def close_unless_drained() -> None:  # start-up failed or was cancelled from here on: close at once
            if not self.listening["draining"]:
                await asyncio.gather(inbound.close(0), outbound.close(0))

        stack.push_async_callback(close_unless_drained)
        try:
            await inbound.start(plan.bind, plan.port)
            await outbound.start()
        except OSError as exc:
            raise StartError(f"cannot listen: {exc}", 1) from None
        state.listeners.extend([inbound.on_snapshot, outbound.on_snapshot])
        current = state.snapshot()
        inbound.on_snapshot(current)
        outbound.on_snapshot(current)
        self.listening["public"] = f"{plan.bind}:{inbound.port}"
        self.listening["up"] = True
        return inbound, outbound

    async def _register(self, plan: Plan, admin_port: int) -> Registered:
        """Step 6: register as Consul registers a sidecar; the TTL check is kept passing while ready."""
        cfg = self.config
        # where `weft top` and `weft status` find this sidecar's admin API
        admin_meta = str(admin_port) if cfg.admin_bind in ("0.0.0.0", "::", "") else f"{cfg.admin_bind}:{admin_port}"
        reg = dataclasses.replace(plan.reg, meta=tuple(sorted({**dict(plan.reg.meta),
                                                                "weft-admin-addr": admin_meta}.items())))
        registered = Registered(self.client, reg, note="ready")
        try:
            await registered.register()
        except ConsulError as exc:
            log.warning("register_failed", error=str(exc), note="will retry through the TTL keeper")
        if registered.keeper is not None:
            registered.keeper.start()
        return registered

    async def _unregister(self, plan: Plan, registered: Registered) -> None:
        if not (plan.agent_made or restore_from_meta(plan.reg)):
            await registered.deregister()
            return
        # the agent made this registration from the app's Connect.SidecarService: put it back as the agent
        # had it (a TCP check on the public port, critical while nothing listens, and the alias check), so
        # that a restarted sidecar finds its port and upstreams again
        restore = sidecar_registration(
            service_id=self.config.service_id, service_name=plan.app.name, port=plan.port,
            local_service_port=plan.local_port, local_service_address=plan.local_addr, address=plan.address,
            upstreams=list(plan.upstreams), ttl=None, meta={"protocol": plan.app_protocol or "tcp"})
        tcp_check = CheckDefinition(name="Connect Sidecar Listening", check_id=f"{plan.proxy_id}:listening",
                                    tcp=f"{plan.address or '127.0.0.1'}:{plan.port}", interval="10s",
                                    status="critical")
        try:
            await self.client.agent_service_register(
                dataclasses.replace(restore, checks=(tcp_check, *restore.checks)), replace_existing_checks=True)
            log.info("registration_restored", id=plan.proxy_id)
        except ConsulError as exc:
            log.warning("restore_failed", id=plan.proxy_id, error=str(exc))


def _memory_report() -> tuple[int, str, bytes]:
    from sidecar import memstats  # tracemalloc's snapshot machinery only when someone asks

    return 200, "application/json", json.dumps(memstats.report()).encode() + b"\n"


async def _cancel(task: asyncio.Future[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
