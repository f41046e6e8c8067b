"""Endpoint picking: power of two choices over a latency EWMA with an in-flight penalty (pure).

Each endpoint keeps an exponentially weighted moving average of its observed latency, decayed by
the time since the last observation (so an endpoint that was slow long ago recovers), and a count
of calls in flight. A pick draws two distinct endpoints at random and takes the one with the lower
cost ``ewma * (in_flight + 1)`` (the "peak EWMA" idea of Finagle and linkerd2-proxy).

Failures are observed as a penalty latency, and an endpoint that fails ``eject_after`` times in a
row is ejected for ``eject_for`` seconds unless that would leave no endpoint at all, so that a
crashed instance stops receiving calls before Consul's health checks notice it.

No I/O, no clock and no global randomness: callers pass ``now`` and may pass a ``random.Random``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

DEFAULT_DECAY_SECONDS = 2.0  # latency shifts are followed within a few seconds
DEFAULT_INITIAL_LATENCY = 0.001  # 1 ms: a new endpoint is tried soon, not avoided
DEFAULT_FAILURE_PENALTY = 1.0  # a failure counts as a one-second call


@dataclass(slots=True)
class EndpointStats:
    """Mutable statistics of one endpoint, owned by a :class:`Balancer`."""

    ewma: float
    last_update: float
    in_flight: int = 0
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    picks: int = 0

    def cost(self) -> float:
        return self.ewma * (self.in_flight + 1)


@dataclass
class Balancer(Generic[K]):
    """P2C/EWMA picker over a set of endpoint keys (any hashable: an address, an instance id)."""

    decay_seconds: float = DEFAULT_DECAY_SECONDS
    initial_latency: float = DEFAULT_INITIAL_LATENCY
    failure_penalty: float = DEFAULT_FAILURE_PENALTY
    eject_after: int = 3
    eject_for: float = 10.0
    rng: random.Random = field(default_factory=random.Random)
    _stats: dict[K, EndpointStats] = field(default_factory=dict)
    _keys: list[K] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.decay_seconds <= 0:
            raise ValueError("decay_seconds must be positive")
        if self.initial_latency <= 0:
            raise ValueError("initial_latency must be positive")

    @property
    def endpoints(self) -> tuple[K, ...]:
        return tuple(self._keys)

    def stats(self, key: K) -> EndpointStats:
        return self._stats[key]

    def set_endpoints(self, keys: Iterable[K], now: float) -> None:
        """Replace the endpoint set; statistics of endpoints that stay are kept.

        A new endpoint starts at the mean EWMA of the current ones (or ``initial_latency``), so it
        is neither flooded nor starved.
        """
        wanted = list(dict.fromkeys(keys))
        existing = [s.ewma for k, s in self._stats.items() if k in set(wanted)]
        start = (sum(existing) / len(existing)) if existing else self.initial_latency
        stats: dict[K, EndpointStats] = {}
        for key in wanted:
            old = self._stats.get(key)
            stats[key] = old if old is not None else EndpointStats(ewma=start, last_update=now)
        self._stats = stats
        self._keys = wanted

    def _available(self, now: float) -> list[K]:
        live = [k for k in self._keys if self._stats[k].ejected_until <= now]
        return live or list(self._keys)

    def pick(self, now: float) -> K | None:
        """Choose an endpoint for a new call, or None when there is none."""
        candidates = self._available(now)
        if not candidates:
            return None
        if len(candidates) == 1:
            chosen = candidates[0]
        else:
            a, b = self.rng.sample(candidates, 2)
            sa, sb = self._stats[a], self._stats[b]
            chosen = a if self._decayed(sa, now) * (sa.in_flight + 1) <= self._decayed(sb, now) * (sb.in_flight + 1) \
                else b
        self._stats[chosen].picks += 1
        return chosen

    def _decayed(self, s: EndpointStats, now: float) -> float:
        """The EWMA drifts back towards the initial latency while no call is observed."""
        dt = max(0.0, now - s.last_update)
        w = math.exp(-dt / self.decay_seconds)
        return s.ewma * w + self.initial_latency * (1.0 - w) if s.ewma > self.initial_latency else s.ewma

    def start(self, key: K) -> None:
        """A call to ``key`` begins."""
        s = self._stats.get(key)
        if s is not None:
            s.in_flight += 1

    def observe(self, key: K, latency: float, now: float, *, ok: bool = True) -> None:
        """A call to ``key`` ended after ``latency`` seconds; ``ok=False`` for a transport failure."""
        s = self._stats.get(key)
        if s is None:  # the endpoint left the set while the call ran
            return
        if s.in_flight > 0:
            s.in_flight -= 1
        sample = max(latency, 0.0) if ok else max(latency, self.failure_penalty)
        dt = max(0.0, now - s.last_update)
        w = math.exp(-dt / self.decay_seconds)
        # Peak-sensitive: a sample above the average replaces it at once; lower ones blend in.
        s.ewma = sample if sample > s.ewma else s.ewma * w + sample * (1.0 - w)
        s.last_update = now
        if ok:
            s.consecutive_failures = 0
        else:
            s.consecutive_failures += 1
            if s.consecutive_failures >= self.eject_after:
                s.ejected_until = now + self.eject_for
                s.consecutive_failures = 0

    def ejected(self, now: float) -> tuple[K, ...]:
        return tuple(k for k in self._keys if self._stats[k].ejected_until > now)
