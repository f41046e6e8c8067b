"""Load-balancing policies of Consul's service-resolver ``LoadBalancer`` (pure: randomness passed in).

- ``round_robin``: in turn;
- ``random``: uniformly;
- ``least_request``: the fewest calls in flight among ``choice_count`` random endpoints;
- ``ring_hash``: a consistent-hash ring (``MinimumRingSize``..``MaximumRingSize`` points, spread
  evenly over the endpoints), a call goes to the first point at or after its hash;
- ``maglev``: Maglev's lookup table (65537 entries), a call goes to ``table[hash % size]``;
- ``""`` (no policy): the sidecar's default picker (``balance.Balancer``, P2C over latency), not here.

The hash of a call comes from ``HashPolicies`` (``call_hash``): a header, a cookie or a query
parameter value, or the source address; policies are combined in order and a ``Terminal`` one that
found a value ends the list. A call with no value to hash goes to a random endpoint. Endpoint sets
change rarely; rings and tables are rebuilt only when the set changes.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from catalog.chain import HashPolicy

K = TypeVar("K", bound=Hashable)

MAGLEV_TABLE_SIZE = 65537
MAX_RING_SIZE = 1 << 16  # whatever the entry says: bounds memory and rebuild time


def hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        k, sep, v = part.strip().partition("=")
        if sep and k == name:
            return v
    return None


def call_hash(policies: Sequence[HashPolicy], headers: Mapping[str, str], query: Mapping[str, str],
              source: str) -> int | None:
    """The hash of one call under ``policies`` (None when none of them found a value)."""
    parts: list[str] = []
    for p in policies:
        value: str | None = None
        if p.source_ip:
            value = source
        elif p.field == "header":
            value = headers.get(p.field_value.lower())
        elif p.field == "cookie":
            value = _cookie(headers.get("cookie", ""), p.field_value)
        elif p.field == "query_parameter":
            value = query.get(p.field_value)
        if value is not None:
            parts.append(f"{p.field}:{p.field_value}={value}")
            if p.terminal:
                break
    if not parts:
        return None
    return hash64("\x00".join(parts).encode())


@dataclass
class Picker(Generic[K]):
    """One upstream target's policy picker; ``pick`` gets the endpoints available right now."""

    policy: str
    rng: random.Random = field(default_factory=random.Random)
    choice_count: int = 2
    min_ring_size: int = 1024
    max_ring_size: int = 8192
    _rr: int = 0
    _in_flight: dict[K, int] = field(default_factory=dict)
    _ring_keys: tuple[K, ...] = ()
    _ring: list[tuple[int, int]] = field(default_factory=list)  # (point, endpoint index)
    _ring_points: list[int] = field(default_factory=list)
    _table_keys: tuple[K, ...] = ()
    _table: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.policy not in ("round_robin", "random", "least_request", "ring_hash", "maglev"):
            raise ValueError(f"unknown load balancing policy {self.policy!r}")

    @property
    def hash_based(self) -> bool:
        return self.policy in ("ring_hash", "maglev")

    def start(self, key: K) -> None:
        self._in_flight[key] = self._in_flight.get(key, 0) + 1

    def finish(self, key: K) -> None:
        n = self._in_flight.get(key, 0) - 1
        if n > 0:
            self._in_flight[key] = n
        else:
            self._in_flight.pop(key, None)

    def pick(self, endpoints: Sequence[K], call_hash: int | None = None) -> K | None:
        if not endpoints:
            return None
        if len(endpoints) == 1:
            return endpoints[0]
        if self.policy == "round_robin":
            self._rr = (self._rr + 1) % (1 << 30)
            return endpoints[self._rr % len(endpoints)]
        if self.policy == "least_request":
            k = min(self.choice_count, len(endpoints))
            sample = self.rng.sample(list(endpoints), k)
            return min(sample, key=lambda e: self._in_flight.get(e, 0))
        if self.policy in ("ring_hash", "maglev") and call_hash is not None:
            return self._ring_pick(endpoints, call_hash) if self.policy == "ring_hash" \
                else self._maglev_pick(endpoints, call_hash)
        return endpoints[self.rng.randrange(len(endpoints))]

    # ----- ring hash -----
    def _ring_pick(self, endpoints: Sequence[K], h: int) -> K:
        keys = tuple(endpoints)
        if keys != self._ring_keys:
            self._build_ring(keys)
        i = bisect.bisect_left(self._ring_points, h)
        if i == len(self._ring_points):
            i = 0
        return keys[self._ring[i][1]]

    def _build_ring(self, keys: tuple[K, ...]) -> None:
        size = max(self.min_ring_size, len(keys))
        size = min(size, self.max_ring_size, MAX_RING_SIZE)
        per = max(1, size // len(keys))
        ring = [(hash64(f"{key!r}_{j}".encode()), i) for i, key in enumerate(keys) for j in range(per)]
        ring.sort()
        self._ring, self._ring_points, self._ring_keys = ring, [p for p, _ in ring], keys

    # ----- maglev -----
    def _maglev_pick(self, endpoints: Sequence[K], h: int) -> K:
        keys = tuple(endpoints)
        if keys != self._table_keys:
            self._build_table(keys)
        return keys[self._table[h % MAGLEV_TABLE_SIZE]]

    def _build_table(self, keys: tuple[K, ...]) -> None:
        m = MAGLEV_TABLE_SIZE
        offsets, skips = [], []
        for key in keys:
            offsets.append(hash64(f"o:{key!r}".encode()) % m)
            skips.append(hash64(f"s:{key!r}".encode()) % (m - 1) + 1)
        nxt = [0] * len(keys)
        table = [-1] * m
        filled = 0
        while True:
            for i in range(len(keys)):
                c = (offsets[i] + nxt[i] * skips[i]) % m
                while table[c] >= 0:
                    nxt[i] += 1
                    c = (offsets[i] + nxt[i] * skips[i]) % m
                table[c] = i
                nxt[i] += 1
                filled += 1
                if filled == m:
                    self._table, self._table_keys = table, keys
                    return
