"""Rate limits at a destination's inbound (pure: callers pass ``now``).

Two sources, both token buckets (``RequestsPerSecond`` refill, ``RequestsMaxBurst`` capacity):

- per caller, beyond Consul: the KV document ``weft/ratelimits/<destination>``::

      {"PerCaller": {"RequestsPerSecond": 50, "RequestsMaxBurst": 100},
       "Callers": {"web": {"RequestsPerSecond": 5, "RequestsMaxBurst": 10}}}

  ``Callers`` names a caller service (its SPIFFE identity's service) and wins over ``PerCaller``,
  the limit every other caller gets, each its own bucket. Both are optional; a burst defaults to
  the rate rounded up (at least 1). ``parse_document`` refuses anything else with a message naming
  the field.
- per instance, Consul's service-defaults ``RateLimits.InstanceLevel``: ``RequestsPerSecond``,
  ``RequestsMaxBurst`` and ``Routes`` (each ``PathExact``/``PathPrefix``/``PathRegex`` with its own
  rate and burst; the first matching route's bucket replaces the instance bucket for that call).

``RateLimiter.check(caller, path, now)`` takes a token from the caller's bucket and the instance's
(or route's); when either is empty the call is refused with ``retry_after`` seconds, the time until
that bucket has a token again.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KV_PREFIX = "weft/ratelimits/"
MAX_CALLERS = 10_000  # named callers in one document
MAX_BUCKETS = 10_000  # live per-caller buckets (least recently used ones go)
MAX_RATE = 1e9


class RateLimitError(ValueError):
    """A rate-limit document or service-defaults block that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Limit:
    rate: float  # tokens per second
    burst: float

    def as_json(self) -> dict[str, float]:
        return {"RequestsPerSecond": self.rate, "RequestsMaxBurst": self.burst}


@dataclass(frozen=True)
class CallerLimits:
    per_caller: Limit | None = None
    callers: Mapping[str, Limit] = field(default_factory=dict)

    def for_caller(self, caller: str) -> Limit | None:
        return self.callers.get(caller, self.per_caller)


@dataclass(frozen=True)
class RouteLimit:
    limit: Limit
    path_exact: str = ""
    path_prefix: str = ""
    path_regex: re.Pattern[str] | None = None

    def matches(self, path: str) -> bool:
        if self.path_exact:
            return path == self.path_exact
        if self.path_prefix:
            return path.startswith(self.path_prefix)
        if self.path_regex is not None:
            return self.path_regex.fullmatch(path) is not None
        return False


@dataclass(frozen=True)
class InstanceLimits:
    limit: Limit | None = None
    routes: tuple[RouteLimit, ...] = ()


def _limit(obj: Any, what: str) -> Limit:
    if not isinstance(obj, Mapping):
        raise RateLimitError(f"{what}: expected an object with RequestsPerSecond and RequestsMaxBurst")
    unknown = sorted(set(obj) - {"RequestsPerSecond", "RequestsMaxBurst"})
    if unknown:
        raise RateLimitError(f"{what}.{unknown[0]}: unknown field (expected RequestsPerSecond, RequestsMaxBurst)")
    rate = obj.get("RequestsPerSecond")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= MAX_RATE:
        raise RateLimitError(f"{what}.RequestsPerSecond: expected a number > 0, got {rate!r}")
    burst = obj.get("RequestsMaxBurst")
    if burst is None:
        burst = max(1, math.ceil(rate))
    if isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= MAX_RATE:
        raise RateLimitError(f"{what}.RequestsMaxBurst: expected a whole number >= 1, got {burst!r}")
    return Limit(float(rate), float(burst))


def parse_document(raw: str | bytes | Any, where: str = "document") -> CallerLimits:
    """The KV document (text or decoded JSON) -> CallerLimits; RateLimitError naming the field when bad."""
    doc = raw
    if isinstance(raw, (str, bytes)):
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RateLimitError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(doc, Mapping):
        raise RateLimitError(f"{where}: expected a JSON object with PerCaller and/or Callers")
    unknown = sorted(set(doc) - {"PerCaller", "Callers"})
    if unknown:
        raise RateLimitError(f"{where}.{unknown[0]}: unknown field (expected PerCaller, Callers)")
    if "PerCaller" not in doc and "Callers" not in doc:
        raise RateLimitError(f"{where}: neither PerCaller nor Callers is set")
    per = _limit(doc["PerCaller"], f"{where}.PerCaller") if doc.get("PerCaller") is not None else None
    callers_raw = doc.get("Callers")
    callers_raw = {} if callers_raw is None else callers_raw
    if not isinstance(callers_raw, Mapping):
        raise RateLimitError(f"{where}.Callers: expected an object of caller service name -> limit")
    if len(callers_raw) > MAX_CALLERS:
        raise RateLimitError(f"{where}.Callers: more than {MAX_CALLERS} callers")
    callers: dict[str, Limit] = {}
    for name, value in callers_raw.items():
        if not isinstance(name, str) or not name or len(name) > 256:
            raise RateLimitError(f"{where}.Callers: caller names must be service names, got {name!r}")
        callers[name] = _limit(value, f"{where}.Callers[{name!r}]")
    return CallerLimits(per, callers)


