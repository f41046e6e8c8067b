"""Admission at accept: a cap on open connections per listener, refused cheaply past it.

Every listener of a sidecar (the public port, each outbound listener, the internal full-path
servers) owns one :class:`ListenerGate`. A connection is admitted in the listener's protocol factory
path (``connection_made``) before anything is allocated for it; past ``max_connections`` the
transport is aborted at once (RST, no TLS, no buffers), counted in
``weft_connections_refused_total{reason="max_connections"}`` and logged through the rate-limited
peer log, so that a flood of connections costs the sidecar a counter increment each.
"""

from __future__ import annotations

import time
from typing import Any

from sidecar.telemetry import Telemetry


class ListenerGate:
    """Counts one listener's open connections; :meth:`admit` refuses past the cap."""

    __slots__ = ("limit", "listener", "open", "refused", "telemetry")

    def __init__(self, listener: str, limit: int, telemetry: Telemetry) -> None:
        if limit < 1:
            raise ValueError(f"connection limit of listener {listener} must be at least 1, got {limit}")
        self.listener = listener
        self.limit = limit
        self.telemetry = telemetry
        self.open = 0
        self.refused = 0

    def admit(self, transport: Any) -> bool:
        """Admit a just-accepted connection, or abort it (False). Call :meth:`release` when an admitted one closes."""
        if self.open >= self.limit:
            self.refused += 1
            self.telemetry.connection_refused("max_connections")
            peer = transport.get_extra_info("peername")
            self.telemetry.peer_log.warning(time.monotonic(), "connection_refused", reason="max_connections",
                                            listener=self.listener, limit=self.limit,
                                            peer=f"{peer[0]}:{peer[1]}" if peer else "")
            transport.abort()
            return False
        self.open += 1
        return True

    def release(self) -> None:
        if self.open > 0:
            self.open -= 1
