"""Pure helpers of the sidecar benchmark: percentiles, target evaluation, HAProxy configuration."""

from __future__ import annotations

from pathlib import Path

from benchmarks import bench_sidecar, haproxy, load
from benchmarks.pki import Files


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert load.percentile(values, 0.5) == 50.0
    assert load.percentile(values, 0.99) == 99.0
    assert load.percentile([7.0], 0.99) == 7.0
    assert load.percentile([], 0.5) == 0.0
    assert load.latency_summary([0.002, 0.001, 0.003]) == {"p50_ms": 2.0, "p99_ms": 3.0}


def test_evaluate_targets() -> None:
    results = {
        "unary_c32": {"haproxy": {"proxy_cpu_us_per_call": 100.0}, "weft": {"proxy_cpu_us_per_call": 300.0}},
        "unary_c1": {"direct": {"p50_ms": 1.0}, "haproxy": {"p50_ms": 1.5}, "weft": {"p50_ms": 3.0}},
        "bidi": {"direct": {"msgs_per_s": 1000.0}, "weft": {"msgs_per_s": 300.0}},
        "tcp": {"haproxy": {"mb_per_s": 100.0}},
    }
    memory = {"rss_mb_after_first": 60.0, "rss_growth_after_second": 0.005}
    t = bench_sidecar.evaluate(results, memory)
    assert t["cpu_per_unary_call_vs_haproxy"] == {"value": 3.0, "target": "<= 3.5", "met": True}
    assert t["added_p50_c1_vs_haproxy"]["value"] == 4.0 and t["added_p50_c1_vs_haproxy"]["met"] is False
    assert t["bidi_msgs_vs_direct"]["met"] is False
    assert t["tcp_throughput_vs_haproxy"]["met"] is None  # Weft not measured
    assert t["rss_mb_after_first"]["met"] is True and t["rss_growth_after_second"]["met"] is True
    assert "NO" in bench_sidecar.table(results, t, memory)


def test_haproxy_configs_wire_the_pair() -> None:
    files = Files(Path("/p/ca.pem"), Path("/p/server.pem"), Path("/p/client.pem"), "echo.svc.x")
    client = haproxy.client_config(1001, 1002, 2001, 2002, files)
    assert "bind 127.0.0.1:1001 proto h2" in client
    assert "server upstream 127.0.0.1:2001 ssl verify required ca-file /p/ca.pem crt /p/client.pem" in client
    assert "alpn h2" in client and "verifyhost echo.svc.x" in client
    server = haproxy.server_config(2001, 2002, 3001, 3002, files)
    assert "bind 127.0.0.1:2001 ssl crt /p/server.pem ca-file /p/ca.pem verify required alpn h2" in server
    assert "server app 127.0.0.1:3001 proto h2" in server and "server app 127.0.0.1:3002\n" in server


def test_best_of_rounds_picks_the_least_disturbed() -> None:
    runs = [{"proxy_cpu_us_per_call": 120.0, "rps": 900.0}, {"proxy_cpu_us_per_call": 100.0, "rps": 800.0}]
    assert bench_sidecar.best("unary_c32", runs)["rps"] == 800.0
    assert bench_sidecar.best("unary_c32", runs)["rounds"] == [120.0, 100.0]
    assert bench_sidecar.best("unary_c32", [{"rps": 1.0}, {"rps": 2.0}])["rps"] == 2.0  # direct: no proxy
    assert bench_sidecar.best("unary_c1", [{"p50_ms": 2.0}, {"p50_ms": 1.0}])["p50_ms"] == 1.0
    assert bench_sidecar.best("tcp", [{"mb_per_s": 5.0}, {"error": "x"}])["mb_per_s"] == 5.0
    assert bench_sidecar.best("bidi", [{"error": "x"}]) == {"error": "x"}


def test_summarize_collapsed_profile() -> None:
    text = ("main (m.py:1);loop (l.py:2);poll (p.py:3) 5\n"
            "main (m.py:1);loop (l.py:2);poll (p.py:4) 1\n"
            "main (m.py:1);handler (h.py:9) 3\n"
            "main (m.py:1);write (libc.so.6) 1\n"
            "thread (t.py:1);epoll_wait (libc.so.6) 5\n")
    s = bench_sidecar.summarize_collapsed(text, top=2)
    assert s["busy_samples"] == 10 and s["idle_samples"] == 5
    assert s["self"] == [("poll (p.py)", 0.6), ("handler (h.py)", 0.3)]
    assert s["self_by_file"] == [("p.py", 0.6), ("h.py", 0.3)]
    assert s["inclusive"] == [("loop (l.py)", 0.6), ("poll (p.py)", 0.6)]  # main (in every sample) left out
