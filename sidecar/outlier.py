"""Passive health checking: outlier ejection as Envoy does it for Consul's ``PassiveHealthCheck`` (pure).

An endpoint that fails ``max_failures`` calls in a row (HTTP 5xx, gRPC UNAVAILABLE, or a connection
that could not be made) is ejected, with probability ``enforcing_percent`` %, for
``base_ejection_time * n`` where ``n`` counts its ejections (so a repeat offender stays out longer,
capped at ``MAX_EJECTION_TIME``); ``n`` drops by one each ``interval`` it spends back in without
being ejected. No more than ``max_ejection_percent`` % of the endpoints are out at once, but at
least one may be (Envoy's rule). ``available`` never returns an empty set while endpoints exist:
if all are ejected the caller gets all (better a weak endpoint than none).
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from catalog.models import parse_duration

K = TypeVar("K", bound=Hashable)

MAX_EJECTION_TIME = 300.0
GRPC_UNAVAILABLE = 14


class PassiveHealthCheckError(ValueError):
    """A PassiveHealthCheck block that cannot be used; the message names the field."""


@dataclass(frozen=True)
class PassiveHealthCheck:
    interval: float = 10.0
    max_failures: int = 5
    enforcing_percent: int = 100
    max_ejection_percent: int = 10
    base_ejection_time: float = 30.0


def parse_passive_health_check(raw: Any, where: str = "PassiveHealthCheck") -> PassiveHealthCheck | None:
    """Consul's service-defaults ``UpstreamConfig.*.PassiveHealthCheck`` (None when absent); Envoy's
    defaults fill what is unset (0 for MaxFailures and Interval means unset, as in Consul)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise PassiveHealthCheckError(f"{where}: expected an object")

    def whole(name: str, default: int, maximum: int) -> int:
        v = raw.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= maximum:
            raise PassiveHealthCheckError(f"{where}.{name}: expected a whole number from 0 to {maximum}, got {v!r}")
        return v

    def seconds(name: str, default: float) -> float:
        v = raw.get(name)
        if v is None:
            return default
        try:
            s = parse_duration(v, f"{where}.{name}") if isinstance(v, str) else float(v) / 1e9
        except (ValueError, TypeError) as exc:
            raise PassiveHealthCheckError(str(exc)) from None
        if s < 0:
            raise PassiveHealthCheckError(f"{where}.{name}: must not be negative")
        return s or default

    return PassiveHealthCheck(interval=seconds("Interval", 10.0), max_failures=whole("MaxFailures", 0, 1_000_000) or 5,
                              enforcing_percent=whole("EnforcingConsecutive5xx", 100, 100),
                              max_ejection_percent=whole("MaxEjectionPercent", 10, 100),
                              base_ejection_time=seconds("BaseEjectionTime", 30.0))


def is_failure(*, http_status: int = 0, grpc_status: int = -1, connect_failure: bool = False) -> bool:
    """What counts against an endpoint: 5xx, gRPC UNAVAILABLE, or no connection."""
    return connect_failure or http_status >= 500 or grpc_status == GRPC_UNAVAILABLE


@dataclass(slots=True)
class _State:
    consecutive: int = 0
    ejections: int = 0  # the multiplier of base_ejection_time
    ejected_until: float = 0.0
    back_since: float = 0.0


@dataclass
class OutlierDetector(Generic[K]):
    config: PassiveHealthCheck
    rng: random.Random = field(default_factory=random.Random)
    _states: dict[K, _State] = field(default_factory=dict)
    ejections_total: int = 0
    _until: float = 0.0  # when the last ejection in force ends (nothing is ejected from then on)

    def set_endpoints(self, keys: Iterable[K]) -> None:
        wanted = list(dict.fromkeys(keys))
        self._states = {k: self._states.get(k) or _State() for k in wanted}

    def _ejected_count(self, now: float) -> int:
        return sum(1 for s in self._states.values() if s.ejected_until > now)

    def _decay(self, s: _State, now: float) -> None:
        """Each interval spent back in (not ejected) forgives one past ejection."""
        if s.ejections and s.ejected_until <= now and self.config.interval > 0:
            start = max(s.back_since, s.ejected_until)
            steps = int((now - start) // self.config.interval)
            if steps > 0:
                s.ejections = max(0, s.ejections - steps)
                s.back_since = start + steps * self.config.interval

    def observe(self, key: K, failed: bool, now: float) -> bool:
        """One call to ``key`` ended; True when this made ``key`` ejected."""
        s = self._states.get(key)
        if s is None:
            return False
        self._decay(s, now)
        if not failed:
            s.consecutive = 0
            return False
        s.consecutive += 1
        if s.consecutive < self.config.max_failures or s.ejected_until > now:
            return False
        s.consecutive = 0
        total = len(self._states)
        out = self._ejected_count(now)
        if out >= 1 and (out + 1) * 100 > self.config.max_ejection_percent * total:
            return False
        if self.rng.random() * 100 >= self.config.enforcing_percent:
            return False
        s.ejections += 1
        s.ejected_until = now + min(MAX_EJECTION_TIME, self.config.base_ejection_time * s.ejections)
        self._until = max(self._until, s.ejected_until)
        s.back_since = s.ejected_until
        self.ejections_total += 1
        return True

    def none_ejected(self, now: float) -> bool:
        """True when no endpoint is ejected (the common case: one comparison)."""
        return now >= self._until

    def is_ejected(self, key: K, now: float) -> bool:
        s = self._states.get(key)
        return s is not None and s.ejected_until > now

    def available(self, keys: Iterable[K], now: float) -> list[K]:
        """``keys`` without the ejected ones (all of them when every one is ejected)."""
        ks = list(keys)
        live = [k for k in ks if not self.is_ejected(k, now)]
        return live or ks

    def ejected(self, now: float) -> dict[K, float]:
        """Ejected endpoints -> seconds until they return."""
        return {k: s.ejected_until - now for k, s in self._states.items() if s.ejected_until > now}
