"""``?cached``: the ``X-Cache``/``Age`` headers of Consul's agent cache, for the endpoints Consul serves
from it (catalog services and service nodes, health service/connect/ingress).

The dev agent is its own server, so every answer is fresh; what ``?cached`` changes is what Consul
reports about its cache. Those endpoints use background-refresh cache types, whose entries Consul
keeps current with a blocking query: the first request of a query is a ``MISS``; a later one is a
``HIT`` with ``Age: 0`` when the cached value already satisfied it (no blocking wait for newer data),
else a ``MISS``. The queries seen are remembered per agent, bounded.
"""

from __future__ import annotations

import weakref
from typing import Any

from devagent.http import Req

MAX_KEYS = 10_000
_IGNORED = frozenset({"index", "wait", "cached", "stale", "consistent", "max_stale", "hash"})
_SEEN: weakref.WeakKeyDictionary[Any, set[tuple[Any, ...]]] = weakref.WeakKeyDictionary()


def _key(r: Req) -> tuple[Any, ...]:
    return (r.raw.path, tuple(sorted((k, v) for k, v in r.query.items() if k not in _IGNORED)), r.token)


class CacheProbe:
    """Taken when a ``?cached`` request arrives; ``headers(result_index)`` after it is answered."""

    def __init__(self, r: Req) -> None:
        self.active = r.has("cached")
        self._agent = r.agent
        self._key = _key(r) if self.active else ()
        self._index_at_start = r.agent.store.index
        index = r.query.get("index", "0")
        self._min_index = int(index) if index.isdigit() else 0

    def headers(self, result_index: int) -> dict[str, str]:
        if not self.active:
            return {}
        seen = _SEEN.get(self._agent)
        if seen is None:
            seen = _SEEN[self._agent] = set()
        # the answer's data existed when the request came: no wait for newer data was needed
        satisfied = self._min_index == 0 or self._index_at_start >= result_index > self._min_index
        hit = self._key in seen and satisfied
        if len(seen) >= MAX_KEYS:
            seen.clear()
        seen.add(self._key)
        return {"X-Cache": "HIT", "Age": "0"} if hit else {"X-Cache": "MISS"}
