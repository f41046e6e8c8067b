"""`weft sidecar --sidecar-for SERVICE_ID [--admin-port N] ...`: run a sidecar proxy next to a service.

Start-up:
1. reads the service's registration from the local agent (`/v1/agent/service/:id`) and the sidecar's
   connect-proxy registration `<id>-sidecar-proxy` when the agent made one from
   `Connect.SidecarService` (public port, upstreams, local service port); without one, it uses
   `--public-port` (or a free port in 21000-21255) and `--upstream NAME:PORT` flags;
2. reads the trust bundle from KV `weft/ca/roots`, gets a leaf for `spiffe://<td>/ns/default/dc/<dc>/svc/<service>`
   from the CA (found as Consul service `weft-ca`, or `--ca-addr`) through `ca.client.LeafManager`,
   which talks to the CA through `sidecar.ca_conn.H2CA` (the sidecar's own HTTP/2 gRPC client: grpc's
   C core is not started in a sidecar unless `--grpc-engine aio` asks for it);
3. assembles the first complete snapshot (`sidecar.state`), opens the public mTLS listener, one local
   listener per upstream and the admin API, then registers itself as Consul registers a sidecar
   (Kind connect-proxy, `<service>-sidecar-proxy`, Proxy.DestinationServiceName/ID, LocalServicePort,
   Upstreams, Meta `protocol`), with a TTL check kept passing while ready, an alias check of the app,
   and DeregisterCriticalServiceAfter.

SIGTERM/SIGINT: stop taking new calls, mark the TTL check critical, let in-flight calls finish (at
most `--drain-timeout`), deregister, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import socket
import sys
import time
from typing import Any

from weft.durations import parse_duration_or_seconds

log: Any = None  # structlog's logger, bound in run() (structlog is imported only then, see _lean_imports)

PORT_RANGE = (21000, 21255)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--sidecar-for", "-sidecar-for", required=True, metavar="SERVICE_ID",
      help="ID of the local service this sidecar fronts (as registered with the local Consul agent)")
    a("--admin-port", "-admin-port", type=int, default=19000, help="admin API port (/ready /live /metrics /config); "
      "0 picks a free port")
    a("--admin-bind", "-admin-bind", default="127.0.0.1", help="admin API bind address (default loopback)")
    a("--ca-addr", "-ca-addr", default="", help="CA address host:port (default: Consul service weft-ca)")
    a("--public-port", "-public-port", type=int, default=0,
      help="public mTLS port when no <id>-sidecar-proxy registration gives one (default: free port in 21000-21255)")
    a("--bind", "-bind", default="", help="public listener bind address (default: the proxy's address, else 0.0.0.0)")
    a("--upstream", "-upstream", action="append", default=[], metavar="NAME:PORT",
      help="an upstream when no proxy registration declares them (repeatable)")
    a("--token", "-token", default=None, help="Consul ACL token for the CA (default CONSUL_HTTP_TOKEN)")
    a("--ttl", "-ttl", default="10s", help="TTL of the sidecar's health check (kept passing while ready)")
    a("--deregister-after", "-deregister-after", default="1m",
      help="DeregisterCriticalServiceAfter of the TTL check (Consul's minimum is 1m)")
    a("--drain-timeout", "-drain-timeout", type=float, default=10.0,
      help="seconds in-flight calls get to finish on SIGTERM")
    a("--max-message-bytes", "-max-message-bytes", type=int, default=4 * 1024 * 1024,
      help="largest gRPC message proxied, both directions")
    a("--access-log-rate", "-access-log-rate", type=float, default=20.0,
      help="access lines per second logged in full before sampling starts")
    a("--access-log-sample", "-access-log-sample", type=float, default=0.01,
      help="fraction of calls logged above the rate (0..1)")
    a("--descriptor-set", "-descriptor-set", default="",
      help="FileDescriptorSet of the app (protoc --descriptor_set_out) when it offers no reflection")
    a("--no-reflection", "-no-reflection", action="store_true", help="do not ask the app for its methods")
    a("--grpc-engine", "-grpc-engine", choices=("h2", "aio"), default="h2",
      help="gRPC proxying (outbound, and the inbound full path): h2 (frame-level HTTP/2 proxy, cheapest) "
           "or aio (grpc.aio servers and channels)")
    a("--no-passthrough", "-no-passthrough", action="store_true",
      help="authorize every call on the full path even for L4-allowed callers (slower; per-call inbound metrics)")
    a("--leaf-ttl", "-leaf-ttl", type=parse_duration_or_seconds, default=None,
      help="leaf certificate lifetime to ask the CA for, as `weft ca serve --leaf-ttl` takes it (72h, 90m; a plain "
           "number is still read as seconds, the older form) (default: the CA's)")
    a("--watch-wait", "-watch-wait", type=float, default=60.0, help="blocking query wait, seconds")
    a("--log-level", "-log-level", default=os.environ.get("WEFT_LOG_LEVEL", "info"),
      help="debug, info, warn or error")
    from sidecar.limits import described, flag_name

    group = parser.add_argument_group("limits and hardening", "what one peer may make this sidecar buffer or do "
                                      "(see the README's \"Limits and hardening\")")
    for name, kind, default, text in described():
        group.add_argument(flag_name(name), dest=f"limit_{name}", type=kind, default=default,
                           metavar="SECONDS" if kind is float else "N",
                           help=f"{text} (default: {default})")


def limits_of(args: argparse.Namespace) -> Any:
    """The sidecar's limits from its flags (ValueError naming the flag when one is out of range)."""
    from sidecar.limits import Limits, described

    return Limits(**{name: getattr(args, f"limit_{name}") for name, _, _, _ in described()})


