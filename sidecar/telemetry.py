"""Metrics and logs of a sidecar: Prometheus series with bounded labels, structlog access lines.

Metric names (all on the admin port's ``/metrics``):

- ``weft_requests_total`` and ``weft_request_duration_seconds`` {direction, source, destination,
  method, status}: one observation per gRPC call, HTTP request or TCP connection. ``direction`` is
  ``outbound`` (measured by the caller's sidecar) or ``inbound``; ``method`` is the gRPC method
  path, the HTTP route (method and first path segment) or ``tcp``; ``status`` the gRPC status name,
  the HTTP status code or ``closed``.
- ``weft_authz_decisions_total`` {decision, rule}: ``allow``, ``deny`` or ``audit`` (would have been
  denied, allowed in audit mode), and the deciding rule.
- ``weft_tls_handshake_errors_total`` {direction, reason}.
- ``weft_inbound_connections_total`` {mode}: how the public port handled each authenticated
  connection: ``passthrough`` (L4-allowed caller, bytes passed to the app), ``full`` (per-call
  path), ``denied`` (TCP service, closed), ``closed_by_policy`` (closed by a policy change).
- ``weft_upstream_endpoints`` {upstream}, ``weft_upstream_ejections_total`` {upstream},
  ``weft_retries_total`` {upstream}.
- ``weft_h2_protocol_errors_total`` {reason}: HTTP/2 peers that broke the protocol or passed a limit
  (``sidecar.limits``) and lost their stream or connection for it; ``reason`` is a short fixed word.
- ``weft_connections_refused_total`` {reason}: connections refused or closed by a connection limit
  (connection cap, unfinished handshakes, handshake timeout, idle timeout).
- ``weft_tap_dropped_total``: tap records dropped because a tap's reader fell behind (``sidecar.tap``:
  a tap never slows a call).
- ``weft_cert_expiry_timestamp_seconds``, ``weft_policy_version_info`` {version},
  ``weft_snapshot_version``.

Cardinality: labelled children are cached (no ``.labels()`` per call); ``source`` and
``destination`` take at most :data:`MAX_SERVICES` values and ``method`` at most
:data:`MAX_METHODS` per destination, beyond which they fold into ``other`` / ``unknown``; a method
not in the destination's published method table (when it has one) is ``unknown`` at once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Collection
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from sidecar.call_metrics import CallMetrics
from sidecar.tap import CallRecord, TapHub

MAX_SERVICES = 256
MAX_METHODS = 64
UNKNOWN_METHOD = "unknown"
OTHER = "other"

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class AccessLog:
    """Access lines: every line while under ``per_second``, then a ``sample`` fraction of the rest."""

    def __init__(self, per_second: float = 20.0, sample: float = 0.01, rng: random.Random | None = None) -> None:
        if per_second < 0 or not 0.0 <= sample <= 1.0:
            raise ValueError("access log rate must be >= 0 and sample within [0, 1]")
        self.per_second = per_second
        self.sample = sample
        self._rng = rng or random.Random()
        self._tokens = per_second
        self._last: float | None = None
        self._log = structlog.get_logger("weft.access")

    def admit(self, now: float) -> bool:
        if self.per_second > 0:
            last = now if self._last is None else self._last
            self._tokens = min(self.per_second, self._tokens + max(0.0, now - last) * self.per_second)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
        return self.sample > 0 and self._rng.random() < self.sample

    def emit(self, fields: dict[str, str], status: str, duration_ms: float) -> None:
        """Write an admitted call's line (the caller asked :meth:`admit` first)."""
        self._log.info("access", **fields, status=status, duration_ms=duration_ms)


class RateLimitedLog:
    """Log lines about misbehaving peers: at most ``per_second`` (burst ``burst``), the rest counted.

    A peer that breaks a limit is logged once per connection by the caller; this bounds the total so
    that a thousand abusive connections cannot turn the log into the attack.
    """

    def __init__(self, name: str, per_second: float = 5.0, burst: float = 20.0) -> None:
        self.per_second = per_second
        self.burst = burst
        self._tokens = burst
        self._last: float | None = None
        self.suppressed = 0
        self._log = structlog.get_logger(name)

    def admit(self, now: float) -> bool:
        last = now if self._last is None else self._last
        self._tokens = min(self.burst, self._tokens + max(0.0, now - last) * self.per_second)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.suppressed += 1
        return False

    def warning(self, now: float, event: str, **fields: Any) -> None:
        if self.admit(now):
            if self.suppressed:
                fields["suppressed_before"] = self.suppressed
                self.suppressed = 0
            self._log.warning(event, **fields)


