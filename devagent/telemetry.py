"""The dev agent's metrics, kept as Consul's in-memory sink (go-metrics ``InmemSink``) keeps them (pure).

Counters and samples are aggregated per 10-second interval (the last six are kept, Consul's one
minute); ``display`` answers ``/v1/agent/metrics`` in Consul's JSON shape (``Timestamp``, ``Gauges``,
``Points``, ``Counters``, ``Samples``) from the last *complete* interval, as ``DisplayMetrics`` does
(the current one while it is the only one). Gauges are callables read at display time. Cumulative
totals feed the Prometheus text rendering (``prometheus``).

Names are Consul's dotted names (``consul.api.http``); labels are a small fixed set per call site
(HTTP method and route pattern, never a raw path), so the number of series is bounded by the routes.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

INTERVAL = 10.0  # seconds: Consul's in-memory sink interval
RETAIN = 6  # intervals kept (one minute, as Consul)
MAX_SERIES = 4096  # distinct (name, labels) per interval: a guard, far above what the routes produce

LabelKey = tuple[tuple[str, str], ...]
SeriesKey = tuple[str, LabelKey]


@dataclass
class _Agg:
    count: int = 0
    sum: float = 0.0
    sumsq: float = 0.0
    min: float = math.inf
    max: float = -math.inf

    def add(self, value: float) -> None:
        self.count += 1
        self.sum += value
        self.sumsq += value * value
        self.min = min(self.min, value)
        self.max = max(self.max, value)

    def view(self, name: str, labels: LabelKey, interval: float) -> dict[str, Any]:
        mean = self.sum / self.count if self.count else 0.0
        stddev = 0.0
        if self.count > 1:
            num = self.sumsq - (self.sum * self.sum) / self.count
            stddev = math.sqrt(max(num, 0.0) / (self.count - 1))
        return {"Name": name, "Count": self.count, "Rate": _js(self.sum / interval), "Sum": _js(self.sum),
                "Min": _js(self.min), "Max": _js(self.max), "Mean": _js(mean), "Stddev": _js(stddev),
                "Labels": dict(labels)}


@dataclass
class _Interval:
    start: float
    counters: dict[SeriesKey, _Agg] = field(default_factory=dict)
    samples: dict[SeriesKey, _Agg] = field(default_factory=dict)


def _key(name: str, labels: Mapping[str, str] | None) -> SeriesKey:
    return name, tuple(sorted((labels or {}).items()))


class Metrics:
    """Counters, samples (timings in milliseconds, as go-metrics) and gauges."""

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self._intervals: list[_Interval] = []
        self._gauges: dict[str, Callable[[], float]] = {}
        self._totals_counters: dict[SeriesKey, _Agg] = {}
        self._totals_samples: dict[SeriesKey, _Agg] = {}

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        """Report ``read()`` as gauge ``name`` whenever the metrics are displayed."""
        self._gauges[name] = read

    def _current(self, now: float) -> _Interval:
        start = math.floor(now / self.interval) * self.interval
        if not self._intervals or self._intervals[-1].start != start:
            self._intervals.append(_Interval(start))
            del self._intervals[:-RETAIN]
        return self._intervals[-1]

    def incr(self, name: str, now: float, value: float = 1.0, labels: Mapping[str, str] | None = None) -> None:
        self._add(self._current(now).counters, self._totals_counters, _key(name, labels), value)

    def sample(self, name: str, now: float, value: float, labels: Mapping[str, str] | None = None) -> None:
        self._add(self._current(now).samples, self._totals_samples, _key(name, labels), value)

    @staticmethod
    def _add(series: dict[SeriesKey, _Agg], totals: dict[SeriesKey, _Agg], key: SeriesKey, value: float) -> None:
        for table in (series, totals):
            agg = table.get(key)
            if agg is None:
                if len(table) >= MAX_SERIES:
                    continue
                agg = table[key] = _Agg()
            agg.add(value)

    def _gauge_values(self) -> list[tuple[str, float]]:
        out = []
        for name, read in sorted(self._gauges.items()):
            try:
                out.append((name, float(read())))
            except Exception:  # a gauge that cannot be read is left out, never fails the answer
                continue
        return out

    def display(self, now: float) -> dict[str, Any]:
        """``/v1/agent/metrics``: Consul's MetricsSummary of the last complete interval."""
        self._current(now)
        shown = self._intervals[-2] if len(self._intervals) > 1 else self._intervals[-1]
        stamp = datetime.datetime.fromtimestamp(round(shown.start), datetime.UTC)
        return {
            "Timestamp": stamp.strftime("%Y-%m-%d %H:%M:%S +0000 UTC"),
            "Gauges": [{"Name": n, "Value": _js(v), "Labels": {}} for n, v in self._gauge_values()],
            "Points": [],
            "Counters": [a.view(n, lk, self.interval) for (n, lk), a in sorted(shown.counters.items())],
            "Samples": [a.view(n, lk, self.interval) for (n, lk), a in sorted(shown.samples.items())],
        }

    def prometheus(self) -> str:
        """The Prometheus text exposition (version 0.0.4): gauges, counters (cumulative) and samples as
        summaries (cumulative ``_sum`` and ``_count``), names with ``.`` turned into ``_``."""
        lines: list[str] = []

        def head(name: str, kind: str) -> None:
            lines.append(f"# HELP {name} {name}")
            lines.append(f"# TYPE {name} {kind}")

        for name, value in self._gauge_values():
            pname = prom_name(name)
            head(pname, "gauge")
            lines.append(f"{pname} {_num(value)}")
        for kind, totals in (("counter", self._totals_counters), ("summary", self._totals_samples)):
            last = ""
            for (name, labels), agg in sorted(totals.items()):
                pname = prom_name(name)
                if pname != last:
                    head(pname, kind)
                    last = pname
                if kind == "counter":
                    lines.append(f"{pname}{prom_labels(labels)} {_num(agg.sum)}")
                else:
                    lines.append(f"{pname}_sum{prom_labels(labels)} {_num(agg.sum)}")
                    lines.append(f"{pname}_count{prom_labels(labels)} {agg.count}")
        return "\n".join(lines) + "\n"


def _js(value: float) -> float | int:
    """A float as Go's JSON encoder writes it: integral values without a fraction."""
    return int(value) if value == int(value) and abs(value) < 1e15 else value


def prom_name(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)


def prom_labels(labels: LabelKey) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{prom_name(k)}="{_escape(v)}"' for k, v in labels)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def route_label(pattern: str) -> str:
    """Consul's ``path`` label for an HTTP route: the pattern up to its first parameter, without the
    leading slash, slashes turned into underscores (``/v1/kv/{key:.*}`` -> ``v1_kv_``)."""
    return pattern.split("{", 1)[0].lstrip("/").replace("/", "_")