def parse_instance_level(rate_limits: Any, where: str = "RateLimits") -> InstanceLimits:
    """service-defaults ``RateLimits`` -> InstanceLimits (empty when absent)."""
    if rate_limits is None:
        return InstanceLimits()
    if not isinstance(rate_limits, Mapping):
        raise RateLimitError(f"{where}: expected an object")
    inst = rate_limits.get("InstanceLevel")
    if inst is None:
        return InstanceLimits()
    what = f"{where}.InstanceLevel"
    if not isinstance(inst, Mapping):
        raise RateLimitError(f"{what}: expected an object")
    limit = None
    if inst.get("RequestsPerSecond"):
        limit = _limit({k: inst[k] for k in ("RequestsPerSecond", "RequestsMaxBurst") if k in inst}, what)
    routes = []
    raw_routes = inst.get("Routes") or []
    if not isinstance(raw_routes, list):
        raise RateLimitError(f"{what}.Routes: expected a list")
    for i, r in enumerate(raw_routes):
        rw = f"{what}.Routes[{i}]"
        if not isinstance(r, Mapping):
            raise RateLimitError(f"{rw}: expected an object")
        paths: dict[str, str] = {}
        for k in ("PathExact", "PathPrefix", "PathRegex"):
            v = r.get(k)
            if v:
                if not isinstance(v, str):
                    raise RateLimitError(f"{rw}.{k}: expected a string")
                paths[k] = v
        if len(paths) != 1:
            raise RateLimitError(f"{rw}: exactly one of PathExact, PathPrefix, PathRegex is required")
        regex = None
        if "PathRegex" in paths:
            try:
                regex = re.compile(paths["PathRegex"])
            except re.error as exc:
                raise RateLimitError(f"{rw}.PathRegex: not a valid regular expression: {exc}") from None
        lim = _limit({k: r[k] for k in ("RequestsPerSecond", "RequestsMaxBurst") if k in r}, rw)
        routes.append(RouteLimit(lim, path_exact=str(paths.get("PathExact", "")),
                                 path_prefix=str(paths.get("PathPrefix", "")), path_regex=regex))
    return InstanceLimits(limit, tuple(routes))


@dataclass
class TokenBucket:
    limit: Limit
    tokens: float
    updated: float

    @classmethod
    def full(cls, limit: Limit, now: float) -> TokenBucket:
        return cls(limit, limit.burst, now)

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.limit.burst, self.tokens + (now - self.updated) * self.limit.rate)
            self.updated = now

    def available(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= 1

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1

    def wait_time(self, now: float) -> float:
        """Seconds until a token is there (0 when one is)."""
        self._refill(now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.limit.rate


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: float = 0.0
    source: str = ""  # caller | instance | route (what refused)


ALLOW = Verdict(True)


class RateLimiter:
    """The buckets of one destination instance; ``update`` swaps limits and keeps the buckets it can."""

    def __init__(self, callers: CallerLimits | None = None, instance: InstanceLimits | None = None) -> None:
        self.callers = callers or CallerLimits()
        self.instance = instance or InstanceLimits()
        self._caller_buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._instance_bucket: TokenBucket | None = None
        self._route_buckets: dict[int, TokenBucket] = {}

    def update(self, callers: CallerLimits | None = None, instance: InstanceLimits | None = None) -> None:
        if callers is not None and callers != self.callers:
            self.callers = callers
            self._caller_buckets.clear()
        if instance is not None and instance != self.instance:
            self.instance = instance
            self._instance_bucket = None
            self._route_buckets.clear()

    @property
    def active(self) -> bool:
        return bool(self.callers.per_caller or self.callers.callers or self.instance.limit or self.instance.routes)

    def applies_to(self, caller: str) -> bool:
        """Whether calls of ``caller`` need the per-call path (a limit may refuse them)."""
        return bool(self.instance.limit or self.instance.routes) or self.callers.for_caller(caller) is not None

    def _caller_bucket(self, caller: str, limit: Limit, now: float) -> TokenBucket:
        b = self._caller_buckets.get(caller)
        if b is None or b.limit != limit:
            b = TokenBucket.full(limit, now)
            self._caller_buckets[caller] = b
            if len(self._caller_buckets) > MAX_BUCKETS:
                self._caller_buckets.popitem(last=False)
        else:
            self._caller_buckets.move_to_end(caller)
        return b

    def _instance(self, path: str, now: float) -> tuple[TokenBucket | None, str]:
        for i, r in enumerate(self.instance.routes):
            if r.matches(path):
                b = self._route_buckets.get(i)
                if b is None:
                    b = self._route_buckets[i] = TokenBucket.full(r.limit, now)
                return b, "route"
        if self.instance.limit is None:
            return None, ""
        if self._instance_bucket is None:
            self._instance_bucket = TokenBucket.full(self.instance.limit, now)
        return self._instance_bucket, "instance"

    def check(self, caller: str, path: str, now: float) -> Verdict:
        """Take a token for one call of ``caller`` to ``path``, or refuse it (nothing is taken then).

        Per call: one refill per bucket that applies (no list of buckets, no second refill), the
        instance's route table only when it has routes."""
        limit = self.callers.for_caller(caller)
        caller_bucket = self._caller_bucket(caller, limit, now) if limit is not None else None
        inst: TokenBucket | None = None
        source = ""
        if self.instance.routes or self.instance.limit is not None:
            inst, source = self._instance(path.partition("?")[0], now)
        if caller_bucket is not None:
            caller_bucket._refill(now)
            if caller_bucket.tokens < 1:
                return Verdict(False, retry_after=caller_bucket.wait_time(now), source="caller")
        if inst is not None:
            inst._refill(now)
            if inst.tokens < 1:
                return Verdict(False, retry_after=inst.wait_time(now), source=source)
        if caller_bucket is not None:
            caller_bucket.tokens -= 1
        if inst is not None:
            inst.tokens -= 1
        return ALLOW


def retry_after_header(seconds: float) -> str:
    """``retry-after`` in whole seconds, at least 1 (HTTP allows no fractions)."""
    return str(max(1, math.ceil(seconds)))
