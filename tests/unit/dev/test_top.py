"""`weft top`'s pure parts: metric parsing, counter deltas, histogram quantiles, per-edge stats."""

from __future__ import annotations

import math

import pytest

from weft.cmd_top import (
    EdgeStats,
    admin_url,
    counter_delta,
    edge_stats,
    histogram_quantile,
    is_success,
    parse_metrics,
    render_table,
    scrape_from_text,
    stats_json,
)

BOUNDS = ("0.001", "0.005", "0.01", "0.05", "0.1", "+Inf")


def exposition(series: dict[tuple[str, str, str, str, str], tuple[int, list[int]]]) -> str:
    """Prometheus text for weft_requests_total and the duration histogram, as a sidecar serves it.

    `series`: (direction, source, destination, method, status) -> (count, per-bucket counts, NOT cumulative)."""
    lines = ["# HELP weft_requests_total Calls", "# TYPE weft_requests_total counter",
             "# HELP weft_request_duration_seconds Duration", "# TYPE weft_request_duration_seconds histogram"]
    for (direction, source, dest, method, status), (count, per_bucket) in series.items():
        labels = (f'direction="{direction}",source="{source}",destination="{dest}",method="{method}",'
                  f'status="{status}"')
        lines.append(f"weft_requests_total{{{labels}}} {float(count)}")
        cumulative = 0
        for bound, n in zip(BOUNDS, per_bucket, strict=True):
            cumulative += n
            lines.append(f'weft_request_duration_seconds_bucket{{{labels},le="{bound}"}} {float(cumulative)}')
        lines.append(f"weft_request_duration_seconds_count{{{labels}}} {float(count)}")
        lines.append(f"weft_request_duration_seconds_sum{{{labels}}} 0.5")
    lines.append("# TYPE weft_cert_expiry_timestamp_seconds gauge")
    lines.append("weft_cert_expiry_timestamp_seconds 1.8e+09")
    return "\n".join(lines) + "\n"


FG = ("outbound", "frontend", "greeter", "/weft.demo.v1.Greeter/SayHello", "OK")
FG_DENIED = ("outbound", "frontend", "greeter", "/weft.demo.v1.Greeter/SayHello", "PERMISSION_DENIED")
GS_IN = ("inbound", "greeter", "store", "/weft.demo.v1.Store/Increment", "OK")
FG_IN = ("inbound", "frontend", "greeter", "/weft.demo.v1.Greeter/SayHello", "OK")


def test_parse_metrics_reads_labels_and_values() -> None:
    samples = parse_metrics(exposition({FG: (3, [1, 2, 0, 0, 0, 0])}))
    totals = [s for s in samples if s.name == "weft_requests_total"]
    assert len(totals) == 1
    assert totals[0].labels["source"] == "frontend"
    assert totals[0].value == 3.0
    expiry = [s for s in samples if s.name == "weft_cert_expiry_timestamp_seconds"]
    assert expiry[0].value == 1.8e9


def test_parse_metrics_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not Prometheus text format"):
        parse_metrics('weft_requests_total{source="a" 1\n')


def test_counter_delta_handles_restarts() -> None:
    assert counter_delta(10, 15) == 5
    assert counter_delta(None, 4) == 4
    assert counter_delta(10, 3) == 3  # restarted: counted from zero


