"""Circuit breaking and connect timeouts of an upstream, as Envoy applies them to a cluster (pure).

service-defaults ``UpstreamConfig.Limits`` (``Defaults``, then the upstream's ``Overrides`` entry) set
three thresholds for the calls of this sidecar to one upstream; 0 (or unset) means no limit:

- ``MaxConnections``: upstream connections held at once. The h2 engine holds one connection per
  endpoint, so a call whose endpoint has no connection while the upstream already holds that many
  fails at once (Envoy would queue it). On the HTTP/1.1 path a connection carries one request at a
  time: a request finding every allowed connection busy waits for one (it is pending);
- ``MaxPendingRequests``: calls waiting for a connection or for a stream slot on it (the connection is
  still being set up, or the peer's ``SETTINGS_MAX_CONCURRENT_STREAMS`` is reached; on HTTP/1.1, all
  ``MaxConnections`` connections are busy); a call that would wait beyond it fails at once;
- ``MaxConcurrentRequests``: calls in flight on the upstream (waiting ones included); a call beyond it
  fails at once.

A call over a threshold fails with gRPC UNAVAILABLE or HTTP 503 and a message naming the threshold,
and is counted in ``weft_circuit_open_total{upstream,limit}``; such a call says nothing about the
endpoint's health (no passive health checking, no latency sample).

The connect timeout of an endpoint (TCP and TLS handshake): the caller's service-defaults
``ConnectTimeoutMs`` for this upstream when set (Consul passes it to the chain compiler as
``OverrideConnectTimeout``, which replaces every resolver's), else the ``ConnectTimeout`` of the
resolver of the chain target the endpoint belongs to (5 s when the resolver sets none).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sidecar.upstreamconfig import UpstreamLimits, UpstreamSettings

MAX_CONNECTIONS = "MaxConnections"
MAX_PENDING_REQUESTS = "MaxPendingRequests"
MAX_CONCURRENT_REQUESTS = "MaxConcurrentRequests"
LIMIT_NAMES = (MAX_CONNECTIONS, MAX_PENDING_REQUESTS, MAX_CONCURRENT_REQUESTS)

DEFAULT_CONNECT_TIMEOUT = 5.0  # Consul's, when a resolver sets none


def limited(limits: UpstreamLimits) -> bool:
    """Whether any threshold is set (without one, the call paths do no circuit-breaking work)."""
    return bool(limits.max_connections or limits.max_pending_requests or limits.max_concurrent_requests)


@dataclass(frozen=True)
class Overflow:
    """The threshold a call would pass: the call fails at once."""

    limit: str  # one of LIMIT_NAMES
    value: int

    def message(self, upstream: str) -> str:
        return (f"weft: circuit breaker open for upstream {upstream}: {self.limit} ({self.value}) reached "
                "(service-defaults UpstreamConfig.Limits)")


@dataclass(frozen=True)
class Admission:
    """A call's fate under the limits: refused (``overflow``), or admitted, possibly ``waits`` for a
    connection (HTTP/1.1 only: every allowed connection is busy)."""

    overflow: Overflow | None = None
    waits: bool = False


ADMITTED = Admission()


def check_stream(limits: UpstreamLimits, *, active: int, connections: int, pending: int,
                 needs_connection: bool, waits: bool) -> Overflow | None:
    """A new HTTP/2 stream (a gRPC call) of an upstream: ``active`` calls already in flight there,
    ``connections`` held, ``pending`` streams waiting; ``needs_connection``: its endpoint has no usable
    connection (one would be opened); ``waits``: it would wait (connection not ready, or no stream slot)."""
    if limits.max_concurrent_requests and active >= limits.max_concurrent_requests:
        return Overflow(MAX_CONCURRENT_REQUESTS, limits.max_concurrent_requests)
    if needs_connection and limits.max_connections and connections >= limits.max_connections:
        return Overflow(MAX_CONNECTIONS, limits.max_connections)
    if waits and limits.max_pending_requests and pending >= limits.max_pending_requests:
        return Overflow(MAX_PENDING_REQUESTS, limits.max_pending_requests)
    return None


class RequestCircuit:
    """The counts of one upstream's HTTP/1.1 requests (one request per connection at a time): ``busy``
    requests hold a connection, ``pending`` ones wait for one. The caller waits itself (I/O) while
    ``admit`` says so, then calls ``acquired``; ``released`` once the request is over."""

    def __init__(self, limits: UpstreamLimits) -> None:
        self.limits = limits
        self.busy = 0
        self.pending = 0

    def admit(self) -> Admission:
        lim = self.limits
        if lim.max_concurrent_requests and self.busy + self.pending >= lim.max_concurrent_requests:
            return Admission(Overflow(MAX_CONCURRENT_REQUESTS, lim.max_concurrent_requests))
        if lim.max_connections and self.busy >= lim.max_connections:
            if lim.max_pending_requests and self.pending >= lim.max_pending_requests:
                return Admission(Overflow(MAX_PENDING_REQUESTS, lim.max_pending_requests))
            self.pending += 1
            return Admission(waits=True)
        self.busy += 1
        return ADMITTED

    def can_acquire(self) -> bool:
        """A waiting request may take a connection now."""
        return not self.limits.max_connections or self.busy < self.limits.max_connections

    def acquired(self) -> None:
        """A waiting request took a connection (after ``can_acquire``)."""
        self.pending -= 1
        self.busy += 1

    def gave_up(self) -> None:
        """A waiting request ended before it got a connection (its caller left, or a timeout passed)."""
        self.pending -= 1

    def released(self) -> None:
        self.busy -= 1


def connect_timeout(settings: UpstreamSettings, target_timeouts: Iterable[float]) -> float:
    """The connect timeout of an endpoint: the upstream's ``ConnectTimeoutMs`` when set, else the
    longest ``ConnectTimeout`` of the chain targets it belongs to (an endpoint may be in several subsets)."""
    if settings.connect_timeout > 0:
        return settings.connect_timeout
    return max((t for t in target_timeouts if t > 0), default=DEFAULT_CONNECT_TIMEOUT)
