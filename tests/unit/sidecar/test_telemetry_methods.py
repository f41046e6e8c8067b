from __future__ import annotations

import random

import pytest
from google.protobuf import descriptor_pb2

from sidecar import methods
from sidecar.telemetry import MAX_METHODS, AccessLog, Telemetry


def test_request_series_and_cached_children() -> None:
    t = Telemetry()
    t.request("outbound", "web", "api", "/p.S/M", "OK", 0.002)
    t.request("outbound", "web", "api", "/p.S/M", "OK", 0.004)
    text = t.render().decode()
    assert 'weft_requests_total{destination="api",direction="outbound",method="/p.S/M",source="web",status="OK"} 2.0' \
        in text
    assert "weft_request_duration_seconds_bucket" in text
    assert len(t.calls.series) == 1


def test_call_series_expose_what_prometheus_client_metrics_expose() -> None:
    """The plain-number series render as a prometheus_client Counter and Histogram would (less _created)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from sidecar.telemetry import _BUCKETS

    labels = ("direction", "source", "destination", "method", "status")
    reference = CollectorRegistry()
    counter = Counter("weft_requests_total", "Calls, HTTP requests and TCP connections proxied", labels,
                      registry=reference)
    histogram = Histogram("weft_request_duration_seconds", "Duration of proxied calls as seen by the sidecar",
                          labels, buckets=_BUCKETS, registry=reference)
    t = Telemetry()
    rng = random.Random(3)
    keys = [("outbound", "web", "api", "/p.S/M", "OK"), ("inbound", "web", "api", "GET /x", "503")]
    # every bound exactly, just above it, zero, and past the last bucket
    durations = [0.0, *_BUCKETS, *(b * 1.0001 for b in _BUCKETS), 42.0,
                 *(rng.uniform(0, 12) for _ in range(200))]
    for i, seconds in enumerate(durations):
        key = keys[i % 2]
        t.request(*key, seconds)
        counter.labels(*key).inc()
        histogram.labels(*key).observe(seconds)

    def series(text: str) -> dict[str, float]:
        out = {}
        for line in text.splitlines():
            if line.startswith(("weft_requests_total", "weft_request_duration_seconds_")) and "_created" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    ours, theirs = series(t.render().decode()), series(generate_latest(reference).decode())
    assert ours.keys() == theirs.keys() and len(ours) == 2 * (1 + len(_BUCKETS) + 1 + 2)
    assert all(ours[k] == pytest.approx(theirs[k]) for k in ours)
    assert t.calls.calls(keys[0]) == (len(durations) + 1) // 2


def test_a_call_is_recorded_once_in_metrics_tap_and_access_log() -> None:
    t = Telemetry(access_per_second=100.0, access_sample=1.0)  # every access line admitted
    finished: list[tuple[object, str, float]] = []
    lines: list[dict[str, object]] = []
    t.tap.finish = lambda rec, status, seconds: finished.append((rec, status, seconds))  # type: ignore[method-assign]
    t.access._log = type("L", (), {"info": lambda self, event, **f: lines.append(f)})()  # type: ignore[assignment]
    record = object()
    t.call_ended("inbound", "web", "api", "GET /items", "200", 0.01, record, "GET", "/items/7")  # type: ignore[arg-type]
    t.call_ended("outbound", "web", "api", "/p.S/M", "OK", 0.02, None, "/p.S/M")
    text = t.render().decode()
    assert 'direction="inbound",method="GET /items",source="web",status="200"} 1.0' in text
    assert 'direction="outbound",method="/p.S/M",source="web",status="OK"} 1.0' in text
    assert finished == [(record, "200", 0.01)]  # only the call that had a tap record
    assert [line.get("path") for line in lines] == ["/items/7", None]
    assert lines[1]["method"] == "/p.S/M" and lines[1]["duration_ms"] == 20.0


def test_unknown_methods_fold() -> None:
    t = Telemetry()
    known = {"/p.S/A"}
    assert t.method_label("api", "/p.S/A", known) == "/p.S/A"
    assert t.method_label("api", "/p.S/Garbage", known) == "unknown"
    # without a method table, at most MAX_METHODS distinct names, then "unknown"
    labels = {t.method_label("db", f"/x.Y/M{i}") for i in range(MAX_METHODS + 50)}
    assert len(labels) == MAX_METHODS + 1 and "unknown" in labels


def test_policy_version_info_replaces_old_label() -> None:
    t = Telemetry()
    t.set_policy_version("v1")
    t.set_policy_version("v2")
    text = t.render().decode()
    assert 'weft_policy_version_info{version="v2"} 1.0' in text and 'version="v1"' not in text


def test_authz_decisions() -> None:
    t = Telemetry()
    t.decision("deny", "web -> api (KV weft/intentions/api Sources[0])")
    assert 'weft_authz_decisions_total{decision="deny",rule="web -> api (KV weft/intentions/api Sources[0])"} 1.0' \
        in t.render().decode()


def test_access_log_rate_then_sample() -> None:
    log = AccessLog(per_second=2, sample=0.0, rng=random.Random(1))
    assert [log.admit(100.0) for _ in range(4)] == [True, True, False, False]
    assert log.admit(101.0)  # refilled
    assert AccessLog(per_second=0, sample=1.0).admit(0.0)
    with pytest.raises(ValueError):
        AccessLog(sample=2.0)


def file_with_service() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(name="x.proto", package="pkg.v1")
    svc = fd.service.add(name="Svc")
    svc.method.add(name="U", input_type=".pkg.v1.R", output_type=".pkg.v1.R")
    svc.method.add(name="S", input_type=".pkg.v1.R", output_type=".pkg.v1.R", server_streaming=True)
    svc.method.add(name="C", input_type=".pkg.v1.R", output_type=".pkg.v1.R", client_streaming=True)
    svc.method.add(name="B", input_type=".pkg.v1.R", output_type=".pkg.v1.R", client_streaming=True,
                   server_streaming=True)
    return fd


def test_methods_of_descriptor_set_and_round_trip() -> None:
    fds = descriptor_pb2.FileDescriptorSet(file=[file_with_service()])
    found = methods.methods_of_descriptor_set(fds.SerializeToString())
    assert found == {"/pkg.v1.Svc/U": "unary", "/pkg.v1.Svc/S": "server_stream", "/pkg.v1.Svc/C": "client_stream",
                     "/pkg.v1.Svc/B": "bidi_stream"}
    assert methods.decode(methods.encode("api", found)) == found
    assert methods.decode(None) == {}
    with pytest.raises(ValueError, match="weft/methods/api: not JSON"):
        methods.decode(b"{", key="weft/methods/api")
    with pytest.raises(ValueError, match="Methods object"):
        methods.decode(b"[]", key="k")
    with pytest.raises(ValueError, match="not a FileDescriptorSet"):
        methods.methods_of_descriptor_set(b"\xff\xff\xff")
