"""The echo app's metadata script, with plain values."""

from __future__ import annotations

import pytest

from tests.apps.echo import script


def test_defaults() -> None:
    assert script.parse([("x-other", "1")]) == script.Script()


def test_status_by_name_and_number() -> None:
    assert script.parse([("x-echo-status", "permission_denied:no way")]).status == script.Status(7, "no way")
    plan = script.parse([("x-echo-status", "14")])
    assert plan.status is not None and plan.status.code == 14 and "UNAVAILABLE" in plan.status.message
    assert script.parse([("x-echo-status", "OK")]).status is None
    assert script.parse_status("NOT_FOUND:a:b") == script.Status(5, "a:b")


@pytest.mark.parametrize(("key", "value"), [
    ("x-echo-status", "NOPE"), ("x-echo-status", "17"), ("x-echo-delay-ms", "soon"),
    ("x-echo-count", "-1"), ("x-echo-count", str(script.MAX_COUNT + 1)),
])
def test_bad_values_are_named(key: str, value: str) -> None:
    with pytest.raises(script.ScriptError, match=key):
        script.parse([(key, value)])


def test_numbers_and_last_value_wins() -> None:
    plan = script.parse([("x-echo-count", "3"), ("x-echo-count", "5"), ("x-echo-delay-ms", b"20"),
                         ("x-echo-status-after", "2")])
    assert (plan.count, plan.delay_ms, plan.status_after) == (5, 20, 2)


def test_echoed_metadata_drops_transport_headers() -> None:
    md: list[tuple[str, str | bytes]] = [
        (":authority", "x"), ("user-agent", "grpc"), ("grpc-timeout", "1S"), ("x-a", "1"), ("x-b-bin", b"\x00"),
        ("x-echo-instance", "spoof")]
    assert script.echoed(md) == [("x-a", "1"), ("x-b-bin", b"\x00")]
    assert script.text_metadata(md) == {":authority": "x", "user-agent": "grpc", "grpc-timeout": "1S", "x-a": "1",
                                        "x-echo-instance": "spoof"}
