"""The traffic-management metrics, registered in the sidecar's one registry (``Telemetry.registry``).

- ``weft_retries_total{upstream}`` (the existing counter, ``Telemetry.retries``): every retry;
- ``weft_retry_budget_exhausted_total{upstream}``: retries the budget refused;
- ``weft_outlier_ejections_total{upstream}``: endpoints ejected by passive health checking;
- ``weft_ratelimited_total{source}``: calls into this instance refused by a rate limit, by caller;
- ``weft_faults_injected_total{kind}``: injected ``delay`` and ``abort`` faults;
- ``weft_circuit_open_total{upstream,limit}``: calls refused at once by a circuit breaker
  (service-defaults ``UpstreamConfig.Limits``: ``MaxConnections``, ``MaxPendingRequests``,
  ``MaxConcurrentRequests``);
- ``weft_connect_timeouts_total{upstream}``: upstream connections not up (TCP and TLS) within their
  connect timeout (resolver ``ConnectTimeout``, or ``ConnectTimeoutMs``);
- ``weft_routed_requests_total{upstream,route,subset,status}``: calls that went through a discovery
  chain, by route (its index in the router, ``default`` without a router) and target subset
  (``default`` without one). A separate family: ``weft_requests_total`` keeps its labels.

Label values are bounded: caller names fold to ``other`` past ``MAX_SOURCES``; routes and subsets come
from config entries (bounded by the chain's size).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter

MAX_SOURCES = 200
OTHER = "other"


class TrafficMetrics:
    def __init__(self, telemetry: Any) -> None:
        registry = telemetry.registry
        self.retries = telemetry.retries
        self.budget_exhausted = Counter("weft_retry_budget_exhausted_total",
                                        "Retries refused because the upstream's retry budget was spent",
                                        ("upstream",), registry=registry)
        self.outlier_ejections = Counter("weft_outlier_ejections_total",
                                         "Endpoints ejected by passive health checking (PassiveHealthCheck)",
                                         ("upstream",), registry=registry)
        self.ratelimited = Counter("weft_ratelimited_total", "Calls refused by a rate limit, by caller",
                                   ("source",), registry=registry)
        self.faults = Counter("weft_faults_injected_total", "Faults injected (weft/faults/<service>), by kind",
                              ("kind",), registry=registry)
        self.circuit_open = Counter("weft_circuit_open_total",
                                    "Calls refused by an upstream's circuit breaker (UpstreamConfig.Limits), by limit",
                                    ("upstream", "limit"), registry=registry)
        self.connect_timeouts = Counter("weft_connect_timeouts_total",
                                        "Upstream connections not established within their connect timeout",
                                        ("upstream",), registry=registry)
        self.routed = Counter("weft_routed_requests_total",
                              "Calls routed through a discovery chain, by route, target subset and status",
                              ("upstream", "route", "subset", "status"), registry=registry)
        self._sources: set[str] = set()
        self._routed_children: dict[tuple[str, str, str, str], Any] = {}

    def source_label(self, source: str) -> str:
        if source in self._sources:
            return source
        if len(self._sources) >= MAX_SOURCES:
            return OTHER
        self._sources.add(source)
        return source

    def routed_call(self, upstream: str, route: str, subset: str, status: str) -> None:
        key = (upstream, route, subset or "default", status)
        child = self._routed_children.get(key)
        if child is None:
            child = self.routed.labels(*key)
            if len(self._routed_children) < 10_000:
                self._routed_children[key] = child
        child.inc()


def metrics_of(telemetry: Any) -> TrafficMetrics:
    """The TrafficMetrics of a Telemetry, created with its first use and kept on it."""
    m = getattr(telemetry, "traffic_metrics", None)
    if not isinstance(m, TrafficMetrics):
        m = TrafficMetrics(telemetry)
        telemetry.traffic_metrics = m
    return m
