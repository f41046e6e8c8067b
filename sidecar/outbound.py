"""The outbound side: one local listener per upstream, an endpoint picked per call or connection.

For each upstream declared in the registration, a listener on ``LocalBindAddress:LocalBindPort``
speaks the upstream's protocol: for gRPC, the frame-level HTTP/2 proxy (``sidecar.h2_proxy``), an
aiohttp server for HTTP (``sidecar.http_proxy``) or a byte pipe for TCP (``sidecar.tcp_proxy``).
Every call (or TCP connection) picks a healthy endpoint of the current snapshot with power of two
choices over a latency EWMA (``sidecar.balance``) and goes there over mTLS, checking that the server
is the upstream (DNS SAN ``<service>.svc.default.<trust-domain>`` as the TLS host name; URI SAN for
TCP and HTTP). gRPC keeps one HTTP/2 connection per endpoint (``sidecar.h2_proxy``).

Endpoint changes apply to new calls at once; calls in flight finish.

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
from sidecar.tls import TlsContexts
from sidecar.traffic import CallPlan, NoEndpoint, UpstreamTraffic
from sidecar.traffic_metrics import metrics_of

if TYPE_CHECKING:
    from sidecar.seams import OutboundListener

log = structlog.get_logger("weft.sidecar.outbound")

NO_BUDGET = RetryBudget(ratio=0.0, min_per_second=0.0)


class EndpointPool:
    """Endpoints of one upstream: the balancer and, while the upstream is routed, its traffic decisions."""

    def __init__(self, name: str, telemetry: Telemetry) -> None:
        self.name = name
        self.telemetry = telemetry
        self.balancer: Balancer[str] = Balancer()
        self.endpoints: dict[str, Endpoint] = {}
        self.traffic: UpstreamTraffic[str] | None = None  # set while the upstream is routed
        self.services: dict[str, str] = {}  # endpoint key -> its service (a chain may reach other services)
        self.metrics = metrics_of(telemetry)

    @property
    def routed(self) -> bool:
        return self.traffic is not None

    def update(self, up: UpstreamState) -> None:
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
        self.telemetry.set_endpoints(self.name, len(self.endpoints))

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


class Outbound:
    """All upstream listeners of one sidecar."""

    def __init__(self, snapshot: Callable[[], Snapshot], telemetry: Telemetry, tls: TlsContexts, *,
                 max_message_bytes: int = 4 * 1024 * 1024, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.snapshot = snapshot
        self.telemetry = telemetry
        self.tls = tls
        self.max_message_bytes = max_message_bytes
        self.pools: dict[str, EndpointPool] = {}
        self._listeners: dict[str, OutboundListener] = {}
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
        pool = EndpointPool(name, self.telemetry)
        pool.update(up)
        self.pools[name] = pool
        self._protocols[name] = up.protocol
        addr = f"{up.config.local_bind_address}:{up.config.local_bind_port}"
        if up.protocol == "grpc":
            from sidecar.h2_proxy import H2Outbound

            h2 = H2Outbound(self, pool)
            await h2.start(up.config.local_bind_address, up.config.local_bind_port)
            self._listeners[name] = h2
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
                pool.update(up)
                listener = self._listeners.get(name)
                if listener is not None:
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
        self.pools.pop(name, None)
        self._protocols.pop(name, None)
        if listener is not None:
            await listener.close(grace)

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
