"""Watches to snapshot: the sidecar's configuration kept current from Consul, the CA and the policy service.

:class:`SidecarState` runs one task per watch (``catalog.watch``; every watch fails static: while
Consul is unreachable it keeps its last answer and nothing changes here):

- the sidecar's own registration (``/v1/agent/service/<proxy id>``, content-hash blocking) for its
  upstreams;
- the leaf certificate and roots, from the embedded ``ca.client.LeafManager`` (which keeps serving
  the current leaf while the CA is down);
- the compiled policy: KV ``weft/policy/compiled/<service>``, else ``weft/policy/compiled/*``;
  neither present means "no table" and every caller is denied (fail closed);
- per upstream: its healthy sidecars (``/v1/health/connect/<upstream>?passing``);
- protocols: one blocking list of ``service-defaults`` entries (Protocol), else the ``protocol`` meta
  an upstream's sidecars publish (the app's own meta for the own service); an upstream's listener
  type is decided only once that list has answered;
- methods: one blocking prefix read of KV ``weft/methods/`` (what every gRPC sidecar publishes);
- tap: KV ``weft/tap/<service>`` (payload previews and redaction of ``/tap``; not required for a
  snapshot: absent means payloads off).
- traffic management: per upstream its compiled discovery chain (``/v1/discovery-chain/<upstream>``)
  and, per chain target that is not the upstream's plain list, that target's healthy sidecars
  (``/v1/health/connect/<service>?passing&filter=<subset filter>``); our own service-defaults entry
  (``UpstreamConfig``, ``LocalRequestTimeoutMs``, ``RateLimits``, from the same list as protocols);
  KV ``weft/ratelimits/<service>`` and ``weft/faults/<service>``. A document or entry that does not
  parse is logged and the last good one stays.

Every change goes into a :class:`~sidecar.snapshot.SnapshotBuilder`; when the builder is complete,
the new snapshot is swapped in atomically (one attribute assignment), a line per change is logged,
and listeners (inbound, outbound, telemetry) are told. Publishing is coalesced as Consul's proxycfg
does (:mod:`sidecar.coalesce`): the first snapshot at once, then at most one publish per 200 ms
window after the first change, carrying the latest state.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from ca.client import Credentials as LeafCredentials
from ca.client import LeafManager
from catalog.chain import CompiledChain, Target
from catalog.client import ConsulClient, ConsulError
from catalog.models import ServiceInstance, ServiceRegistration
from catalog.watch import (
    WatchPolicy,
    agent_service_watch,
    config_list_watch,
    discovery_chain_watch,
    health_connect_watch,
    kv_prefix_watch,
    kv_watch,
)
from policies.compile import loads_table
from policies.model import WILDCARD, CompiledTable, table_key
from sidecar import faults as faults_mod
from sidecar import methods as methods_mod
from sidecar import ratelimit as ratelimit_mod
from sidecar.coalesce import DEFAULT_WINDOW, PublishWindow
from sidecar.snapshot import (
    Credentials,
    Endpoint,
    InboundTraffic,
    Registration,
    Snapshot,
    SnapshotBuilder,
    SnapshotError,
    UpstreamConfig,
    diff,
    normalize_protocol,
)
from sidecar.tap import TapError, parse_settings, tap_key
from sidecar.upstreamconfig import ServiceDefaultsError, local_settings, upstream_settings

log = structlog.get_logger("weft.sidecar.state")
config_log = structlog.get_logger("weft.sidecar.config")


def credentials_of(c: LeafCredentials) -> Credentials:
    bundle = c.bundle
    return Credentials(
        cert_pem=c.cert_pem.decode(), key_pem=c.key_pem.decode(), chain_pem=c.chain_pem.decode(),
        roots_pem=bundle.roots_pem, spiffe_id=str(c.identity), serial=f"{c.serial:x}",
        not_after=c.not_after.timestamp(), trust_domain=c.identity.trust_domain,
        roots_version=f"{bundle.active_root_id} [{', '.join(bundle.root_ids)}]",
    )


def registration_of(proxy: ServiceRegistration, app: ServiceRegistration, *, protocol: str,
                    datacenter: str = "dc1", bind: str = "") -> Registration:
    """The snapshot's registration from the sidecar's connect-proxy registration and the app's.

    ``bind``: the address the public listener is bound to, which ``/config`` reports (the registration's
    address is what callers dial, and may be another, e.g. the node's)."""
    p = proxy.proxy
    if p is None:
        raise SnapshotError(f"{proxy.service_id} has no Proxy block")
    ups = tuple(UpstreamConfig(u.destination_name, u.local_bind_port, u.local_bind_address or "127.0.0.1")
                for u in p.upstreams if (u.destination_type or "service") == "service")
    return Registration(
        service=p.destination_service_name or app.name, service_id=p.destination_service_id or app.service_id,
        proxy_id=proxy.service_id, public_address=bind or proxy.address or "0.0.0.0", public_port=proxy.port,
        local_service_address=p.local_service_address or "127.0.0.1",
        local_service_port=p.local_service_port or app.port, upstreams=ups, protocol=protocol,
        datacenter=datacenter)


def protocol_of_meta(meta: dict[str, str]) -> str | None:
    value = meta.get("protocol")
    if not value:
        return None
    try:
        return normalize_protocol(value)
    except SnapshotError:
        return None


class SidecarState:
    """Keeps the current :class:`Snapshot`; ``current`` is read by listeners per connection or call."""

    def __init__(self, client: ConsulClient, leaf: LeafManager, registration: Registration, *,
                 app_protocol_meta: str | None, watch_policy: WatchPolicy | None = None,
                 descriptor_methods: dict[str, str] | None = None, reflect: bool = True,
                 coalesce_seconds: float = DEFAULT_WINDOW) -> None:
        self.client = client
        self.leaf = leaf
        self.builder = SnapshotBuilder()
        self.builder.set_registration(registration)
        self.service = registration.service
        self.current: Snapshot | None = None
        self.listeners: list[Callable[[Snapshot], None]] = []
        self.ready = asyncio.Event()
        self._policy = watch_policy or WatchPolicy(wait=60.0)
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._policy_tables: dict[str, CompiledTable | None] = {}
        self._sd_protocol: dict[str, str | None] = {}
        self._sd_answered = False
        self._methods: dict[str, dict[str, str]] = {}
        self._meta_protocol: dict[str, str | None] = {registration.service: app_protocol_meta}
        self._descriptor_methods = descriptor_methods
        self._reflect = reflect
        self._stop = asyncio.Event()
        self._watches: list[Any] = []
        self._target_specs: dict[str, tuple[str, str, bool]] = {}  # target ID -> what its watch asks
        self._service_defaults: dict[str, Any] = {}  # name -> entry
        self._caller_limits: tuple[str, ratelimit_mod.CallerLimits | None] = ("", None)
        self._faults: tuple[str, faults_mod.FaultDoc | None] = ("", None)
        self.last_change = time.time()
        self._window = PublishWindow(coalesce_seconds)
        self._publish_timer: asyncio.TimerHandle | None = None
        self._apply_protocol(registration.service)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        reg = self.builder.registration
        assert reg is not None
        self._spawn("credentials", self._credentials)
        self._spawn("registration", functools.partial(self._registration, reg.proxy_id))
        for key in (table_key(self.service), table_key(WILDCARD)):
            self._spawn(f"policy:{key}", functools.partial(self._policy_watch, key))
        self._spawn("service-defaults", self._protocols_watch)
        self._spawn("methods", self._methods_watch)
        self._spawn("methods:local", self._local_methods)
        self._spawn("tap", self._tap_watch)
        self._spawn("ratelimits", functools.partial(self._inbound_doc_watch, "ratelimits"))
        self._spawn("faults", functools.partial(self._inbound_doc_watch, "faults"))
        self._ensure_upstreams(reg)

    async def close(self) -> None:
        self._stop.set()
        if self._publish_timer is not None:
            self._publish_timer.cancel()
        for w in self._watches:
            w.close()
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _spawn(self, name: str, make: Callable[[], Awaitable[Any]]) -> None:
        if name in self._tasks and not self._tasks[name].done():
            return
        self._tasks[name] = asyncio.ensure_future(make())

    def _ensure_upstreams(self, reg: Registration) -> None:
        for u in reg.upstreams:
            name = u.destination_name
            self._spawn(f"endpoints:{name}", functools.partial(self._endpoints_watch, name))
            self._spawn(f"chain:{name}", functools.partial(self._chain_watch, name))
        # protocols and methods of every upstream come from two prefix/list watches (see start)
        for u in reg.upstreams:
            self._apply_protocol(u.destination_name)
            self.builder.set_methods(u.destination_name, self._methods.get(u.destination_name, {}))

    # -- publishing ----------------------------------------------------------------------------
    def _changed(self) -> None:
        """Something the snapshot is built from changed: publish now (no snapshot yet, so that
        readiness never waits), or once the coalescing window of the first change since the last
        publish has passed (sidecar.coalesce)."""
        loop = asyncio.get_running_loop()
        delay = self._window.change(loop.time(), published=self.current is not None)
        if delay == 0.0:
            self._publish()
        elif delay is not None:
            self._publish_timer = loop.call_later(delay, self._publish_due)

    def _publish_due(self) -> None:
        self._publish_timer = None
        self._window.fire()
        if not self._stop.is_set():
            self._publish()

    def _publish(self) -> None:
        snap = self.builder.build()
        if snap is None:
            log.debug("snapshot_incomplete", missing=self.builder.missing())
            return
        old = self.current
        self.current = snap
        self.last_change = time.time()
        for change in diff(old, snap):
            config_log.info("config_change", **change)
        for cb in self.listeners:
            try:
                cb(snap)
            except Exception:  # one listener's bug must not stop the others
                log.exception("snapshot_listener_failed")
        if old is None:
            self.ready.set()

    def snapshot(self) -> Snapshot:
        snap = self.current
        if snap is None:
            raise RuntimeError("no complete snapshot yet")
        return snap

    # -- watches -------------------------------------------------------------------------------
    async def _credentials(self) -> None:
        def on_leaf(c: LeafCredentials) -> None:
            try:
                if self.builder.set_credentials(credentials_of(c)):
                    self._changed()
            except SnapshotError as exc:
                log.error("leaf_unusable", error=str(exc))

        unsubscribe = self.leaf.subscribe(on_leaf)
        try:
            await self._stop.wait()
        finally:
            unsubscribe()

    async def _registration(self, proxy_id: str) -> None:
        watch = agent_service_watch(self.client, proxy_id, policy=self._policy)
        self._watches.append(watch)
        async for proxy in watch:
            if proxy is None or proxy.proxy is None:
                continue  # deregistered (e.g. during shutdown, or an agent restart): keep what we have
            current = self.builder.registration
            assert current is not None
            ups = tuple(UpstreamConfig(u.destination_name, u.local_bind_port, u.local_bind_address or "127.0.0.1")
                        for u in proxy.proxy.upstreams if (u.destination_type or "service") == "service")
            if ups == current.upstreams:
                continue
            try:
                new = Registration(**{**{f: getattr(current, f) for f in current.__dataclass_fields__},
                                      "upstreams": ups})
            except SnapshotError as exc:
                log.error("registration_unusable", error=str(exc))
                continue
            self.builder.set_registration(new)
            self._ensure_upstreams(new)
            self._changed()

    async def _policy_watch(self, key: str) -> None:
        watch = kv_watch(self.client, key, policy=self._policy)
        self._watches.append(watch)
        async for entry in watch:
            if entry is None or not entry.value:
                self._policy_tables[key] = None
            else:
                try:
                    self._policy_tables[key] = loads_table(entry.value)
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("policy_table_unusable", key=key, error=str(exc)[:300], note="keeping the last good one")
                    continue
            self._apply_policy()

    def _apply_policy(self) -> None:
        own, wild = table_key(self.service), table_key(WILDCARD)
        if own not in self._policy_tables or wild not in self._policy_tables:
            if self._policy_tables.get(own) is None:
                return  # wait for both first answers unless our own table is there
        table = self._policy_tables.get(own) or self._policy_tables.get(wild)
        version = (table.version or "unversioned") if table is not None else "none (deny all)"
        if self.builder.set_policy(table, version):
            self._changed()

    async def _tap_watch(self) -> None:
        """KV weft/tap/<service>: payload previews and redaction for this service's taps. A bad
        document is refused (logged with what is wrong) and the last good settings stay."""
        key = tap_key(self.service)
        watch = kv_watch(self.client, key, policy=self._policy)
        self._watches.append(watch)
        async for entry in watch:
            try:
                settings = parse_settings(entry.value if entry is not None else None, key=key)
            except TapError as exc:
                log.error("tap_settings_unusable", key=key, error=str(exc)[:300], note="keeping the last good ones")
                continue
            if self.builder.set_tap(settings):
                self._changed()

    async def _endpoints_watch(self, name: str) -> None:
        watch = health_connect_watch(self.client, name, policy=self._policy)
        self._watches.append(watch)
        async for instances in watch:
            protocol = _instances_protocol(instances)
            if protocol is None and not self._sd_protocol.get(name):
                protocol = await self._declared_protocol(name)
            self._meta_protocol[name] = protocol
            changed = self._apply_protocol(name)
            endpoints = [Endpoint(i.address, i.port, i.service_id, i.node) for i in instances if i.port]
            if self.builder.set_endpoints(name, endpoints) or changed:
                self._changed()

    async def _protocols_watch(self) -> None:
        """Every service-defaults entry in one blocking list (not one watch per upstream)."""
        watch = config_list_watch(self.client, "service-defaults", policy=self._policy)
        self._watches.append(watch)
        async for entries in watch:
            found: dict[str, str | None] = {}
            self._service_defaults = {e["Name"]: e for e in entries
                                      if isinstance(e, dict) and isinstance(e.get("Name"), str)}
            for entry in entries:
                name = entry.get("Name") if isinstance(entry, dict) else None
                if not isinstance(name, str):
                    continue
                value = entry.get("Protocol")
                try:
                    found[name] = normalize_protocol(value) if value else None
                except SnapshotError as exc:
                    log.error("service_defaults_unusable", service=name, error=str(exc))
                    found[name] = None
            self._sd_protocol = found
            self._sd_answered = True
            reg = self.builder.registration
            assert reg is not None
            changed = self._apply_protocol(self.service)
            for u in reg.upstreams:
                changed = self._apply_protocol(u.destination_name) or changed
            changed = self._apply_service_defaults() or changed
            if changed:
                self._changed()

    def _apply_service_defaults(self) -> bool:
        """Our service-defaults' UpstreamConfig and local settings into the builder (a bad entry is
        logged and the last good settings stay)."""
        own = self._service_defaults.get(self.service)
        reg = self.builder.registration
        assert reg is not None
        try:
            local = local_settings(own)
            per_upstream = {u.destination_name: upstream_settings(own, u.destination_name) for u in reg.upstreams}
        except ServiceDefaultsError as exc:
            log.error("service_defaults_unusable", service=self.service, error=str(exc), note="keeping the last good")
            return False
        changed = False
        for name, settings in per_upstream.items():
            changed = self.builder.set_upstream_settings(name, settings) or changed
        inbound = self.builder.inbound
        if inbound.local != local:
            changed = self.builder.set_inbound(InboundTraffic(
                local=local, caller_limits=inbound.caller_limits, faults=inbound.faults,
                ratelimits_version=inbound.ratelimits_version, faults_version=inbound.faults_version)) or changed
        return changed

    # -- traffic management --------------------------------------------------------------------
    async def _chain_watch(self, name: str) -> None:
        watch = discovery_chain_watch(self.client, name, policy=self._policy)
        self._watches.append(watch)
        async for chain in watch:
            self._ensure_targets(name, chain)
            if self.builder.set_chain(name, chain):
                self._changed()

    def _ensure_targets(self, upstream: str, chain: CompiledChain) -> None:
        """A watch per chain target whose endpoints are not the upstream's plain list (passing sidecars:
        what a default chain, or a target with ``OnlyPassing``, uses)."""
        for tid, t in chain.targets.items():
            if t.service == upstream and not t.filter and not t.peer and t.datacenter in ("", chain.datacenter) \
                    and (t.only_passing or chain.default):
                if self._target_specs.pop(tid, None) is not None:  # its own watch stops at its next answer
                    self.builder.target_endpoints.pop(tid, None)
                continue
            if t.peer or (t.datacenter and t.datacenter != chain.datacenter):
                if tid not in self.builder.target_endpoints:
                    log.info("target_not_served", upstream=upstream, target=tid,
                             reason="targets in other datacenters or peers have no endpoints in Weft")
                    self.builder.set_target_endpoints(tid, ())
                continue
            spec = (t.service, t.filter, t.only_passing)
            self._target_specs[tid] = spec
            self._spawn(f"target:{tid}:{spec}", functools.partial(self._target_watch, tid, t))

    async def _target_watch(self, target_id: str, target: Target) -> None:
        """A target's sidecars: its subset's filter; warning ones too unless ``OnlyPassing`` (critical ones
        never). Ends once the chain gives the target another filter or ``OnlyPassing`` (a new watch takes over)."""
        spec = (target.service, target.filter, target.only_passing)
        watch = health_connect_watch(self.client, target.service, policy=self._policy, filter=target.filter,
                                     passing=target.only_passing)
        self._watches.append(watch)
        async for instances in watch:
            if self._target_specs.get(target_id) != spec:
                watch.close()
                return
            endpoints = [Endpoint(i.address, i.port, i.service_id, i.node) for i in instances
                         if i.port and target.admits(i.status)]
            if self.builder.set_target_endpoints(target_id, endpoints):
                self._changed()

    async def _inbound_doc_watch(self, which: str) -> None:
        """KV ``weft/ratelimits/<service>`` or ``weft/faults/<service>``: parsed, the last good one kept."""
        prefix = ratelimit_mod.KV_PREFIX if which == "ratelimits" else faults_mod.KV_PREFIX
        key = prefix + self.service
        watch = kv_watch(self.client, key, policy=self._policy)
        self._watches.append(watch)
        async for entry in watch:
            version = str(entry.modify_index) if entry is not None and entry.value else ""
            try:
                doc: Any = None
                if version and entry is not None:
                    doc = (ratelimit_mod.parse_document(entry.value, key) if which == "ratelimits"
                           else faults_mod.parse_document(entry.value, key))
            except ValueError as exc:
                log.error(f"{which}_unusable", key=key, error=str(exc), note="keeping the last good one")
                continue
            inbound = self.builder.inbound
            if which == "ratelimits":
                new = InboundTraffic(local=inbound.local, caller_limits=doc, faults=inbound.faults,
                                     ratelimits_version=version, faults_version=inbound.faults_version)
            else:
                new = InboundTraffic(local=inbound.local, caller_limits=inbound.caller_limits, faults=doc,
                                     ratelimits_version=inbound.ratelimits_version, faults_version=version)
            if self.builder.set_inbound(new):
                self._changed()

    async def _declared_protocol(self, name: str) -> str | None:
        """The protocol an upstream's own instances declare in their Meta: what decides while none of its
        sidecars has registered yet (at start-up), so that its listener is not opened as TCP first and
        reopened as gRPC a moment later (leaving `method="tcp"` series behind on a gRPC edge)."""
        try:
            _, instances = await self.client.health_service(name, passing=False)
        except ConsulError as exc:
            log.debug("declared_protocol_unknown", upstream=name, error=str(exc))
            return None
        return _instances_protocol(instances)

    def _apply_protocol(self, name: str) -> bool:
        if name != self.service and (not self._sd_answered or name not in self._meta_protocol):
            return False  # wait for service-defaults and the upstream's first answer before deciding its listener
        proto = self._sd_protocol.get(name) or self._meta_protocol.get(name) or "tcp"
        return self.builder.set_protocol(name, proto)

    async def _methods_watch(self) -> None:
        """Every service's published methods (KV weft/methods/) in one blocking prefix read."""
        watch = kv_prefix_watch(self.client, methods_mod.METHODS_PREFIX, policy=self._policy)
        self._watches.append(watch)
        async for entries in watch:
            found: dict[str, dict[str, str]] = {}
            for entry in entries:
                name = entry.key[len(methods_mod.METHODS_PREFIX):]
                try:
                    found[name] = methods_mod.decode(entry.value, key=entry.key)
                except (ValueError, SnapshotError) as exc:
                    log.error("methods_unusable", key=entry.key, error=str(exc))
                    if name in self._methods:
                        found[name] = self._methods[name]  # keep the last good one
            self._methods = found
            reg = self.builder.registration
            assert reg is not None
            changed = False
            for u in reg.upstreams:
                changed = self.builder.set_methods(u.destination_name, found.get(u.destination_name, {})) or changed
            if changed:
                self._changed()

    async def _local_methods(self) -> None:
        found: dict[str, str] | None = self._descriptor_methods
        if found is None and self._reflect:
            await self.ready.wait()
            snap = self.snapshot()
            if snap.registration.protocol != "grpc":
                return
            reg = snap.registration
            found = await methods_mod.learn(f"{reg.local_service_address}:{reg.local_service_port}", stop=self._stop)
        if not found:
            return
        if self.builder.set_local_methods(found):
            self._changed()
        await self.publish_methods(found)

    async def publish_methods(self, found: dict[str, str]) -> None:
        from catalog.client import ConsulError

        key = methods_mod.methods_key(self.service)
        body = methods_mod.encode(self.service, found)
        for attempt in range(10):
            try:
                _, entry = await self.client.kv_get(key)
                if entry is not None and entry.value == body:
                    return
                await self.client.kv_put(key, body)
                log.info("methods_published", key=key, count=len(found))
                return
            except ConsulError as exc:
                log.warning("methods_publish_failed", key=key, error=str(exc), attempt=attempt)
                await asyncio.sleep(min(2.0 ** attempt, 30.0))


def _instances_protocol(instances: tuple[ServiceInstance, ...]) -> str | None:
    for inst in instances:
        p = protocol_of_meta(dict(inst.meta))
        if p is not None:
            return p
    return None
