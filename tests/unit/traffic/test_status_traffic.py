"""`weft status`'s traffic section from sidecars' /config documents (plain values)."""

from __future__ import annotations

from weft.cmd_status import StatusReport, TrafficRow, render, traffic_rows

CONFIG = {
    "snapshot": {"upstreams": {
        "greeter": {"chain": {
            "default": False, "start": "router:greeter.default.default",
            "nodes": {
                "router:greeter.default.default": {"routes": [{"match": "header x-canary", "next": "r2"},
                                                              {"match": "path ^= /", "next": "s"}]},
                "s": {"splits": [{"weight": 90.0, "next": "r1"}, {"weight": 10.0, "next": "r2"}]},
                "r1": {"target": "v1.greeter.default.default.dc1"},
                "r2": {"target": "v2.greeter.default.default.dc1"}},
            "targets": {"v1.greeter.default.default.dc1": {"endpoints": ["127.0.0.1:21200"]},
                        "v2.greeter.default.default.dc1": {"endpoints": ["127.0.0.1:21210"]}}}},
        "store": {"chain": {"default": True, "nodes": {}, "targets": {}}},
    }},
    "traffic": {"greeter": {"ejected": {"127.0.0.1:21210": 12.5}}},
}


def test_rows_show_splits_and_ejections() -> None:
    rows = traffic_rows("frontend-1-sidecar-proxy", CONFIG)
    assert rows == [TrafficRow(sidecar="frontend-1-sidecar-proxy", upstream="greeter", routes=2,
                               splits=((90.0, "v1.greeter.default.default.dc1", 1),
                                       (10.0, "v2.greeter.default.default.dc1", 1)),
                               ejected=("127.0.0.1:21210",))]
    text = render(StatusReport(consul="127.0.0.1:8500", traffic=rows), 0.0)
    assert "Traffic management" in text
    assert "90% v1.greeter (1 ep), 10% v2.greeter (1 ep)" in text and "127.0.0.1:21210" in text


def test_other_shapes_give_no_rows() -> None:
    assert traffic_rows("x", {}) == []
    assert traffic_rows("x", {"snapshot": None}) == []
    assert traffic_rows("x", {"snapshot": {"upstreams": {"a": {"chain": None}}}}) == []
    assert "Traffic management" not in render(StatusReport(consul="c"), 0.0)
