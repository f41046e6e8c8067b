"""`weft tap`'s flags and lines, and the dashboard's view models (plain values, no sockets)."""

from __future__ import annotations

import argparse

import pytest

from sidecar.tap import TapError
from weft import cmd_tap, cmd_ui
from weft.cmd_status import InstanceRow, SidecarRow, StatusReport
from weft.cmd_top import EdgeStats
from weft.ui import model


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cmd_tap.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_tap_flags_become_the_sidecars_filter() -> None:
    f = cmd_tap.tap_filter(_args("greeter", "--method", "/demo.v1.Greeter/", "--source", "frontend", "--to",
                                 "greeter", "--payload", "-n", "5", "--min-ms", "2"))
    assert (f.method, f.source, f.destination, f.payload, f.limit, f.min_ms) == \
        ("/demo.v1.Greeter/", "frontend", "greeter", True, 5, 2.0)
    assert cmd_tap.tap_filter(_args("greeter")).max_rps == 100.0
    assert cmd_tap.tap_filter(_args("greeter", "--max-rps", "0")).max_rps == 0.0
    with pytest.raises(TapError, match="-n"):
        cmd_tap.tap_filter(_args("greeter", "-n", "0"))
    with pytest.raises(TapError, match="source"):
        cmd_tap.tap_filter(_args("greeter", "--source", "a b"))


REC = {"ts": "2026-12-05T08:38:01.697Z", "direction": "inbound", "source": "frontend", "destination": "greeter",
       "protocol": "grpc", "method": "/weft.demo.v1.Greeter/SayHello", "status": "OK", "duration_ms": 2.46,
       "request": {"headers": {"authorization": "[redacted]"}, "messages": [{"bytes": 5, "json": {"name": "ada"}}]},
       "response": {"headers": {":status": "200"}, "trailers": {"grpc-status": "0"},
                    "messages": [{"bytes": 9, "json": {"message": "Hello, ada!"}, "truncated": True}]}}


def test_one_line_per_call_and_wide() -> None:
    line = cmd_tap.format_line(REC)
    assert line == "08:38:01.697 inbound  greeter <- frontend  /weft.demo.v1.Greeter/SayHello  OK  2.5ms"
    out = cmd_tap.format_line({**REC, "direction": "outbound", "source": "greeter", "destination": "store"})
    assert "greeter -> store" in out
    wide = cmd_tap.format_line(REC, wide=True)
    assert '"authorization":"[redacted]"' in wide and '{"name":"ada"}' in wide
    assert '{"message":"Hello, ada!"} (truncated)' in wide and '"grpc-status":"0"' in wide
    assert "dropped 3" in cmd_tap.format_line({"dropped": 3}, sidecar="http://x")
    assert "skipped 7 call(s) above --max-rps 100.0" in cmd_tap.format_line({"skipped": 7, "max_rps": 100.0})


def test_ui_address() -> None:
    assert cmd_ui.parse_addr("127.0.0.1:8580") == ("127.0.0.1", 8580)
    assert cmd_ui.parse_addr("[::1]:0") == ("::1", 0)
    with pytest.raises(ValueError, match="HOST:PORT"):
        cmd_ui.parse_addr("localhost")


def _edge(source: str, dest: str, ok: float, n: float = 10.0) -> EdgeStats:
    return EdgeStats(source=source, destination=dest, side="outbound", requests=n, rps=n / 2,
                     success_rate=ok if n else None, p50=0.002, p99=0.02)


def test_topology_layers_states_and_metrics() -> None:
    topo = model.topology({"frontend", "greeter", "store", "weft-ca"},
                          {("frontend", "greeter"), ("greeter", "store"), ("store", "cache")},
                          [_edge("frontend", "greeter", 0.1), _edge("greeter", "store", 1.0)])
    layers = {n["name"]: n["layer"] for n in topo["nodes"]}
    assert layers == {"cache": 3, "frontend": 0, "greeter": 1, "store": 2, "weft-ca": 0}
    edges = {(e["source"], e["destination"]): e for e in topo["edges"]}
    assert edges[("frontend", "greeter")]["state"] == "failing"
    assert edges[("greeter", "store")]["state"] == "ok"
    assert edges[("greeter", "store")]["p99_ms"] == 20.0 and edges[("greeter", "store")]["rps"] == 5.0
    assert edges[("store", "cache")]["state"] == "idle" and edges[("store", "cache")]["rps"] is None


def test_topology_survives_cycles() -> None:
    topo = model.topology({"a", "b"}, {("a", "b"), ("b", "a")}, [])
    assert {n["name"] for n in topo["nodes"]} == {"a", "b"}
    assert all(0 <= n["layer"] < 2 for n in topo["nodes"])


def test_services_and_intentions_views() -> None:
    report = StatusReport(consul="c", instances=[
        InstanceRow(service="greeter", id="greeter-1", address="127.0.0.1", port=1, health="passing",
                    sidecars=(SidecarRow(id="greeter-1-sidecar-proxy", port=2, health="critical",
                                         cert_expiry=100.0, policy_version="v1"),)),
        InstanceRow(service="greeter", id="greeter-2", address="127.0.0.1", port=3, health="warning"),
    ])
    [svc] = model.services_view(report)
    assert svc["name"] == "greeter" and svc["health"] == "warning" and svc["meshed"]
    assert svc["instances"][0]["sidecars"][0]["policy_version"] == "v1"
    rows = [{"Source": "frontend", "Destination": "greeter", "Action": "allow", "Mode": "enforce", "Precedence": 9,
             "Origin": "KV weft/intentions/greeter Sources[0]", "Description": ""}]
    assert model.intentions_by_destination(rows)["greeter"][0]["origin"] == "KV weft/intentions/greeter Sources[0]"


def test_dashboard_answers_only_to_its_own_host_names() -> None:
    from weft.ui.server import allowed_host

    for host in ("127.0.0.1:8580", "localhost:8580", "[::1]:8580", "LOCALHOST"):
        assert allowed_host(host, "127.0.0.1"), host
    assert not allowed_host("evil.example:8580", "127.0.0.1")  # DNS rebinding
    assert not allowed_host("", "127.0.0.1")
    assert allowed_host("10.1.2.3:8580", "10.1.2.3")