class Telemetry:
    """All of a sidecar's metrics in one registry, with cached children for the hot path."""

    def __init__(self, *, access_per_second: float = 20.0, access_sample: float = 0.01) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.calls = CallMetrics(self.registry, _BUCKETS)  # weft_requests_total, weft_request_duration_seconds
        self.authz = Counter("weft_authz_decisions_total", "Authorization decisions by the deciding rule",
                             ("decision", "rule"), registry=self.registry)
        self.tls_errors = Counter("weft_tls_handshake_errors_total", "Failed TLS handshakes by reason",
                                  ("direction", "reason"), registry=self.registry)
        self.inbound_connections = Counter("weft_inbound_connections_total",
                                           "Authenticated connections on the public port by handling mode",
                                           ("mode",), registry=self.registry)
        self.endpoints = Gauge("weft_upstream_endpoints", "Healthy endpoints per upstream", ("upstream",),
                               registry=self.registry)
        self.ejections = Counter("weft_upstream_ejections_total", "Endpoints ejected after consecutive failures",
                                 ("upstream",), registry=self.registry)
        self.retries = Counter("weft_retries_total", "Calls retried on another endpoint after a connect failure",
                               ("upstream",), registry=self.registry)
        self.h2_protocol_errors = Counter("weft_h2_protocol_errors_total",
                                          "HTTP/2 peers that broke the protocol or a limit, by reason", ("reason",),
                                          registry=self.registry)
        self.connections_refused = Counter("weft_connections_refused_total",
                                           "Connections refused or closed by a connection limit, by reason",
                                           ("reason",), registry=self.registry)
        self.peer_log = RateLimitedLog("weft.sidecar.limits")
        self.tap_dropped = Counter("weft_tap_dropped_total", "Tap records dropped because a tap's reader fell behind",
                                   registry=self.registry)
        # the live taps of this sidecar: the data path checks `tap.active` and nothing else when nobody taps
        self.tap = TapHub(on_drop=self.tap_dropped.inc)
        self._h2_error_children: dict[str, Any] = {}
        self._refused_children: dict[str, Any] = {}
        self.cert_expiry = Gauge("weft_cert_expiry_timestamp_seconds", "Expiry (Unix time) of the current leaf",
                                 registry=self.registry)
        self.policy_version = Gauge("weft_policy_version_info", "The compiled policy version in force (value 1)",
                                    ("version",), registry=self.registry)
        self.snapshot_version = Gauge("weft_snapshot_version", "Publications of the configuration snapshot",
                                      registry=self.registry)
        self._authz_children: dict[tuple[str, str], Any] = {}
        self._services: set[str] = set()
        self._methods: dict[str, set[str]] = {}
        self._policy_label: str | None = None
        self.access = AccessLog(access_per_second, access_sample)

    # -- label folding -------------------------------------------------------------------------
    def service_label(self, name: str) -> str:
        if name in self._services:
            return name
        if len(self._services) >= MAX_SERVICES:
            return OTHER
        self._services.add(name)
        return name

    def method_label(self, destination: str, method: str, known: Collection[str] | None = None) -> str:
        if known:
            return method if method in known else UNKNOWN_METHOD
        seen = self._methods.setdefault(destination, set())
        if method in seen:
            return method
        if len(seen) >= MAX_METHODS:
            return UNKNOWN_METHOD
        seen.add(method)
        return method

    # -- hot path ------------------------------------------------------------------------------
    def request(self, direction: str, source: str, destination: str, method: str, status: str,
                seconds: float) -> None:
        if source not in self._services:
            source = self.service_label(source)
        if destination not in self._services:
            destination = self.service_label(destination)
        self.calls.record((direction, source, destination, method, status), seconds)

    def call_ended(self, direction: str, source: str, destination: str, label: str, status: str, seconds: float,
                   tap: CallRecord | None, method: str, path: str | None = None) -> None:
        """A proxied call (gRPC stream or HTTP request) ended: the one place it is recorded, whatever the
        protocol and direction: its metrics (``label`` is the method as metrics name it), the open tap's
        record if it has one, and the sampled access log (``method`` and ``path`` as the caller sent them)."""
        self.request(direction, source, destination, label, status, seconds)
        if tap is not None:
            self.tap.finish(tap, status, seconds)
        now = time.monotonic()
        if self.access.admit(now):  # most calls are not logged: their line is not even built
            fields = {"direction": direction, "source": source, "destination": destination, "method": method}
            if path is not None:
                fields["path"] = path
            self.access.emit(fields, status, round(seconds * 1000, 3))

    def decision(self, decision: str, rule: str) -> None:
        key = (decision, rule)
        child = self._authz_children.get(key)
        if child is None:
            child = self.authz.labels(decision, rule)
            self._authz_children[key] = child
        child.inc()

    def h2_protocol_error(self, reason: str) -> None:
        child = self._h2_error_children.get(reason)
        if child is None:
            child = self._h2_error_children[reason] = self.h2_protocol_errors.labels(reason)
        child.inc()

    def connection_refused(self, reason: str) -> None:
        child = self._refused_children.get(reason)
        if child is None:
            child = self._refused_children[reason] = self.connections_refused.labels(reason)
        child.inc()

    # -- configuration -------------------------------------------------------------------------
    def set_policy_version(self, version: str) -> None:
        if self._policy_label is not None and self._policy_label != version:
            self.policy_version.remove(self._policy_label)
        self.policy_version.labels(version).set(1)
        self._policy_label = version

    def set_endpoints(self, upstream: str, count: int) -> None:
        self.endpoints.labels(upstream).set(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
