"""When the sidecar publishes a new snapshot: coalesced, as Consul's proxycfg does (pure, no I/O).

Watches answer in bursts (a deploy moves many endpoints; a restarted Consul answers every blocking
query at once), and every publish rebuilds the snapshot and tells every listener. So after the first
change since the last publish, the publish waits one window (200 ms by default) and then carries the
latest state whole; changes inside the window ride along. The first snapshot is published at once,
so that start-up readiness never waits for a window.
"""

from __future__ import annotations

DEFAULT_WINDOW = 0.2  # seconds; Consul's proxycfg coalesceTimeout


class PublishWindow:
    """Decides when a change is published. The caller owns the clock and the timer: it calls
    :meth:`change` on every change and, when that returns a delay, :meth:`fire` once the delay has
    passed, then publishes the state it has at that moment."""

    __slots__ = ("_due", "window")

    def __init__(self, window: float = DEFAULT_WINDOW) -> None:
        if not window >= 0:
            raise ValueError(f"the coalescing window must be 0 or more seconds, got {window!r}")
        self.window = window
        self._due: float | None = None

    @property
    def pending(self) -> bool:
        """A publish is scheduled and will carry any change made before it fires."""
        return self._due is not None

    def change(self, now: float, *, published: bool) -> float | None:
        """A change at `now`: the seconds until the publish that carries it (0.0: publish now), or None
        when an already scheduled publish carries it. `published` says whether a snapshot has been
        published yet (before the first one, every change is tried at once)."""
        if not published or self.window == 0:
            return 0.0
        if self._due is not None:
            return None
        self._due = now + self.window
        return self.window

    def fire(self) -> None:
        """The scheduled publish is happening: later changes open a new window."""
        self._due = None
