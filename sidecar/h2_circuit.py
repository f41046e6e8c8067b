"""Circuit breaking and connect timeouts on the frame-level HTTP/2 outbound path (``sidecar.h2_proxy``).

The decisions are ``sidecar.circuit``'s; this module reads what they need from the live connections
of the upstream's listener. Nothing here runs for an upstream without ``UpstreamConfig.Limits``
(``admit`` is only called when the upstream's traffic state has a circuit) and the counts are read
from the connections themselves (streams open on them and calls waiting for them), so there is no
count to keep in step and none can leak.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from sidecar.circuit import check_stream
from sidecar.h2.grpc import UNAVAILABLE
from sidecar.traffic import CallPlan, UpstreamTraffic
from sidecar.traffic_metrics import metrics_of

if TYPE_CHECKING:
    from sidecar.h2_conn import OutboundFrameProxy, Stream
    from sidecar.seams import UpstreamPool

log = structlog.get_logger("weft.sidecar.h2")


def admit(proxy: OutboundFrameProxy, st: Stream, plan: CallPlan[str], traffic: UpstreamTraffic[str]) -> bool:
    """Whether a routed stream planned for ``plan.endpoint`` may go on under the limits of ``traffic``
    (the upstream's traffic state, which has a circuit); when not, the stream has been failed with
    UNAVAILABLE naming the limit, and counted."""
    pool = proxy.pool
    limits = traffic.settings.limits
    key = plan.endpoint
    up = proxy.ups.get(key)
    generation = proxy._out.snapshot().credentials.generation
    if up is not None and not (up.closed or up.retired or up.dead or up.generation != generation):
        usable = True
        waits = not (up.ready and not up.waiting and up.can_open())
    else:
        usable = False
        waits = True
    active = pending = 0
    for conn in proxy.all_ups:
        active += len(conn.streams)
        pending += len(conn.waiting)
    overflow = check_stream(limits, active=active + pending, connections=len(proxy.all_ups), pending=pending,
                            needs_connection=not usable, waits=waits)
    if overflow is None:
        return True
    traffic.cancelled(plan)
    metrics_of(proxy.telemetry).circuit_open.labels(pool.name, overflow.limit).inc()
    proxy.fail(st, UNAVAILABLE, overflow.message(pool.name))
    return False


def connect_timeout(pool: UpstreamPool, key: str) -> float:
    """The connect timeout (TCP and TLS handshake) of endpoint ``key`` of a routed upstream; 0 when the
    upstream is not routed (the sidecar's own bounds apply)."""
    traffic = getattr(pool, "traffic", None)
    return float(traffic.connect_timeout(key)) if traffic is not None else 0.0


def connect_timed_out(proxy: OutboundFrameProxy, key: str, timeout: float) -> None:
    """A connection to ``key`` was not up within its connect timeout: counted and logged (its waiting
    calls then go to another endpoint once, or fail with UNAVAILABLE)."""
    metrics_of(proxy.telemetry).connect_timeouts.labels(proxy.pool.name).inc()
    log.warning("upstream_connect_timeout", upstream=proxy.pool.name, endpoint=key, timeout=timeout,
                note="ConnectTimeout (service-resolver) or ConnectTimeoutMs (service-defaults)")