def _trim_heap() -> None:
    """Give the C heap's free pages back to the kernel (start-up and bursts leave a few MB of them)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


async def _trim_periodically(stop: asyncio.Event, every: float = 15.0) -> None:
    import gc

    gc.collect()  # start-up garbage (import-time cycles) first, so that its memory can go back too
    while not stop.is_set():
        _trim_heap()  # a few milliseconds at most on a heap this size
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


def _fewer_malloc_arenas() -> None:
    """glibc gives each thread that allocates its own arena; grpc's threads would add several MB of RSS."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class _NoSyncConsul:
    """Stands in for py-consul's synchronous client, which the sidecar never uses (see _lean_imports)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("py-consul's synchronous client is not loaded in a weft sidecar; use catalog.client")


def _lean_imports() -> None:
    """Keep what a sidecar never uses out of its memory (about 10 MB of RSS):

    - structlog renders with `rich` when it is importable (in a dev venv it is, through import-linter);
      a sidecar only writes JSON lines;
    - `import consul` loads py-consul's synchronous client and with it `requests`; Weft talks to Consul
      only through py-consul's asyncio client (catalog.client), so `consul.std` is a placeholder here;
      if the installed py-consul wants more of `consul.std` than `Consul`, the real module is loaded.
    """
    if "structlog" not in sys.modules:
        sys.modules.setdefault("rich", None)  # type: ignore[arg-type]
    if "consul" not in sys.modules and "consul.std" not in sys.modules:
        import types

        std = types.ModuleType("consul.std")
        std.Consul = _NoSyncConsul  # type: ignore[attr-defined]
        sys.modules["consul.std"] = std
        try:
            import consul.aio  # noqa: F401  # py-consul's package __init__ runs now, against the placeholder
        except ImportError:
            # a py-consul whose __init__ wants more of consul.std than `Consul`: load it for real (costs RSS,
            # never correctness)
            for name in [m for m in sys.modules if m == "consul" or m.startswith("consul.")]:
                del sys.modules[name]


def run(args: argparse.Namespace) -> int:
    global log
    # libuv's worker pool only resolves Consul's and the CA's addresses here: two threads, not four
    os.environ.setdefault("UV_THREADPOOL_SIZE", "2")
    _fewer_malloc_arenas()
    _lean_imports()
    import structlog

    from weft import logsetup, runner

    log = structlog.get_logger("weft.sidecar")
    try:
        logsetup.configure(args.log_level)
    except ValueError as exc:
        print(f"weft sidecar: {exc}", file=sys.stderr)
        return 2
    if args.max_message_bytes <= 0:
        print("weft sidecar: --max-message-bytes must be positive", file=sys.stderr)
        return 2
    if not 0.0 <= args.access_log_sample <= 1.0 or args.access_log_rate < 0:
        print("weft sidecar: --access-log-sample must be within 0..1 and --access-log-rate >= 0", file=sys.stderr)
        return 2
    try:
        limits_of(args)
    except ValueError as exc:
        print(f"weft sidecar: {exc}", file=sys.stderr)
        return 2
    upstreams: list[tuple[str, int]] = []
    for spec in args.upstream:
        name, _, port = spec.partition(":")
        if not name or not port.isdigit() or not 0 < int(port) < 65536:
            print(f"weft sidecar: --upstream {spec!r}: expected NAME:PORT", file=sys.stderr)
            return 2
        upstreams.append((name, int(port)))
    descriptor_methods = None
    if args.descriptor_set:
        from sidecar.methods import methods_of_descriptor_set

        try:
            with open(args.descriptor_set, "rb") as f:
                descriptor_methods = methods_of_descriptor_set(f.read())
        except (OSError, ValueError) as exc:
            print(f"weft sidecar: --descriptor-set {args.descriptor_set}: {exc}", file=sys.stderr)
            return 2
    return runner.run(lambda stop: _main(args, stop, upstreams, descriptor_methods))


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


CA_SERVICE = "weft-ca"
ROOTS_KEY = "weft/ca/roots"


async def _read_bundle(client: Any) -> Any:
    """The trust bundle the CA publishes in KV (None before any CA ran)."""
    from ca.provider import TrustBundle

    _, entry = await client.kv_get(ROOTS_KEY)
    if entry is None or not entry.value:
        return None
    return TrustBundle.from_json(entry.value, entry.modify_index)


def _consul_resolver(client: Any) -> Any:
    """The CA's replicas as Consul lists them (healthy instances of weft-ca), active one first."""
    async def resolve() -> list[str]:
        _, instances = await client.health_service(CA_SERVICE, passing=True)
        ranked = sorted(instances, key=lambda i: 0 if any(c.output.strip() == "active" for c in i.checks) else 1)
        return [f"{i.address}:{i.port}" for i in ranked]

    return resolve


