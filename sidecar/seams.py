"""The seams of the sidecar's data path: what its listener modules use of the objects that own them.

A listener (``sidecar.h2_proxy``, ``sidecar.http_proxy``, ``sidecar.tcp_proxy``) and the helpers it
calls (``sidecar.h2_traffic``, ``sidecar.h2_circuit``, ``sidecar.http_routing``,
``sidecar.http_circuit``) are given the direction they serve (``sidecar.outbound.Outbound`` or
``sidecar.inbound.Inbound``) and, outbound, the upstream's endpoint pool
(``sidecar.outbound.EndpointPool``). They are typed with the protocols below instead of those
classes, so that the data path does not import the modules that start it (no import cycles), and
mypy checks at each place a listener is created that the object passed has what the listener uses.

What the frame-level HTTP/2 connections and helpers need of the frame-level proxy (``FrameProxy``,
``OutboundFrameProxy``, ``InboundFrameProxy``) is declared in ``sidecar.h2_conn`` next to
``Stream`` and ``UpConn``, which their members speak of: declared here, they would make this module
and ``sidecar.h2_conn`` import each other.

These are for the type checker only: nothing here runs per call, and no object is checked against
them at run time. This module imports types only (under ``TYPE_CHECKING``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import aiohttp

    from ca.identity import SpiffeId
    from sidecar.authorizer import Authorizer
    from sidecar.limits import Limits
    from sidecar.retry import RetryBudget
    from sidecar.snapshot import Endpoint, Snapshot
    from sidecar.telemetry import Telemetry
    from sidecar.tls import TlsContexts
    from sidecar.traffic import CallPlan, InboundControls, UpstreamTraffic
    from sidecar.traffic_metrics import TrafficMetrics


class Direction(Protocol):
    """The side of the sidecar a listener belongs to.

    Implemented by ``sidecar.outbound.Outbound`` and ``sidecar.inbound.Inbound``; used by the
    listeners (``sidecar.h2_proxy.H2Outbound``, ``sidecar.http_proxy.OutboundHttp``,
    ``sidecar.tcp_proxy.OutboundTcp``) and by ``sidecar.h2_traffic``, ``sidecar.h2_circuit`` and
    ``sidecar.http_routing`` through them: the current snapshot, where calls are counted, the
    bounds, and whether the sidecar is shutting down.
    """

    @property
    def snapshot(self) -> Callable[[], Snapshot]: ...
    @property
    def telemetry(self) -> Telemetry: ...
    @property
    def limits(self) -> Limits: ...
    @property
    def max_message_bytes(self) -> int: ...
    @property
    def draining(self) -> bool: ...
    @property
    def tls(self) -> TlsContexts: ...


class InboundDirection(Direction, Protocol):
    """The inbound side, with what its full path needs to authorize a call and apply the caller's
    rate limits and faults.

    Implemented by ``sidecar.inbound.Inbound``; used by ``sidecar.h2_proxy.H2Inbound``,
    ``sidecar.http_proxy.InboundHttp`` and ``sidecar.h2_traffic``'s inbound hooks.
    """

    @property
    def identities(self) -> Mapping[int, SpiffeId]:
        """The caller of each decrypted connection spliced to the HTTP full path, by its source port on loopback."""
    @property
    def authorizer(self) -> Authorizer: ...
    def controls_for(self, snap: Snapshot) -> InboundControls:
        """The rate limits and faults of ``snap``'s inbound traffic settings."""


class UpstreamPool(Protocol):
    """The endpoints of one upstream: the balancer (``pick``, ``observe``, ``release``) and, while the
    upstream is ``routed`` through its discovery chain, the per-call plans (``plan``, ``finished``,
    ``budget``, ``traffic``).

    Implemented by ``sidecar.outbound.EndpointPool``; used by the outbound listeners
    (``sidecar.h2_proxy.H2Outbound``, ``sidecar.http_proxy.OutboundHttp``,
    ``sidecar.tcp_proxy.OutboundTcp``) and by ``sidecar.h2_traffic``, ``sidecar.h2_circuit``,
    ``sidecar.http_routing`` and ``sidecar.http_circuit``.
    """

    @property
    def name(self) -> str: ...
    @property
    def endpoints(self) -> Mapping[str, Endpoint]: ...
    @property
    def traffic(self) -> UpstreamTraffic[str] | None: ...
    @property
    def metrics(self) -> TrafficMetrics: ...
    @property
    def routed(self) -> bool: ...
    def pick(self, exclude: str = "") -> str | None: ...
    def release(self, key: str) -> None: ...
    def observe(self, key: str, ok: bool, seconds: float) -> None: ...
    def service_of(self, key: str) -> str: ...
    def plan(self, method: str, path: str, headers: dict[str, str], source: str = "",
             *, exclude: str = "") -> CallPlan[str] | str: ...
    def finished(self, plan: CallPlan[str], *, seconds: float, status: str, failed: bool,
                 transport_ok: bool = True) -> None: ...
    def budget(self) -> RetryBudget: ...


class HttpListener(Protocol):
    """An outbound HTTP listener as its routed call path sees it: its direction, its upstream's pool
    and the client session of the current credentials.

    Implemented by ``sidecar.http_proxy.OutboundHttp``; used by ``sidecar.http_routing``.
    """

    @property
    def _out(self) -> Direction: ...
    @property
    def _pool(self) -> UpstreamPool: ...
    def _session(self) -> aiohttp.ClientSession: ...


class OutboundListener(Protocol):
    """An upstream's local listener as ``sidecar.outbound.Outbound`` starts, updates and stops it;
    implemented by ``sidecar.h2_proxy.H2Outbound``, ``sidecar.http_proxy.OutboundHttp`` and
    ``sidecar.tcp_proxy.OutboundTcp``."""

    async def start(self, host: str, port: int) -> None: ...

    def on_snapshot(self) -> None:
        """The upstream's endpoints may have changed (its pool is already updated)."""

    async def close(self, grace: float = 5.0) -> None: ...


__all__ = ["Direction", "HttpListener", "InboundDirection", "OutboundListener", "UpstreamPool"]