@pytest.mark.parametrize(("method", "status", "ok"), [
    ("/a.B/C", "OK", True), ("/a.B/C", "PERMISSION_DENIED", False), ("/a.B/C", "UNAVAILABLE", False),
    ("GET /hello", "200", True), ("GET /hello", "403", True), ("GET /x", "503", False),
    ("tcp", "closed", True), ("tcp", "error", False),
])
def test_success_classification(method: str, status: str, ok: bool) -> None:
    assert is_success(method, status) is ok


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = [(0.1, 50.0), (0.2, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.05)  # lowest bucket starts at 0
    # ranks that fall into +Inf answer the highest finite bound
    assert histogram_quantile(0.99, [(0.1, 1.0), (math.inf, 10.0)]) == pytest.approx(0.1)
    assert histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None
    assert histogram_quantile(0.5, [(0.1, 3.0)]) is None  # no +Inf bucket: not a histogram
    with pytest.raises(ValueError):
        histogram_quantile(1.5, buckets)


def test_edge_stats_from_two_scrapes() -> None:
    prev = [scrape_from_text("http://a", 100.0, exposition({FG: (10, [10, 0, 0, 0, 0, 0])}))]
    # 20 more calls in 2 s, 4 of them denied; 10 fast (<=1ms) and 10 between 5 and 10 ms
    cur = [scrape_from_text("http://a", 102.0, exposition({FG: (26, [20, 0, 6, 0, 0, 0]),
                                                           FG_DENIED: (4, [0, 0, 4, 0, 0, 0])}))]
    [edge] = edge_stats(prev, cur)
    assert (edge.source, edge.destination, edge.side) == ("frontend", "greeter", "outbound")
    assert edge.requests == 20
    assert edge.rps == pytest.approx(10.0)
    assert edge.success_rate == pytest.approx(16 / 20)
    # bucket deltas: <=1ms: 10, (5ms, 10ms]: 10  -> p50 at the top of the first bucket, p99 near 10 ms
    assert edge.p50 == pytest.approx(0.001)
    assert edge.p99 == pytest.approx(0.005 + 0.005 * (19.8 - 10) / 10)
    assert edge.methods == ("/weft.demo.v1.Greeter/SayHello",)


def test_outbound_side_wins_and_inbound_only_edges_are_kept() -> None:
    text0 = exposition({FG: (0, [0] * 6), FG_IN: (0, [0] * 6), GS_IN: (0, [0] * 6)})
    text1 = exposition({FG: (6, [6, 0, 0, 0, 0, 0]), FG_IN: (6, [6, 0, 0, 0, 0, 0]), GS_IN: (2, [0, 2, 0, 0, 0, 0])})
    stats = edge_stats([scrape_from_text("t", 0.0, text0)], [scrape_from_text("t", 1.0, text1)])
    assert [(s.source, s.destination, s.side) for s in stats] == [
        ("frontend", "greeter", "outbound"), ("greeter", "store", "inbound")]


def test_instances_of_one_service_add_up_and_new_targets_wait_for_a_second_scrape() -> None:
    zero = exposition({FG: (0, [0] * 6)})
    five = exposition({FG: (5, [5, 0, 0, 0, 0, 0])})
    prev = [scrape_from_text("a", 0.0, zero), scrape_from_text("b", 0.0, zero)]
    cur = [scrape_from_text("a", 1.0, five), scrape_from_text("b", 1.0, five), scrape_from_text("c", 1.0, five)]
    [edge] = edge_stats(prev, cur)
    assert edge.requests == 10  # a and b; c was scraped only once
    assert edge.rps == pytest.approx(10.0)


def test_a_restarted_sidecar_counts_from_zero() -> None:
    prev = [scrape_from_text("a", 0.0, exposition({FG: (100, [100, 0, 0, 0, 0, 0])}))]
    cur = [scrape_from_text("a", 1.0, exposition({FG: (3, [3, 0, 0, 0, 0, 0])}))]
    [edge] = edge_stats(prev, cur)
    assert edge.requests == 3
    assert edge.p50 is not None


def test_no_traffic_gives_no_rates() -> None:
    text = exposition({FG: (5, [5, 0, 0, 0, 0, 0])})
    [edge] = edge_stats([scrape_from_text("a", 0.0, text)], [scrape_from_text("a", 2.0, text)])
    assert edge.requests == 0 and edge.rps == 0 and edge.success_rate is None and edge.p99 is None


@pytest.mark.parametrize(("address", "meta", "url"), [
    ("10.0.0.5", {"weft-admin-port": "19000"}, "http://10.0.0.5:19000"),
    ("", {"weft-admin-port": "19000"}, "http://127.0.0.1:19000"),
    ("10.0.0.5", {"weft-admin-addr": "127.0.0.1:19001"}, "http://127.0.0.1:19001"),
    ("10.0.0.5", {"weft-admin-addr": "http://h:1/"}, "http://h:1"),
    ("::1", {"weft-admin-port": "7"}, "http://[::1]:7"),
    ("10.0.0.5", {"version": "1"}, None),
])
def test_admin_url_from_registration_meta(address: str, meta: dict[str, str], url: str | None) -> None:
    assert admin_url(address, meta) == url


def test_render_table_and_json() -> None:
    stats = [EdgeStats("frontend", "greeter", "outbound", 20, 10.0, 0.8, 0.001, 0.0099),
             EdgeStats("greeter", "store", "inbound", 2, 2.0, None, None, None)]
    text = render_table(stats, interval=2.0, targets=3, errors=["http://x: ConnectionRefusedError"])
    lines = text.splitlines()
    assert lines[1].split() == ["SOURCE", "DESTINATION", "RPS", "SUCCESS", "P50", "P99", "REQUESTS"]
    assert lines[2].split() == ["frontend", "greeter", "10.00", "80.00%", "1.0ms", "9.9ms", "20"]
    assert lines[3].split()[:4] == ["greeter", "store", "2.00", "-"]
    assert lines[-1] == "! http://x: ConnectionRefusedError"
    assert stats_json(stats)[0]["p99_ms"] == pytest.approx(9.9)
    assert "no requests" in render_table([], interval=1, targets=0)


def test_split_by_method() -> None:
    stream = ("outbound", "frontend", "greeter", "/weft.demo.v1.Greeter/SayHelloStream", "OK")
    prev = [scrape_from_text("a", 0.0, exposition({FG: (0, [0] * 6), stream: (0, [0] * 6)}))]
    cur = [scrape_from_text("a", 1.0, exposition({FG: (8, [8, 0, 0, 0, 0, 0]), stream: (2, [0, 0, 0, 0, 0, 2])}))]
    [whole] = edge_stats(prev, cur)
    assert whole.requests == 10 and whole.method == ""
    per = {e.method: e for e in edge_stats(prev, cur, by_method=True)}
    assert set(per) == {FG[3], stream[3]}
    idle = edge_stats(cur, [scrape_from_text("a", 2.0, exposition({FG: (8, [8, 0, 0, 0, 0, 0]),
                                                                   stream: (2, [0, 0, 0, 0, 0, 2])}))],
                      by_method=True)
    assert idle == [], "methods without calls in the interval are left out"
    assert per[FG[3]].requests == 8 and per[FG[3]].p99 == pytest.approx(0.001 * 0.99 * 8 / 8, rel=0.01)
    assert per[stream[3]].p50 == pytest.approx(0.1)  # in +Inf: the highest finite bound
    text = render_table(list(per.values()), interval=1, targets=1)
    assert text.splitlines()[1].split()[:3] == ["SOURCE", "DESTINATION", "METHOD"]
    assert stats_json(list(per.values()))[0]["method"] in per
