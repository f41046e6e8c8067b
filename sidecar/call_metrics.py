"""The per-call series ``weft_requests_total`` and ``weft_request_duration_seconds``, kept as plain numbers.

Every proxied call records one count and one duration. prometheus_client's ``Counter.inc`` and
``Histogram.observe`` take a lock and walk the buckets in Python on each call (about 1.1 µs together,
measured beside this module's 0.4 µs), which the sidecar's single event-loop thread does not need. So the
two series live here as one list per label set (a count per bucket, then the sum), the bucket found by
``bisect``, and are turned into metric families only when ``/metrics`` is scraped: this object is a
collector registered in the sidecar's registry, and the exposition is the one the two prometheus_client
metrics gave (same names, labels, buckets and cumulative counts), less their ``_created`` series.

Not thread-safe by design: calls are recorded on the event loop, and the scrape runs on it too.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

LABELS = ("direction", "source", "destination", "method", "status")
Key = tuple[str, str, str, str, str]


class CallMetrics:
    """Counts and durations of calls by (direction, source, destination, method, status)."""

    def __init__(self, registry: CollectorRegistry, buckets: Sequence[float]) -> None:
        if list(buckets) != sorted(set(buckets)) or not buckets or not 0 < buckets[-1] < 1e6:
            raise ValueError(f"histogram buckets must be distinct, ascending and below 1e6, got {list(buckets)!r}")
        self.buckets = tuple(float(b) for b in buckets)
        # key -> [calls in bucket 0, ..., calls in bucket n-1, calls above the last bound, sum of durations]
        self.series: dict[Key, list[float]] = {}
        registry.register(self)

    def record(self, key: Key, seconds: float) -> None:
        counts = self.series.get(key)
        if counts is None:
            counts = self.series[key] = [0] * (len(self.buckets) + 1) + [0.0]
        counts[bisect_left(self.buckets, seconds)] += 1  # the first bound >= seconds: Prometheus' "le"
        counts[-1] += seconds

    def calls(self, key: Key) -> int:
        counts = self.series.get(key)
        return 0 if counts is None else int(sum(counts[:-1]))

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, HistogramMetricFamily]:
        return (CounterMetricFamily("weft_requests", "Calls, HTTP requests and TCP connections proxied", labels=LABELS),
                HistogramMetricFamily("weft_request_duration_seconds",
                                      "Duration of proxied calls as seen by the sidecar", labels=LABELS))

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        requests, duration = self._families()
        bounds = [*(repr(b) for b in self.buckets), "+Inf"]  # as prometheus_client writes bounds below 1e6
        for key, counts in list(self.series.items()):
            cumulative: list[tuple[str, float]] = []
            total = 0
            for bound, n in zip(bounds, counts[:-1], strict=True):
                total += int(n)
                cumulative.append((bound, float(total)))
            requests.add_metric(list(key), float(total))
            duration.add_metric(list(key), cumulative, counts[-1])
        yield requests
        yield duration
