"""The per-listener connection cap: admitted up to the limit, refused (aborted, counted) past it."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.gate import ListenerGate
from sidecar.telemetry import Telemetry


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def abort(self) -> None:
        self.aborted = True


def _refused(telemetry: Telemetry) -> float:
    value = telemetry.registry.get_sample_value("weft_connections_refused_total", {"reason": "max_connections"})
    return value or 0.0


def test_connections_past_the_cap_are_aborted_and_counted() -> None:
    telemetry = Telemetry()
    gate = ListenerGate("public", 2, telemetry)
    first, second, third = _Transport(), _Transport(), _Transport()
    assert gate.admit(first) and gate.admit(second)
    assert not gate.admit(third)
    assert third.aborted and not first.aborted
    assert _refused(telemetry) == 1.0
    gate.release()
    fourth = _Transport()
    assert gate.admit(fourth) and not fourth.aborted
    assert gate.open == 2


def test_release_never_goes_below_zero() -> None:
    gate = ListenerGate("public", 1, Telemetry())
    gate.release()
    assert gate.open == 0


def test_a_cap_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="listener public"):
        ListenerGate("public", 0, Telemetry())


def test_refusal_log_is_rate_limited() -> None:
    telemetry = Telemetry()
    log = telemetry.peer_log
    admitted = sum(log.admit(100.0) for _ in range(1000))
    assert admitted == int(log.burst)
    assert log.suppressed == 1000 - admitted
    assert log.admit(100.0 + 1.0)  # refilled at per_second
