"""A stream's idle timeout: service-router ``IdleTimeout`` (pure).

As Envoy's route ``idle_timeout``: a call with no frame in either direction (request or response
headers, data or trailers) for that long ends. ``IdleWatch`` keeps when the call was last active;
its owner checks ``left`` when a timer fires and arms the next one for what is left, so a busy stream
costs one clock read per frame and no timer churn.
"""

from __future__ import annotations


class IdleWatch:
    __slots__ = ("handle", "last", "timeout")

    def __init__(self, timeout: float, now: float) -> None:
        if timeout <= 0:
            raise ValueError("an idle timeout must be positive")
        self.timeout = timeout
        self.last = now
        self.handle: object = None  # the owner's timer

    def touch(self, now: float) -> None:
        """A frame went by."""
        self.last = now

    def left(self, now: float) -> float:
        """Seconds until the call has been idle for its timeout (0: it has)."""
        return max(0.0, self.last + self.timeout - now)

    def message(self) -> str:
        return f"weft: no frame in either direction for {self.timeout:g}s (the route's IdleTimeout)"
