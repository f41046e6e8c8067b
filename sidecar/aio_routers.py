"""The aio engine's routers (`--grpc-engine aio`): where `sidecar.grpc_proxy.ProxyHandler` sends each call.

Imported only when a sidecar starts a grpc.aio server (sidecar.inbound, sidecar.outbound), so that the
default h2 engine never loads grpc.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import grpc.aio
import structlog

from ca.identity import SpiffeId
from sidecar import authz
from sidecar.grpc_proxy import Refusal, Target, UpstreamChannel
from sidecar.snapshot import Endpoint, Snapshot
from sidecar.telemetry import Telemetry
from sidecar.traffic import CallPlan
from sidecar.traffic_metrics import TrafficMetrics

# The seams: what the routers use of the listeners that own them (sidecar.inbound.Inbound,
# sidecar.outbound.Outbound and EndpointPool), so that this module does not import those.

class InboundSide(Protocol):
    @property
    def snapshot(self) -> Callable[[], Snapshot]: ...
    @property
    def telemetry(self) -> Telemetry: ...
    @property
    def identities(self) -> Mapping[int, SpiffeId]: ...
    @property
    def draining(self) -> bool: ...
    def app_channel(self) -> UpstreamChannel: ...


class OutboundSide(Protocol):
    @property
    def snapshot(self) -> Callable[[], Snapshot]: ...
    @property
    def telemetry(self) -> Telemetry: ...
    @property
    def draining(self) -> bool: ...


class UpstreamPool(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def routed(self) -> bool: ...
    @property
    def endpoints(self) -> Mapping[str, Endpoint]: ...
    @property
    def telemetry(self) -> Telemetry: ...
    @property
    def metrics(self) -> TrafficMetrics: ...
    def pick(self, exclude: str = "") -> str | None: ...
    def plan(self, method: str, path: str, headers: dict[str, str], source: str = "",
             *, exclude: str = "") -> CallPlan[str] | str: ...
    def finished(self, plan: CallPlan[str], *, seconds: float, status: str, failed: bool,
                 transport_ok: bool = True) -> None: ...
    def channel(self, key: str, snap: Snapshot) -> UpstreamChannel: ...
    def done_callback(self, key: str) -> Callable[[grpc.StatusCode, float], None]: ...

log = structlog.get_logger("weft.sidecar.inbound")


def _port_of_peer(peer: str) -> int:
    """The port of a grpc peer string ``ipv4:127.0.0.1:PORT`` / ``ipv6:[::1]:PORT``."""
    try:
        return int(peer.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return -1


class InboundRouter:
    """Routes full-path gRPC calls: authorize by the caller's identity, then the local app."""

    def __init__(self, inbound: InboundSide) -> None:
        self._in = inbound

    def route(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Target:
        inbound = self._in
        snap = inbound.snapshot()
        ident = inbound.identities.get(_port_of_peer(context.peer()))
        if ident is None:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, "weft: the caller's identity is unknown")
        if inbound.draining:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, "weft: the sidecar is shutting down")
        metadata = authz.header_map((k, v) for k, v in context.invocation_metadata() or () if isinstance(v, str))
        decision = authz.decide(snap.policy, ident.uri, authz.GrpcRequest(method, metadata))
        inbound.telemetry.decision(authz.decision_label(decision), decision.rule_label)
        if not decision.allowed:
            message = authz.denial_message(decision, ident.service, snap.registration.service, method)
            log.info("denied", source=ident.service, destination=snap.registration.service, method=method,
                     rule=decision.rule_label, reason=decision.reason)
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, message)
        if decision.audited:
            log.warning("audit_would_deny", source=ident.service, destination=snap.registration.service,
                        method=method, rule=decision.rule_label, reason=decision.reason)
        return Target(inbound.app_channel())

    def retry_target(self, method: str, failed: Target) -> Target | None:
        return None

    def record(self, method: str, code: grpc.StatusCode, seconds: float,
               context: grpc.aio.ServicerContext[Any, Any]) -> None:
        inbound = self._in
        ident = inbound.identities.get(_port_of_peer(context.peer()))
        source = ident.service if ident is not None else "unknown"
        snap = inbound.snapshot()
        dest = snap.registration.service
        label = inbound.telemetry.method_label(dest, method, snap.local_methods)
        inbound.telemetry.request("inbound", source, dest, label, code.name, seconds)
        inbound.telemetry.access.line(time.monotonic(), direction="inbound", source=source, destination=dest,
                                      method=method, status=code.name, duration_ms=round(seconds * 1000, 3))



