"""Connection bookkeeping of a listener: unfinished handshakes (bounded, oldest dropped) and idle connections.

Pure: no I/O, no clock of its own. The listeners (``sidecar.inbound``, ``sidecar.tls_conn``, ``sidecar.pipe``,
``sidecar.tcp_proxy``) call these from their protocol callbacks and from one periodic sweep per listener.

- :class:`PendingHandshakes`: connections that have not finished their TLS handshake. Past the
  limit, admitting a new one evicts the *oldest*: a flood of half-open connections then only ever
  drops its own members, while a real caller whose handshake takes milliseconds is never the oldest
  one for long.
- :class:`IdleTracker`: which connections moved no byte in either direction (and have no open
  stream) for ``timeout`` seconds. Each sweep is given the running byte count of every connection, so
  the data path pays nothing for it (no timer reset per read); a connection is closed between
  ``timeout`` and ``timeout + 2 * period`` seconds after its last byte (a change is noticed at the
  next sweep, the timeout is checked at sweeps).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class PendingHandshakes(Generic[K]):
    """Connections still in their handshake, oldest first, at most ``limit``."""

    __slots__ = ("_conns", "evicted", "limit")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the limit of pending handshakes must be at least 1, got {limit}")
        self.limit = limit
        self._conns: dict[K, None] = {}  # insertion order is age order
        self.evicted = 0

    def add(self, conn: K) -> K | None:
        """Track ``conn``; returns the oldest pending connection to drop when the limit is passed."""
        oldest: K | None = None
        if len(self._conns) >= self.limit:
            oldest = next(iter(self._conns))
            del self._conns[oldest]
            self.evicted += 1
        self._conns[conn] = None
        return oldest

    def done(self, conn: K) -> None:
        """The handshake of ``conn`` finished, failed, or the connection went away."""
        self._conns.pop(conn, None)

    def __len__(self) -> int:
        return len(self._conns)

    def __contains__(self, conn: object) -> bool:
        return conn in self._conns


class IdleTracker(Generic[K]):
    """Connections with no byte moved (and not busy) for ``timeout`` seconds, found by periodic sweeps."""

    __slots__ = ("_seen", "timeout")

    def __init__(self, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError(f"an idle timeout must be positive, got {timeout}")
        self.timeout = timeout
        self._seen: dict[K, tuple[int, float]] = {}  # bytes moved at the last change, time of that change

    @property
    def period(self) -> float:
        """How often to sweep: a quarter of the timeout, at most 5 s, at least 50 ms."""
        return max(0.05, min(self.timeout / 4, 5.0))

    def sweep(self, now: float, connections: Iterable[tuple[K, int, bool]]) -> list[K]:
        """``connections``: (key, bytes moved so far in both directions, busy). Returns the keys to close.

        A busy connection (an open stream) or one whose byte count changed since the last sweep is
        active now; connections not listed any more are forgotten.
        """
        seen = self._seen
        fresh: dict[K, tuple[int, float]] = {}
        idle: list[K] = []
        for key, moved, busy in connections:
            last = seen.get(key)
            if busy or last is None or last[0] != moved:
                fresh[key] = (moved, now)
            elif now - last[1] >= self.timeout:
                idle.append(key)
            else:
                fresh[key] = last
        self._seen = fresh
        return idle

    def __len__(self) -> int:
        return len(self._seen)


__all__ = ["IdleTracker", "PendingHandshakes"]