async def _datacenter(client: Any) -> str:
    from catalog.client import ConsulError

    if client.settings.datacenter:
        return str(client.settings.datacenter)
    try:
        return str((await client.agent_self()).datacenter)
    except (ConsulError, ValueError):
        return "dc1"


def restore_from_meta(reg: Any) -> bool:
    """True when a previous run of this sidecar replaced an agent-made registration (kept in Meta)."""
    return bool(dict(reg.meta).get("weft-agent-made") == "1")


def _free_port_in_range() -> int:
    for port in range(*PORT_RANGE):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
                return port
            except OSError:
                continue
    raise OSError(f"no free port in {PORT_RANGE[0]}-{PORT_RANGE[1]}")


STILL_WAITING_EVERY = 30.0  # seconds between "still waiting" lines while a start-up step waits


async def _until(stop: asyncio.Event, what: str, attempt: Any, waiting: dict[str, str],
                 interval: float = 1.0) -> Any:
    """Call ``attempt()`` until it returns non-None; None if ``stop`` is set first. While it waits,
    ``waiting["what"]`` says for what and why (the admin API's ``/ready`` answers with it), and a log
    line says so at once and again every STILL_WAITING_EVERY seconds."""
    from catalog.client import ConsulError

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


async def _main(args: argparse.Namespace, stop: asyncio.Event, flag_upstreams: list[tuple[str, int]],
                descriptor_methods: dict[str, str] | None) -> int:
    from ca.client import LeafManager, fixed_resolver
    from ca.identity import SpiffeId
    from catalog.client import ConsulClient, ConsulError
    from catalog.models import CheckDefinition, ServiceRegistration, Upstream, parse_duration
    from catalog.registration import Registered, sidecar_registration
    from catalog.watch import WatchPolicy
    from sidecar.admin import Admin
    from sidecar.ca_conn import H2CA
    from sidecar.inbound import Inbound
    from sidecar.outbound import Outbound
    from sidecar.snapshot import Snapshot, SnapshotError
    from sidecar.state import SidecarState, protocol_of_meta, registration_of
    from sidecar.telemetry import Telemetry
    from sidecar.tls import TlsContexts

    sid = args.sidecar_for
    client = ConsulClient.from_env()
    cleanup: list[Any] = []
    # the admin API answers from the start: /live, and /ready with what the sidecar still waits for
    telemetry = Telemetry(access_per_second=args.access_log_rate, access_sample=args.access_log_sample)
    waiting = {"what": f"service {sid} registered with the local agent"}
    parts: dict[str, Any] = {}  # "state" and "leaf" once they exist
    listening: dict[str, Any] = {"up": False, "draining": False, "public": "", "admin": ""}

    def ready() -> tuple[bool, str]:
        if listening["draining"]:
            return False, "draining"
        state, leaf = parts.get("state"), parts.get("leaf")
        if state is None or leaf is None:
            return False, "waiting for " + waiting["what"]
        if state.current is None:
            missing = state.builder.missing()
            if "leaf certificate" in missing and leaf.last_error:
                missing[missing.index("leaf certificate")] = f"leaf certificate ({leaf.last_error})"
            return False, "waiting for a complete snapshot: " + ", ".join(missing)
        if not listening["up"]:
            return False, "listeners not up"
        return True, "ready"

    def extra() -> dict[str, Any]:
        out: dict[str, Any] = {"ready": ready()[1],
                               "listeners": {"public": listening["public"] or None, "admin": listening["admin"]}}
        leaf = parts.get("leaf")
        if leaf is not None:
            out["leaf"] = {"renewals": leaf.renewals, "failures": leaf.failures, "last_error": leaf.last_error}
        outbound = parts.get("outbound")
        if outbound is not None:  # routed upstreams: splits, ejected endpoints, retry budgets, live
            out["traffic"] = outbound.describe_traffic()
        return out

    def current_snapshot() -> Any:
        state = parts.get("state")
        return state.current if state is not None else None

    admin = Admin(current_snapshot, telemetry, ready, extra)
    try:
        admin_port = await admin.start(args.admin_bind, args.admin_port)
    except OSError as exc:
        print(f"weft sidecar: cannot listen on admin port {args.admin_bind}:{args.admin_port}: {exc}",
              file=sys.stderr)
        await client.close()
        return 1
    listening["admin"] = f"{args.admin_bind}:{admin_port}"
    cleanup.append(admin.close)
    try:
        # 1. the app's registration, and the proxy's
        async def get_app() -> ServiceRegistration | None:
            return (await client.agent_service(sid))[1]

        app = await _until(stop, f"service {sid} registered with the local agent", get_app, waiting)
        if app is None:
            return 0
        proxy_id = f"{sid}-sidecar-proxy"
        _, proxy = await client.agent_service(proxy_id)
        agent_made = proxy is not None and proxy.kind == "connect-proxy" and proxy.proxy is not None \
            and proxy.meta_dict().get("weft-sidecar") != "1"
        # a sidecar that crashed left its own registration behind: it says whether the agent made the first one
        previous_agent_made = proxy is not None and proxy.meta_dict().get("weft-agent-made") == "1"
        if proxy is not None and proxy.kind == "connect-proxy" and proxy.proxy is not None:
            port = args.public_port or proxy.port or _free_port_in_range()
            p = proxy.proxy
            ups = list(p.upstreams)
            local_port = p.local_service_port or app.port
            local_addr = p.local_service_address or "127.0.0.1"
            address = proxy.address
        else:
            port = args.public_port or _free_port_in_range()
            ups = [Upstream(name, local_port) for name, local_port in flag_upstreams]
            local_port, local_addr, address = app.port, "127.0.0.1", ""
        app_protocol = protocol_of_meta(app.meta_dict())
        bind = args.bind or (address if address else "0.0.0.0")
        try:
            parse_duration(args.ttl, "--ttl")
            reg = sidecar_registration(
                service_id=sid, service_name=app.name, port=port, local_service_port=local_port,
                local_service_address=local_addr, address=address, upstreams=ups,
                # the app's meta first, as Consul's sidecar_service inherits it: service-resolver subset
                # filters (Service.Meta.version == v2) are evaluated on the sidecars' registrations
                meta={**app.meta_dict(), "protocol": app_protocol or "tcp", "weft-sidecar": "1",
                      "weft-agent-made": "1" if agent_made or previous_agent_made else "0"}, ttl=args.ttl,
                deregister_critical_after=args.deregister_after)
            dc = await _datacenter(client)
            registration = registration_of(reg, app, protocol=app_protocol or "tcp", datacenter=dc, bind=bind)
        except (ValueError, SnapshotError) as exc:
            print(f"weft sidecar: {exc}", file=sys.stderr)
            return 2

        # 2. trust bundle and leaf
        bundle = await _until(stop, "the trust bundle in KV weft/ca/roots", lambda: _read_bundle(client), waiting)
        if bundle is None:
            return 0
        identity = SpiffeId.for_service(bundle.trust_domain, app.name, datacenter=dc)
        token = args.token if args.token is not None else client.token
        # the CA over the sidecar's own HTTP/2 client, not grpc.aio (which would start grpc's C core: ~6 MB)
        ca = H2CA(fixed_resolver(args.ca_addr) if args.ca_addr else _consul_resolver(client))
        cleanup.append(ca.close)

        async def bundle_source() -> Any:
            try:
                return await _read_bundle(client)
            except ConsulError:
                return None

        leaf = LeafManager(identity, ca, token=token, bundle=bundle, bundle_source=bundle_source,
                           ttl=args.leaf_ttl or None)
        parts["leaf"] = leaf
        waiting["what"] = "the first snapshot"
        leaf_stop = asyncio.Event()
        leaf_task = leaf.start(leaf_stop)

        async def leaf_cleanup() -> None:
            leaf_stop.set()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await leaf_task

        cleanup.append(leaf_cleanup)

        # 3. snapshot
        state = SidecarState(client, leaf, registration, app_protocol_meta=app_protocol,
                             watch_policy=WatchPolicy(wait=args.watch_wait), descriptor_methods=descriptor_methods,
                             reflect=not args.no_reflection)
        cleanup.append(state.close)

        def on_snapshot(snap: Snapshot) -> None:
            telemetry.cert_expiry.set(snap.credentials.not_after)
            telemetry.set_policy_version(snap.policy_version)
            telemetry.snapshot_version.set(snap.version)

        state.listeners.append(on_snapshot)
        parts["state"] = state

        state.start()
        log.info("starting", service=app.name, service_id=sid, identity=str(identity), public_port=port)
        waiter = asyncio.ensure_future(state.ready.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopper.cancel()
        if stop.is_set():
            return 0

        # listeners
        tls = TlsContexts()
        limits = limits_of(args)
        inbound = Inbound(state.snapshot, telemetry, tls, max_message_bytes=args.max_message_bytes,
                          passthrough_enabled=not args.no_passthrough, grpc_engine=args.grpc_engine, limits=limits)
        outbound = Outbound(state.snapshot, telemetry, tls, max_message_bytes=args.max_message_bytes,
                            grpc_engine=args.grpc_engine, limits=limits)
        parts["outbound"] = outbound
        try:
            await inbound.start(bind, port)
            await outbound.start()
        except OSError as exc:
            print(f"weft sidecar: cannot listen: {exc}", file=sys.stderr)
            await inbound.close(0)
            await outbound.close(0)
            return 1
        state.listeners.extend([inbound.on_snapshot, outbound.on_snapshot])
        current = state.snapshot()
        inbound.on_snapshot(current)
        outbound.on_snapshot(current)
        listening["public"] = f"{bind}:{inbound.port}"
        listening["up"] = True

        # 4. register, keep the TTL check passing while ready
        # where `weft top` and `weft status` find this sidecar's admin API
        admin_meta = str(admin_port) if args.admin_bind in ("0.0.0.0", "::", "") else f"{args.admin_bind}:{admin_port}"
        reg = dataclasses.replace(reg, meta=tuple(sorted({**dict(reg.meta), "weft-admin-addr": admin_meta}.items())))
        registered = Registered(client, reg, note="ready")
        try:
            await registered.register()
        except ConsulError as exc:
            log.warning("register_failed", error=str(exc), note="will retry through the TTL keeper")
        if registered.keeper is not None:
            registered.keeper.start()
        log.info("ready", service=app.name, public=f"{bind}:{inbound.port}", admin=f"{args.admin_bind}:{admin_port}",
                 upstreams={u.destination_name: u.local_bind_port for u in registration.upstreams})
        print(f"weft sidecar for {sid}: public {bind}:{inbound.port}, admin http://{args.admin_bind}:{admin_port}",
              flush=True)
        trimmer = asyncio.ensure_future(_trim_periodically(stop))
        cleanup.append(lambda: _cancel(trimmer))

        await stop.wait()

        # 5. drain
        log.info("draining", timeout=args.drain_timeout)
        listening["draining"] = True
        if registered.keeper is not None:
            registered.keeper.set_status("critical", "draining")
            with contextlib.suppress(ConsulError):
                await registered.keeper.report()
        inbound.stop_accepting()
        await asyncio.gather(inbound.close(args.drain_timeout), outbound.close(args.drain_timeout))
        if registered.keeper is not None:
            await registered.keeper.stop("shut down")
        if agent_made or restore_from_meta(reg):
            # the agent made this registration from the app's Connect.SidecarService: put it back as the
            # agent had it (a TCP check on the public port, critical while nothing listens, and the alias
            # check), so that a restarted sidecar finds its port and upstreams again
            restore = sidecar_registration(
                service_id=sid, service_name=app.name, port=port, local_service_port=local_port,
                local_service_address=local_addr, address=address, upstreams=ups, ttl=None,
                meta={"protocol": app_protocol or "tcp"})
            tcp_check = CheckDefinition(name="Connect Sidecar Listening", check_id=f"{proxy_id}:listening",
                                        tcp=f"{address or '127.0.0.1'}:{port}", interval="10s", status="critical")
            try:
                await client.agent_service_register(
                    dataclasses.replace(restore, checks=(tcp_check, *restore.checks)), replace_existing_checks=True)
                log.info("registration_restored", id=proxy_id)
            except ConsulError as exc:
                log.warning("restore_failed", id=proxy_id, error=str(exc))
        else:
            await registered.deregister()
        log.info("stopped")
        return 0
    finally:
        for fn in reversed(cleanup):
            with contextlib.suppress(Exception):
                await fn()
        await client.close()