@dataclass(slots=True)
class _RoutedTarget(Target):
    """A call's target chosen through the discovery chain (kept to plan a retry the same way)."""

    headers: dict[str, str] = field(default_factory=dict)
    endpoint: str = ""


class OutboundRouter:
    """Routes outbound calls to one upstream: pick (or plan through the discovery chain), then its channel."""

    def __init__(self, outbound: OutboundSide, pool: UpstreamPool) -> None:
        self._out = outbound
        self._pool = pool

    def route(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Target:
        if self._out.draining:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, "weft: the sidecar is shutting down")
        pool = self._pool
        if pool.routed:
            return self._routed(method, context)
        key = pool.pick()
        if key is None:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, f"weft: no healthy endpoint of upstream {pool.name}")
        return Target(pool.channel(key, self._out.snapshot()), pool.done_callback(key))

    def _routed(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Target:
        """The aio engine through a discovery chain: route, split, target and endpoint per call (its
        timeouts and retries are the h2 engine's only; here the caller's deadline applies)."""
        headers = {str(k): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        target = self._routed_target(method, headers, "")
        if isinstance(target, str):
            raise Refusal(grpc.StatusCode.UNAVAILABLE, f"weft: {target}")
        return target

    def _routed_target(self, method: str, headers: dict[str, str], exclude: str) -> _RoutedTarget | str:
        pool = self._pool
        plan = pool.plan("POST", method, headers, self._out.snapshot().registration.service, exclude=exclude)
        if isinstance(plan, str):
            return plan

        def done(code: grpc.StatusCode, seconds: float) -> None:
            failed = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
            pool.finished(plan, seconds=seconds, status=code.name, failed=code is grpc.StatusCode.UNAVAILABLE,
                          transport_ok=not failed)

        return _RoutedTarget(pool.channel(plan.endpoint, self._out.snapshot()), done, headers=headers,
                             endpoint=plan.endpoint)

    def _routed_retry(self, method: str, failed: _RoutedTarget) -> Target | None:
        """A connect failure of a routed call (already reported to ``done``): once more, through the
        chain, to another endpoint."""
        if self._out.draining:
            return None
        target = self._routed_target(method, failed.headers, failed.endpoint)
        if isinstance(target, str) or target.endpoint == failed.endpoint:
            return None
        self._pool.metrics.retries.labels(self._pool.name).inc()
        return target

    def retry_target(self, method: str, failed: Target) -> Target | None:
        pool = self._pool
        if isinstance(failed, _RoutedTarget):
            return self._routed_retry(method, failed)
        if len(pool.endpoints) < 2 or self._out.draining:
            return None
        key = pool.pick(exclude=failed.channel.key)
        if key is None or key == failed.channel.key:
            return None
        pool.telemetry.retries.labels(pool.name).inc()
        return Target(pool.channel(key, self._out.snapshot()), pool.done_callback(key))

    def record(self, method: str, code: grpc.StatusCode, seconds: float,
               context: grpc.aio.ServicerContext[Any, Any]) -> None:
        out = self._out
        snap = out.snapshot()
        up = snap.upstreams.get(self._pool.name)
        source = snap.registration.service
        label = out.telemetry.method_label(self._pool.name, method, up.methods if up is not None else None)
        out.telemetry.request("outbound", source, self._pool.name, label, code.name, seconds)
        out.telemetry.access.line(time.monotonic(), direction="outbound", source=source, destination=self._pool.name,
                                  method=method, status=code.name, duration_ms=round(seconds * 1000, 3))
