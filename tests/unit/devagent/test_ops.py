"""Metrics aggregation (Consul's in-memory sink) and monitor log lines (hclog's format), pure."""

from __future__ import annotations

import asyncio
import datetime

import pytest
import structlog

from devagent import logstream, telemetry


def test_display_shows_the_last_complete_interval_in_consuls_shape() -> None:
    m = telemetry.Metrics()
    m.gauge("consul.state.nodes", lambda: 3)
    m.gauge("consul.broken", lambda: 1 / 0)  # a gauge that fails is left out, not the answer
    t0 = 1_000_000.0  # an interval boundary
    m.sample("consul.api.http", t0 + 1, 2.0, {"method": "GET", "path": "v1_kv_"})
    m.sample("consul.api.http", t0 + 2, 4.0, {"method": "GET", "path": "v1_kv_"})
    m.incr("consul.rpc.request", t0 + 3)
    only = m.display(t0 + 5)  # the only interval so far is shown
    assert only["Timestamp"] == "1970-01-12 13:46:40 +0000 UTC"
    assert only["Gauges"] == [{"Name": "consul.state.nodes", "Value": 3, "Labels": {}}]
    assert only["Points"] == []
    [sample] = only["Samples"]
    assert sample == {"Name": "consul.api.http", "Count": 2, "Rate": 0.6, "Sum": 6, "Min": 2, "Max": 4,
                      "Mean": 3, "Stddev": pytest.approx(1.4142135623730951), "Labels": {"method": "GET",
                                                                                      "path": "v1_kv_"}}
    assert [c["Name"] for c in only["Counters"]] == ["consul.rpc.request"]
    m.incr("consul.rpc.request", t0 + 12)  # the next interval
    shown = m.display(t0 + 13)
    assert shown["Timestamp"] == only["Timestamp"] and shown["Counters"][0]["Count"] == 1
    later = m.display(t0 + 25)
    assert later["Counters"][0]["Count"] == 1 and later["Samples"] == []


def test_prometheus_text_is_cumulative() -> None:
    m = telemetry.Metrics()
    m.gauge("consul.runtime.num_goroutines", lambda: 7)
    for t in (1.0, 15.0, 30.0):
        m.sample("consul.api.http", t, 1.5, {"method": "PUT", "path": 'v1_"x'})
        m.incr("consul.rpc.request", t)
    text = m.prometheus()
    assert "# TYPE consul_runtime_num_goroutines gauge\nconsul_runtime_num_goroutines 7\n" in text
    assert "# TYPE consul_rpc_request counter\nconsul_rpc_request 3\n" in text
    assert '# TYPE consul_api_http summary\n' in text
    assert 'consul_api_http_sum{method="PUT",path="v1_\\"x"} 4.5\n' in text
    assert 'consul_api_http_count{method="PUT",path="v1_\\"x"} 3\n' in text


def test_series_are_bounded() -> None:
    m = telemetry.Metrics()
    for i in range(telemetry.MAX_SERIES + 50):
        m.incr("consul.x", 1.0, labels={"i": str(i)})
    assert len(m.display(2.0)["Counters"]) == telemetry.MAX_SERIES


def test_route_labels() -> None:
    assert telemetry.route_label("/v1/kv/{key:.*}") == "v1_kv_"
    assert telemetry.route_label("/v1/agent/services") == "v1_agent_services"


def test_log_levels_as_consul_validates_them() -> None:
    for ok in ("trace", "DEBUG", "info", "warn", "ERR", "error"):
        assert logstream.valid_level(ok)
    for bad in ("", "warning", "fatal", "verbose"):
        assert not logstream.valid_level(bad)


def test_lines_in_hclog_text_and_json() -> None:
    now = datetime.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.UTC)
    event = {"event": "check TTL expired", "check": "web ttl", "level": "warning", "timestamp": "x"}
    assert logstream.format_line(event, 3, as_json=False, now=now) == (
        '2026-01-02T03:04:05.678Z [WARN]  agent: check TTL expired: check="web ttl"\n')
    assert logstream.format_line({"event": "hi"}, 2, as_json=False, now=now) == (
        "2026-01-02T03:04:05.678Z [INFO]  agent: hi\n")
    line = logstream.format_line(event, 3, as_json=True, now=now)
    assert line == ('{"@level":"warn","@message":"check TTL expired","@module":"agent",'
                    '"@timestamp":"2026-01-02T03:04:05.678901Z","check":"web ttl"}\n')
    huge = logstream.format_line({"event": "x" * 100_000}, 2, as_json=False, now=now)
    assert len(huge) < logstream.MAX_LINE + 100 and huge.endswith("...(truncated)\n")


def test_tap_feeds_monitors_by_level_and_drops_below_the_agent_level() -> None:
    async def main() -> None:
        hub = logstream.LogHub()
        hub.min_level = logstream.level_number("info")
        debug_mon = hub.open(logstream.level_number("debug"), False)
        warn_mon = hub.open(logstream.level_number("warn"), True)
        assert debug_mon is not None and warn_mon is not None
        with pytest.raises(structlog.DropEvent):
            hub.tap(None, "debug", {"event": "quiet"})
        assert hub.tap(None, "warning", {"event": "loud"}) == {"event": "loud"}
        assert debug_mon.queue.qsize() == 2 and warn_mon.queue.qsize() == 1
        for _ in range(logstream.BUFFER + 10):  # a monitor that does not read loses lines, counted
            hub.tap(None, "info", {"event": "spam"})
        assert debug_mon.queue.qsize() == logstream.BUFFER and debug_mon.dropped == 12
        hub.close(debug_mon)
        hub.close(warn_mon)
        mons = [hub.open(2, False) for _ in range(logstream.MAX_MONITORS)]
        assert all(mons) and hub.open(2, False) is None

    asyncio.run(main())
