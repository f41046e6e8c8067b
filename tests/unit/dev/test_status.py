"""`weft status`'s pure parts: health aggregation, KV documents, rendering."""

from __future__ import annotations

import json

import pytest

from weft.cmd_status import (
    InstanceRow,
    PolicyRow,
    SidecarRow,
    StatusReport,
    format_remaining,
    metrics_facts,
    parse_policy,
    parse_roots,
    policy_for,
    render,
    role_of,
)

NOW = 1_800_000_000.0


def test_parse_roots_in_consuls_shape() -> None:
    doc = {"ActiveRootID": "aa:bb", "TrustDomain": "1234.consul",
           "Roots": [{"ID": "aa:bb", "Name": "Weft CA Root 2", "NotAfter": "2036-01-01T00:00:00Z", "Active": True},
                     {"ID": "cc:dd", "Name": "Weft CA Root 1", "NotAfter": "2035-01-01T00:00:00Z", "Active": False}]}
    domain, roots = parse_roots(json.dumps(doc).encode())
    assert domain == "1234.consul"
    assert [(r.id, r.active) for r in roots] == [("aa:bb", True), ("cc:dd", False)]
    with pytest.raises(ValueError, match="no trust bundle yet"):
        parse_roots(None)
    with pytest.raises(ValueError, match="not JSON"):
        parse_roots(b"{")
    with pytest.raises(ValueError, match="no Roots list"):
        parse_roots(b"{}")


def test_parse_policy_table() -> None:
    raw = json.dumps({"Destination": "greeter", "Version": "abc123", "DefaultPolicy": "deny",
                      "Rules": [{"Source": "frontend"}]}).encode()
    assert parse_policy("weft/policy/compiled/greeter", raw) == PolicyRow("greeter", "abc123", "deny", 1)
    bad = parse_policy("weft/policy/compiled/store", b"[1]")
    assert bad.destination == "store" and bad.error.startswith("unreadable")


def test_metrics_facts() -> None:
    samples = [("weft_cert_expiry_timestamp_seconds", {}, NOW + 60),
               ("weft_policy_version_info", {"version": "old"}, 0.0),
               ("weft_policy_version_info", {"version": "v2"}, 1.0),
               ("weft_requests_total", {"source": "a"}, 5.0)]
    assert metrics_facts(samples) == (NOW + 60, "v2")
    assert metrics_facts([]) == (None, "")


@pytest.mark.parametrize(("left", "text"), [
    (None, "-"), (-1, "EXPIRED"), (59, "0m59s"), (3 * 3600 + 120, "3h02m"), (3 * 86400 + 7200, "3d2h")])
def test_format_remaining(left: float | None, text: str) -> None:
    assert format_remaining(None if left is None else NOW + left, NOW) == text


def test_policy_for_falls_back_to_the_wildcard_table() -> None:
    star = PolicyRow("*", "s", "deny", 0)
    greeter = PolicyRow("greeter", "g", "deny", 1)
    assert policy_for("greeter", [star, greeter]) is greeter
    assert policy_for("store", [star, greeter]) is star
    assert policy_for("store", [greeter]) is None


def test_render_shows_services_sidecars_certificates_and_policy_sync() -> None:
    report = StatusReport(
        consul="http://127.0.0.1:8500",
        instances=[
            InstanceRow("greeter", "greeter-1", "127.0.0.1", 19200, "passing", "grpc", (
                SidecarRow("greeter-1-sidecar-proxy", 21200, "passing", "http://127.0.0.1:19001", NOW + 7200, "v1"),)),
            InstanceRow("store", "store-1", "127.0.0.1", 19300, "critical", "grpc", (
                SidecarRow("store-1-sidecar-proxy", 21300, "critical", "", None, "v0"),)),
            InstanceRow("weft-ca", "weft-ca-1", "127.0.0.1", 8553, "passing", role="active"),
        ],
        trust_domain="1234.consul",
        policies=[PolicyRow("greeter", "v1", "deny", 1), PolicyRow("*", "v9", "deny", 0)],
        problems=["sidecar store-1-sidecar-proxy: connection refused"],
    )
    text = render(report, NOW)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("SERVICE"))
    greeter = lines[header + 1].split()
    assert greeter[:5] == ["greeter", "greeter-1", "127.0.0.1:19200", "passing", "grpc"]
    assert greeter[5:9] == ["greeter-1-sidecar-proxy:21200", "passing", "2h00m", "v1"]
    store = lines[header + 2]
    assert "critical" in store and "v0 (stale)" in store
    assert lines[header + 3].split()[:5] == ["weft-ca", "weft-ca-1", "127.0.0.1:8553", "passing", "(active)"]
    assert "Trust bundle (weft/ca/roots): trust domain 1234.consul" in text
    policy_lines = [line.split() for line in lines if line.strip().startswith(("greeter ", "* "))]
    assert ["greeter", "v1", "deny", "1", "1/1"] in policy_lines
    assert ["*", "v9", "deny", "0", "0/1"] in policy_lines
    assert "! sidecar store-1-sidecar-proxy: connection refused" in text


def test_render_empty() -> None:
    text = render(StatusReport(consul="x", roots_error="no trust bundle yet"), NOW)
    assert "(no services registered)" in text
    assert "no trust bundle yet" in text
    assert "is `weft policy serve` running?" in text


def test_role_of_control_plane_replicas() -> None:
    assert role_of(["", "standby"]) == "standby"
    assert role_of(["leader\n"]) == "leader"
    assert role_of(["HTTP GET http://x: 200 OK"]) == ""
