"""The admin API's routing and answers (Admin.answer: no sockets)."""

from __future__ import annotations

import json

from sidecar.admin import Admin
from sidecar.tap import TapHub


class _Telemetry:
    tap = TapHub()

    def render(self) -> bytes:
        return b"weft_requests_total 1\n"


def _admin(ready: tuple[bool, str] = (True, "ready")) -> Admin:
    return Admin(lambda: None, _Telemetry(), lambda: ready, lambda: {"draining": False})  # type: ignore[arg-type]


def test_endpoints_answer() -> None:
    admin = _admin()
    assert admin.answer("GET", "/live")[0] == 200
    assert admin.answer("GET", "/ready") == (200, "text/plain; charset=utf-8", b"ready\n")
    status, ctype, body = admin.answer("GET", "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=") and b"weft_requests_total" in body
    status, ctype, body = admin.answer("GET", "/config?pretty=1")
    doc = json.loads(body)
    assert status == 200 and ctype == "application/json" and doc["snapshot"] is None and doc["draining"] is False


def test_not_ready_unknown_path_and_method() -> None:
    admin = _admin((False, "waiting for the leaf"))
    assert admin.answer("GET", "/ready") == (503, "text/plain; charset=utf-8", b"waiting for the leaf\n")
    assert admin.answer("GET", "/nope")[0] == 404
    assert admin.answer("POST", "/ready")[0] == 405


def test_a_failing_endpoint_answers_500() -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    admin = Admin(lambda: None, _Telemetry(), broken)  # type: ignore[arg-type]
    assert admin.answer("GET", "/ready")[0] == 500
    assert admin.answer("GET", "/live")[0] == 200
