"""The outbound side: one local listener per upstream, an endpoint picked per call or connection.

For each upstream declared in the registration, a listener on ``LocalBindAddress:LocalBindPort``
speaks the upstream's protocol: for gRPC, the frame-level HTTP/2 proxy (``sidecar.h2_proxy``, the
default engine; the grpc.aio engine of ``sidecar.grpc_proxy`` only with ``--grpc-engine aio``), an
aiohttp server for HTTP (``sidecar.http_proxy``) or a byte pipe for TCP (``sidecar.tcp_proxy``).
Every call (or TCP connection) picks a healthy endpoint of the current snapshot with power of two
choices over a latency EWMA (``sidecar.balance``) and goes there over mTLS, checking that the server
is the upstream (DNS SAN ``<service>.svc.default.<trust-domain>`` as the TLS host name; URI SAN for
TCP and HTTP). gRPC keeps one HTTP/2 connection per endpoint.

Endpoint changes apply to new calls at once; channels of endpoints that left, or built from a
previous certificate, are closed with a grace period so that calls in flight finish.

An upstream whose snapshot carries a discovery chain that routes, splits, redirects or fails over
(or service-defaults limits, passive health checks, timeouts) is ``routed``: its pool then holds the
endpoints of every target of the chain and the per-call decisions (``sidecar.traffic``); the call
paths ask ``plan`` for each call instead of ``pick`` and report with ``finished``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from sidecar.balance import Balancer
from sidecar.limits import Limits
from sidecar.retry import RetryBudget
from sidecar.routing import NoRoute
from sidecar.snapshot import Endpoint, Snapshot, UpstreamState
from sidecar.telemetry import Telemetry
from sidecar.tls import TlsContexts, expected_server_name
from sidecar.traffic import CallPlan, NoEndpoint, UpstreamTraffic
from sidecar.traffic_metrics import metrics_of

if TYPE_CHECKING:  # the aio engine (grpc, sidecar.grpc_proxy) is imported only where it is started
    import grpc

    from sidecar.grpc_proxy import UpstreamChannel

log = structlog.get_logger("weft.sidecar.outbound")

RETIRE_GRACE = 30.0
NO_BUDGET = RetryBudget(ratio=0.0, min_per_second=0.0)


class EndpointPool:
    """Endpoints of one upstream: the balancer, and one gRPC channel per endpoint."""

    def __init__(self, name: str, telemetry: Telemetry, tls: TlsContexts, max_message_bytes: int,
                 limits: Limits | None = None) -> None:
        self.name = name
        self.limits = limits or Limits()
        self.telemetry = telemetry
        self.tls = tls
        self.max_message_bytes = max_message_bytes
        self.balancer: Balancer[str] = Balancer()
        self.endpoints: dict[str, Endpoint] = {}
        self._channels: dict[str, UpstreamChannel] = {}
        self._generation = ""
        self._done: dict[str, Callable[[grpc.StatusCode, float], None]] = {}
        self._retiring: set[asyncio.Task[Any]] = set()
        self.traffic: UpstreamTraffic[str] | None = None  # set while the upstream is routed
        self.services: dict[str, str] = {}  # endpoint key -> its service (a chain may reach other services)
        self.metrics = metrics_of(telemetry)

    @property
    def routed(self) -> bool:
        return self.traffic is not None

    def update(self, up: UpstreamState, snap: Snapshot) -> None:
        now = time.monotonic()
        if up.routed and up.chain is not None:
            endpoints: dict[str, Endpoint] = {}
            services: dict[str, str] = {}
            by_target: dict[str, list[str]] = {}
            for tid, eps in up.targets.items():
                service = up.chain.targets[tid].service
                by_target[tid] = [e.key for e in eps]
                for e in eps:
                    endpoints[e.key] = e
                    services[e.key] = service
            self.endpoints, self.services = endpoints, services
            if self.traffic is None:
                self.traffic = UpstreamTraffic(self.name, up.chain, settings=up.settings)
            self.traffic.update(chain=up.chain, endpoints=by_target, settings=up.settings, now=now)
        else:
            self.traffic = None
            self.services = {}
            self.endpoints = {e.key: e for e in up.endpoints}
        self.balancer.set_endpoints(self.endpoints, now)
        generation = snap.credentials.generation
        stale = [k for k in self._channels if k not in self.endpoints or generation != self._generation]
        self._generation = generation
        for key in stale:
            self._retire(self._channels.pop(key))
        self.telemetry.set_endpoints(self.name, len(self.endpoints))

    def _retire(self, ch: UpstreamChannel) -> None:
        ch.closing = True
        task = asyncio.ensure_future(ch.channel.close(grace=RETIRE_GRACE))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def pick(self, exclude: str = "") -> str | None:
        now = time.monotonic()
        key = self.balancer.pick(now)
        if key is not None and key == exclude and len(self.endpoints) > 1:
            for _ in range(4):
                key = self.balancer.pick(now)
                if key != exclude:
                    break
        if key is not None:
            self.balancer.start(key)
        return key

    def service_of(self, key: str) -> str:
        """The service an endpoint belongs to: whose identity its TLS peer must prove."""
        return self.services.get(key, self.name)

    def plan(self, method: str, path: str, headers: dict[str, str], source: str = "",
             *, exclude: str = "") -> CallPlan[str] | str:
        """A routed call's plan (route, split, target, endpoint), or the reason there is none (the
        call then fails with UNAVAILABLE / 503 naming it). ``exclude`` avoids an endpoint (a retry)."""
        traffic = self.traffic
        if traffic is None:
            return f"upstream {self.name} is no longer routed through a discovery chain"
        now = time.monotonic()
        try:
            plan = traffic.plan_call(method, path, headers, now, source=source, exclude=exclude or None)
        except (NoEndpoint, NoRoute) as exc:
            return str(exc)
        traffic.started(plan, now, retry=bool(exclude))
        return plan

    def finished(self, plan: CallPlan[str], *, seconds: float, status: str, failed: bool,
                 transport_ok: bool = True) -> None:
        """A routed attempt ended: latency and outcome to the pickers and passive health checking."""
        traffic = self.traffic
        if traffic is None:
            return
        if traffic.finished(plan, time.monotonic(), latency=seconds, failed=failed, transport_ok=transport_ok):
            self.metrics.outlier_ejections.labels(self.name).inc()
            log.warning("endpoint_ejected", upstream=self.name, endpoint=plan.endpoint, target=plan.target.id,
                        reason="passive health check")
        self.metrics.routed_call(self.name, plan.decision.route_label, plan.target.subset, status)

    def budget(self) -> RetryBudget:
        """The upstream's retry budget (an empty one while it is not routed)."""
        return self.traffic.budget if self.traffic is not None else NO_BUDGET

    def describe_traffic(self) -> dict[str, Any] | None:
        """The live traffic state for ``/config`` (None when the upstream is not routed)."""
        return self.traffic.describe(time.monotonic()) if self.traffic is not None else None

    def release(self, key: str) -> None:
        """Undo a pick that was not used."""
        if key in self.endpoints:
            s = self.balancer.stats(key)
            s.in_flight = max(0, s.in_flight - 1)

    def observe(self, key: str, ok: bool, seconds: float) -> None:
        before = self.balancer.ejected(time.monotonic()) if not ok else ()
        now = time.monotonic()
        self.balancer.observe(key, seconds, now, ok=ok)
        if not ok and key not in before and key in self.balancer.ejected(now):
            self.telemetry.ejections.labels(self.name).inc()
            log.warning("endpoint_ejected", upstream=self.name, endpoint=key)

    def channel(self, key: str, snap: Snapshot) -> UpstreamChannel:
        ch = self._channels.get(key)
        if ch is None:
            import grpc.aio

            from sidecar.grpc_proxy import UpstreamChannel, channel_options

            creds = self.tls.grpc_credentials(snap.credentials)
            name = expected_server_name(self.service_of(key), snap.credentials.trust_domain)
            options = [("grpc.ssl_target_name_override", name), ("grpc.default_authority", name),
                       *channel_options(self.max_message_bytes, self.limits)]
            ch = UpstreamChannel(grpc.aio.secure_channel(key, creds, options=options), key)
            self._channels[key] = ch
        return ch

    def done_callback(self, key: str) -> Callable[[grpc.StatusCode, float], None]:
        cb = self._done.get(key)
        if cb is None:
            def cb(code: grpc.StatusCode, seconds: float, key: str = key) -> None:
                self.observe(key, code.name != "UNAVAILABLE", seconds)
            if len(self._done) > 1024:
                self._done.clear()
            self._done[key] = cb
        return cb

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.channel.close(None)
        self._channels.clear()
        for task in list(self._retiring):
            task.cancel()


