"""`weft top`: live golden metrics per edge (source -> destination), like `linkerd viz top`.

Every `-interval` seconds it scrapes `/metrics` on the admin port of every sidecar it finds in
Consul (connect-proxy instances; the admin address comes from the registration's Meta, see
`admin_url`, or from a running `weft dev`'s state file) or of the `-target` URLs given, and shows
per edge: requests per second, success rate, p50 and p99 latency. Rates and quantiles come from the
*differences* between two scrapes of the `weft_requests_total` counters and
`weft_request_duration_seconds` histogram buckets, so they describe the last interval, not the
process's lifetime. Edges are measured on the caller's side (`direction="outbound"`, which sees
every call); an edge seen only inbound is shown from the callee's side. Success: gRPC status OK,
HTTP status below 500, a TCP connection that closed normally.

`-once` takes two scrapes `-interval` apart, prints one table (or `-json`) and exits.

The parsing and arithmetic below are pure (text in, numbers out) and unit-tested; only
`discover_targets` and `scrape` do I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devmesh.state import ConsulChoice, admin_urls, consul_for_cli

# ---------------------------------------------------------------------------------------------------
# Pure: parsing

REQUESTS = "weft_requests_total"
DURATION = "weft_request_duration_seconds"
LABELS = ("direction", "source", "destination", "method", "status")

SeriesKey = tuple[str, str, str, str, str]  # direction, source, destination, method, status


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


def parse_metrics(text: str) -> list[Sample]:
    """Prometheus text exposition -> samples. Raises ValueError on text that is not the format."""
    from prometheus_client.parser import text_string_to_metric_families

    out: list[Sample] = []
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out.append(Sample(s.name, dict(s.labels), float(s.value)))
    except Exception as exc:  # the parser raises ValueError, IndexError, ... on malformed text
        raise ValueError(f"not Prometheus text format: {exc}") from None
    return out


@dataclass(frozen=True)
class Scrape:
    """The request counters and latency buckets of one target at one moment."""

    target: str
    at: float
    counts: Mapping[SeriesKey, float]
    buckets: Mapping[tuple[SeriesKey, float], float]  # cumulative counts per upper bound
    gauges: Mapping[str, list[Sample]] = field(default_factory=dict)


def _le(raw: str) -> float:
    return math.inf if raw in ("+Inf", "Inf", "inf") else float(raw)


def scrape_from_samples(target: str, at: float, samples: Iterable[Sample]) -> Scrape:
    counts: dict[SeriesKey, float] = {}
    buckets: dict[tuple[SeriesKey, float], float] = {}
    gauges: dict[str, list[Sample]] = {}
    for s in samples:
        if s.name == REQUESTS:
            counts[_key(s.labels)] = s.value
        elif s.name == DURATION + "_bucket" and "le" in s.labels:
            buckets[(_key(s.labels), _le(s.labels["le"]))] = s.value
        elif s.name.startswith("weft_") and not s.name.startswith(DURATION):
            gauges.setdefault(s.name, []).append(s)
    return Scrape(target, at, counts, buckets, gauges)


def scrape_from_text(target: str, at: float, text: str) -> Scrape:
    return scrape_from_samples(target, at, parse_metrics(text))


def _key(labels: Mapping[str, str]) -> SeriesKey:
    return (labels.get("direction", ""), labels.get("source", ""), labels.get("destination", ""),
            labels.get("method", ""), labels.get("status", ""))


# ---------------------------------------------------------------------------------------------------
# Pure: arithmetic


def counter_delta(prev: float | None, cur: float) -> float:
    """Increase of a counter between scrapes; a decrease means the process restarted (count from 0)."""
    if prev is None:
        return cur
    return cur - prev if cur >= prev else cur


def is_success(method: str, status: str) -> bool:
    if status.isdigit():  # HTTP
        return int(status) < 500
    if method == "tcp":
        return status in ("closed", "ok", "OK")
    return status == "OK"  # gRPC status name


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus's histogram_quantile over cumulative (upper bound, count) buckets; None without data.

    Linear interpolation inside the bucket that holds the rank; the lowest bucket starts at 0; a rank
    in the +Inf bucket answers the highest finite bound."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within [0, 1], got {q}")
    ordered = sorted(buckets)
    if not ordered or ordered[-1][0] != math.inf:
        return None
    total = ordered[-1][1]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank and count > prev_count:
            if bound == math.inf:
                return prev_bound
            if prev_bound == 0.0 and bound <= 0:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        if bound != math.inf:
            prev_bound = bound
        prev_count = count
    return prev_bound


@dataclass(frozen=True)
class EdgeStats:
    source: str
    destination: str
    side: str  # "outbound" (caller's sidecar) or "inbound"
    requests: float  # in the interval
    rps: float
    success_rate: float | None  # None without requests
    p50: float | None  # seconds
    p99: float | None
    methods: tuple[str, ...] = ()
    method: str = ""  # set when split by method


EdgeKey = tuple[str, str, str, str]  # direction, source, destination, method ("" unless split by method)


def edge_stats(prev: Sequence[Scrape], cur: Sequence[Scrape], *, by_method: bool = False) -> list[EdgeStats]:
    """Per-edge golden metrics over the interval between two rounds of scrapes (matched by target),
    or per edge and method with `by_method`.

    Targets scraped only once (new sidecars) contribute nothing yet; series new in the second scrape
    count from zero."""
    before = {s.target: s for s in prev}
    reqs: dict[EdgeKey, float] = {}
    ok: dict[EdgeKey, float] = {}
    hist: dict[EdgeKey, dict[float, float]] = {}
    methods: dict[EdgeKey, set[str]] = {}
    spans: dict[EdgeKey, float] = {}
    for now in cur:
        old = before.get(now.target)
        if old is None or now.at <= old.at:
            continue
        restarted = any(v < old.counts.get(k, 0.0) for k, v in now.counts.items())
        for key, value in now.counts.items():
            direction, source, destination, method, status = key
            d = counter_delta(None if restarted else old.counts.get(key), value)
            edge = (direction, source, destination, method if by_method else "")
            spans[edge] = max(spans.get(edge, 0.0), now.at - old.at)
            reqs[edge] = reqs.get(edge, 0.0) + d
            if is_success(method, status):
                ok[edge] = ok.get(edge, 0.0) + d
            if d > 0:
                methods.setdefault(edge, set()).add(method)
        for (key, le), value in now.buckets.items():
            d = counter_delta(None if restarted else old.buckets.get((key, le)), value)
            edge = (key[0], key[1], key[2], key[3] if by_method else "")
            per = hist.setdefault(edge, {})
            per[le] = per.get(le, 0.0) + d
    out: list[EdgeStats] = []
    outbound_pairs = {(s, d, m) for (direction, s, d, m) in reqs if direction == "outbound"}
    for edge, n in reqs.items():
        direction, source, destination, method = edge
        if direction != "outbound" and (source, destination, method) in outbound_pairs:
            continue  # the caller's side already measured this edge
        if by_method and n == 0:
            continue  # a method without calls in this interval is noise; an edge without calls is news
        buckets = sorted(hist.get(edge, {}).items())
        span = spans.get(edge, 0.0)
        out.append(EdgeStats(
            source=source, destination=destination, side=direction, requests=n,
            rps=n / span if span > 0 else 0.0,
            success_rate=(ok.get(edge, 0.0) / n) if n > 0 else None,
            p50=histogram_quantile(0.5, buckets) if n > 0 else None,
            p99=histogram_quantile(0.99, buckets) if n > 0 else None,
            methods=tuple(sorted(methods.get(edge, ()))), method=method,
        ))
    out.sort(key=lambda e: (-e.rps, e.source, e.destination, e.method))
    return out


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}ms"


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.2f}%"


def render_table(stats: Sequence[EdgeStats], *, interval: float, targets: int, errors: Sequence[str] = ()) -> str:
    """The table `weft top` prints."""
    split = any(s.method for s in stats)
    head: tuple[str, ...] = ("SOURCE", "DESTINATION", *(("METHOD",) if split else ()), "RPS", "SUCCESS", "P50",
                             "P99", "REQUESTS")
    rows = [(s.source or "-", s.destination or "-", *((s.method or "-",) if split else ()), f"{s.rps:.2f}",
             _pct(s.success_rate), _ms(s.p50), _ms(s.p99),
             f"{s.requests:.0f}" + ("" if s.side == "outbound" else " (inbound)")) for s in stats]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [f"weft top: {targets} sidecar(s), last {interval:.1f}s"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip())
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if not rows:
        lines.append("(no requests in this interval)")
    lines += [f"! {e}" for e in errors]
    return "\n".join(lines) + "\n"


def stats_json(stats: Sequence[EdgeStats]) -> list[dict[str, Any]]:
    return [{"source": s.source, "destination": s.destination, "method": s.method, "side": s.side,
             "requests": s.requests,
             "rps": s.rps, "success_rate": s.success_rate, "p50_ms": None if s.p50 is None else s.p50 * 1000,
             "p99_ms": None if s.p99 is None else s.p99 * 1000, "methods": list(s.methods)} for s in stats]


# ---------------------------------------------------------------------------------------------------
# Finding the sidecars' admin ports

ADMIN_META_KEYS = ("weft-admin-addr", "weft_admin_addr", "weft-admin-port", "weft_admin_port", "admin_port")


def admin_url(address: str, meta: Mapping[str, str]) -> str | None:
    """The admin base URL a sidecar registration publishes in its Meta (None when it publishes none).

    Accepts a full URL, a host:port, or a bare port (then on the registration's address)."""
    for key in ADMIN_META_KEYS:
        raw = (meta.get(key) or "").strip()
        if not raw:
            continue
        if raw.startswith(("http://", "https://")):
            return raw.rstrip("/")
        if raw.isdigit():
            host = address or "127.0.0.1"
            host = f"[{host}]" if ":" in host else host
            return f"http://{host}:{raw}"
        return f"http://{raw}"
    return None


def dev_admin_urls(state_dir: str | Path = ".weft-dev") -> dict[str, str]:
    """Admin URLs by service name that a `weft dev` recorded in its state file (empty if none).

    A fallback for sidecars whose registrations publish no admin address."""
    from devmesh.state import read_state

    state = read_state(Path(state_dir))
    return dict(state.admin) if state is not None else {}


@dataclass(frozen=True)
class SidecarTarget:
    service: str  # the service the sidecar fronts
    sidecar_id: str
    url: str  # admin base URL


async def discover_targets(fallback: Mapping[str, str] | None = None,
                           env: Mapping[str, str] | None = None) -> tuple[list[SidecarTarget], list[str]]:
    """Every connect-proxy instance in the catalog with its admin address: from its registration's Meta,
    else from `fallback` (service name -> admin URL); and the problems met. `env`: where Consul is
    (default: this process's environment)."""
    from catalog.client import ConsulClient

    fallback = fallback or {}
    targets: list[SidecarTarget] = []
    problems: list[str] = []
    async with ConsulClient.from_env(env) as consul:
        _, services = await consul.catalog_services()
        for name in sorted(services):
            if not name.endswith("-sidecar-proxy"):
                continue
            _, instances = await consul.health_service(name, passing=False)
            for inst in instances:
                dest = inst.proxy.destination_service_name if inst.proxy is not None else ""
                url = admin_url(inst.address or inst.node_address, dict(inst.meta)) or fallback.get(
                    dest or name.removesuffix("-sidecar-proxy"))
                if url is None:
                    problems.append(f"{inst.service_id}: publishes no admin address in its Meta "
                                    f"({ADMIN_META_KEYS[0]})")
                    continue
                targets.append(SidecarTarget(service=dest or name.removesuffix("-sidecar-proxy"),
                                             sidecar_id=inst.service_id, url=url))
    return targets, problems


async def scrape(session: Any, target: str, timeout: float = 3.0) -> Scrape:
    """GET <target>/metrics -> Scrape (raises on connection errors and non-200)."""
    import aiohttp

    async with session.get(target.rstrip("/") + "/metrics", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        if resp.status != 200:
            raise ValueError(f"{target}/metrics answered {resp.status}")
        text = await resp.text()
    return scrape_from_text(target, time.monotonic(), text)


async def scrape_all(session: Any, targets: Sequence[str]) -> tuple[list[Scrape], list[str]]:
    results = await asyncio.gather(*(scrape(session, t) for t in targets), return_exceptions=True)
    ok: list[Scrape] = []
    errors: list[str] = []
    for target, result in zip(targets, results, strict=True):
        if isinstance(result, BaseException):
            errors.append(f"{target}: {type(result).__name__}: {result}")
        else:
            ok.append(result)
    return ok, errors


# ---------------------------------------------------------------------------------------------------
# The command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-interval", "--interval", type=float, default=2.0, help="seconds between scrapes")
    parser.add_argument("-target", "--target", action="append", default=[], metavar="URL",
                        help="a sidecar admin URL to scrape (repeatable); default: every sidecar found in Consul")
    parser.add_argument("-state-dir", "--state-dir", default=None,
                        help="a running `weft dev`'s state dir (its agent when CONSUL_HTTP_ADDR is unset; admin URLs "
                             "of sidecars that publish none); default: .weft-dev here or in a parent directory, "
                             "else the last weft dev started ($XDG_RUNTIME_DIR/weft-dev.json)")
    parser.add_argument("-methods", "--methods", action="store_true",
                        help="one row per edge and method (gRPC method, HTTP route) instead of per edge")
    parser.add_argument("-once", "--once", action="store_true", help="print one snapshot (two scrapes) and exit")
    parser.add_argument("-json", "--json", action="store_true", help="with -once: print JSON instead of a table")


async def _targets(args: argparse.Namespace, consul: ConsulChoice) -> tuple[list[str], list[str]]:
    if args.target:
        return [t.rstrip("/") for t in args.target], []
    found, problems = await discover_targets(admin_urls(consul), consul.env)
    return [t.url for t in found], problems


async def _main(args: argparse.Namespace, stop: asyncio.Event, consul: ConsulChoice) -> int:
    import aiohttp

    from catalog.client import ConsulError

    try:
        targets, problems = await _targets(args, consul)
    except ConsulError as exc:
        print(f"weft top: {exc}", file=sys.stderr)
        return 1
    if not targets:
        print("weft top: no sidecars to scrape (none in Consul publish an admin address; use -target URL)",
              file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    async with aiohttp.ClientSession() as session:
        prev, errors = await scrape_all(session, targets)
        while True:
            try:
                await asyncio.wait_for(stop.wait(), timeout=args.interval)
                return 0
            except TimeoutError:
                pass
            if not args.target:  # sidecars come and go
                try:
                    targets, problems = await _targets(args, consul)
                except ConsulError as exc:
                    problems = [f"Consul: {exc} (using the last list of sidecars)"]
            cur, errors = await scrape_all(session, targets)
            stats = edge_stats(prev, cur, by_method=args.methods)
            if args.once:
                if args.json:
                    print(json.dumps({"interval": args.interval, "targets": targets, "errors": errors + problems,
                                      "edges": stats_json(stats)}, indent=2))
                else:
                    sys.stdout.write(render_table(stats, interval=args.interval, targets=len(targets),
                                                  errors=errors + problems))
                return 0 if cur else 1
            sys.stdout.write("\x1b[H\x1b[2J" + render_table(stats, interval=args.interval, targets=len(targets),
                                                            errors=errors + problems)
                             + "\n(Ctrl-C to quit)\n")
            sys.stdout.flush()
            prev = cur


def run(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        print("weft top: -interval must be positive", file=sys.stderr)
        return 2
    from weft import runner

    consul = consul_for_cli("weft top", args.state_dir, quiet=bool(args.target))
    return runner.run(lambda stop: _main(args, stop, consul))