class Outbound:
    """All upstream listeners of one sidecar."""

    def __init__(self, snapshot: Callable[[], Snapshot], telemetry: Telemetry, tls: TlsContexts, *,
                 max_message_bytes: int = 4 * 1024 * 1024, grpc_engine: str = "h2",
                 limits: Limits | None = None) -> None:
        if grpc_engine not in ("h2", "aio"):
            raise ValueError(f"grpc engine {grpc_engine!r} is not h2 or aio")
        self.grpc_engine = grpc_engine
        self.limits = limits or Limits()
        self.snapshot = snapshot
        self.telemetry = telemetry
        self.tls = tls
        self.max_message_bytes = max_message_bytes
        self.pools: dict[str, EndpointPool] = {}
        self._listeners: dict[str, Any] = {}
        self._protocols: dict[str, str] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.draining = False

    async def start(self) -> None:
        async with self._lock:
            snap = self.snapshot()
            for name, up in snap.upstreams.items():
                await self._start_upstream(name, up, snap)

    async def _start_upstream(self, name: str, up: UpstreamState, snap: Snapshot) -> None:
        pool = EndpointPool(name, self.telemetry, self.tls, self.max_message_bytes, self.limits)
        pool.update(up, snap)
        self.pools[name] = pool
        self._protocols[name] = up.protocol
        addr = f"{up.config.local_bind_address}:{up.config.local_bind_port}"
        if up.protocol == "grpc" and self.grpc_engine == "h2":
            from sidecar.h2_proxy import H2Outbound

            h2 = H2Outbound(self, pool)
            await h2.start(up.config.local_bind_address, up.config.local_bind_port)
            self._listeners[name] = h2
        elif up.protocol == "grpc":
            import grpc.aio

            from sidecar.aio_routers import OutboundRouter
            from sidecar.grpc_proxy import ProxyHandler, server_options

            server = grpc.aio.server(options=server_options(self.max_message_bytes, self.limits))

            def kinds(name: str = name) -> Any:
                u = self.snapshot().upstreams.get(name)
                return u.methods if u is not None else {}

            server.add_generic_rpc_handlers((ProxyHandler(OutboundRouter(self, pool), kinds),))
            if server.add_insecure_port(addr) == 0:
                raise OSError(f"cannot listen on {addr} for upstream {name}")
            await server.start()
            self._listeners[name] = server
        elif up.protocol == "http":
            from sidecar.http_proxy import OutboundHttp

            listener = OutboundHttp(self, pool)
            await listener.start(up.config.local_bind_address, up.config.local_bind_port)
            self._listeners[name] = listener
        else:
            from sidecar.tcp_proxy import OutboundTcp

            tcp = OutboundTcp(self, pool)
            await tcp.start(up.config.local_bind_address, up.config.local_bind_port)
            self._listeners[name] = tcp
        log.info("outbound_listening", upstream=name, address=addr, protocol=up.protocol,
                 endpoints=len(up.endpoints))

    def on_snapshot(self, snap: Snapshot) -> None:
        reconfigure = False
        for name, up in snap.upstreams.items():
            pool = self.pools.get(name)
            if pool is None or self._protocols.get(name) != up.protocol:
                reconfigure = True
            else:
                pool.update(up, snap)
                listener: Any = self._listeners.get(name)
                if listener is not None and hasattr(listener, "on_snapshot"):
                    listener.on_snapshot()
        if set(self.pools) - set(snap.upstreams):
            reconfigure = True
        if reconfigure and not self.draining:
            task = asyncio.ensure_future(self._reconfigure())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _reconfigure(self) -> None:
        """Start listeners of new upstreams, restart those whose protocol changed, stop removed ones."""
        async with self._lock:
            snap = self.snapshot()
            for name in list(self.pools):
                up = snap.upstreams.get(name)
                if up is None or self._protocols.get(name) != up.protocol:
                    log.info("outbound_listener_stopping", upstream=name,
                             reason="removed" if up is None else f"protocol is now {up.protocol}")
                    await self._stop_upstream(name, grace=1.0)
            for name, up in snap.upstreams.items():
                if name not in self.pools:
                    try:
                        await self._start_upstream(name, up, snap)
                    except OSError as exc:
                        log.error("outbound_listen_failed", upstream=name, error=str(exc))

    async def _stop_upstream(self, name: str, grace: float) -> None:
        listener = self._listeners.pop(name, None)
        pool = self.pools.pop(name, None)
        protocol = self._protocols.pop(name, None)
        if protocol == "grpc" and self.grpc_engine == "aio" and listener is not None:  # a grpc.aio.Server
            await listener.stop(grace)
        elif listener is not None:
            await listener.close(grace)
        if pool is not None:
            await pool.close()

    def stop_accepting(self) -> None:
        self.draining = True

    def describe_traffic(self) -> dict[str, Any]:
        """Each routed upstream's live traffic state (splits, ejected endpoints, retry budget)."""
        out = {}
        for name, pool in sorted(self.pools.items()):
            d = pool.describe_traffic()
            if d is not None:
                out[name] = d
        return out

    async def close(self, grace: float = 5.0) -> None:
        self.draining = True
        async with self._lock:
            await asyncio.gather(*(self._stop_upstream(name, grace) for name in list(self.pools)))
