"""Compatibility tier, written from Consul's HTTP API docs (agent, catalog, health): what a real
Consul server agent answers, endpoint by endpoint. Through py-consul where it has the call."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import consul
import pytest

from tests.integration.devagent.b_http import call
from tests.support import DevAgent, wait_for

pytestmark = pytest.mark.integration

Check = consul.Check


@pytest.fixture(scope="module")
def agent() -> Iterator[DevAgent]:
    a = DevAgent("-node", "compat-node")
    try:
        yield a
    finally:
        a.stop()


@pytest.fixture(scope="module")
def scripts() -> Iterator[DevAgent]:
    a = DevAgent("-node", "script-node", "-enable-script-checks")
    try:
        yield a
    finally:
        a.stop()


def _c(agent: DevAgent) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=agent.port)


# ----- the consul service and serfHealth -----
def test_catalog_lists_the_consul_service_as_a_server_does(agent: DevAgent) -> None:
    c = _c(agent)
    _, services = c.catalog.services()
    assert services["consul"] == []
    _, nodes = c.catalog.service("consul")
    [entry] = nodes
    assert (entry["Node"], entry["ServiceID"], entry["ServiceName"], entry["ServicePort"]) == (
        "compat-node", "consul", "consul", 8300)
    assert entry["ServiceAddress"] == "" and entry["ServiceMeta"]["raft_version"] == "3"
    _, node = c.catalog.node("compat-node")
    assert "consul" in node["Services"]
    _, health = c.health.service("consul", passing=True)
    [h] = health
    assert h["Service"]["ID"] == "consul" and [ch["CheckID"] for ch in h["Checks"]] == ["serfHealth"]
    # the agent does not hold it: not listed, not readable, not deregistrable through the agent
    assert "consul" not in c.agent.services()
    status, body, _ = call(agent.url, "GET", "/v1/agent/service/consul")
    assert (status, body) == (404, b"unknown service ID: consul")
    status, body, _ = call(agent.url, "PUT", "/v1/agent/service/deregister/consul")
    assert status == 404 and body.startswith(b'Unknown service ID "consul"')
    status, _, _ = call(agent.url, "GET", "/v1/agent/health/service/id/consul")
    assert status == 404
    # registering a check for it through the agent fails as for any service the agent does not hold
    status, body, _ = call(agent.url, "PUT", "/v1/agent/check/register",
                           {"Name": "x", "TTL": "10s", "ServiceID": "consul"})
    assert (status, body) == (404, b'ServiceID "consul" does not exist')
    _, services = c.catalog.services()
    assert "consul" in services  # still there


def test_node_checks_in_health_answers_but_not_in_agent_checks(agent: DevAgent) -> None:
    c = _c(agent)
    assert c.agent.checks() == {}
    _, state = c.health.state("any")
    assert [ch["CheckID"] for ch in state] == ["serfHealth"]
    assert state[0]["Name"] == "Serf Health Status" and state[0]["ServiceID"] == ""
    _, checks = c.health.node("compat-node")
    assert [ch["CheckID"] for ch in checks] == ["serfHealth"]
    c.agent.service.register("multi", service_id="multi-1", check=Check.ttl("10s"),
                             extra_checks=[Check.ttl("10s"), Check.ttl("10s")])
    try:
        _, nodes = c.health.service("multi")
        assert {ch["CheckID"] for n in nodes for ch in n["Checks"]} == {
            "service:multi-1:1", "service:multi-1:2", "service:multi-1:3", "serfHealth"}
        assert {ch["ServiceID"] for n in nodes for ch in n["Checks"]} == {"multi-1", ""}
        _, service_checks = c.health.checks("multi")
        assert [ch["CheckID"] for ch in service_checks] == [
            "service:multi-1:1", "service:multi-1:2", "service:multi-1:3"]
        assert set(c.agent.checks()) == {"service:multi-1:1", "service:multi-1:2", "service:multi-1:3"}
        status, _, _ = call(agent.url, "PUT", "/v1/agent/check/deregister/serfHealth")
        assert status == 404  # the node check is the server's
        status, _, _ = call(agent.url, "PUT", "/v1/agent/check/pass/serfHealth")
        assert status == 404
    finally:
        c.agent.service.deregister("multi-1")


def test_node_maintenance_makes_every_instance_fail_passing(agent: DevAgent) -> None:
    c = _c(agent)
    c.agent.service.register("maint", service_id="maint-1", check=Check.ttl("10s"))
    c.agent.check.ttl_pass("service:maint-1")
    try:
        assert [n["Service"]["ID"] for n in c.health.service("maint", passing=True)[1]] == ["maint-1"]
        c.agent.maintenance("true", "work")
        assert c.health.service("maint", passing=True)[1] == []
        assert c.health.service("consul", passing=True)[1] == []  # a node check covers every service
    finally:
        c.agent.maintenance("false")
        c.agent.service.deregister("maint-1")


# ----- initial check statuses -----
def test_initial_status_of_each_check(agent: DevAgent) -> None:
    body: dict[str, Any] = {"Name": "init", "ID": "init-1", "Port": 1, "Checks": [
        {"TTL": "30s"},
        {"TTL": "30s", "Status": "passing"},
        {"TTL": "30s", "Status": "warning"},
        {"CheckID": "init-http", "HTTP": "http://127.0.0.1:1/", "Interval": "1h", "Status": "passing"},
        {"CheckID": "init-alias", "AliasService": "init-1"},
    ]}
    status, _, _ = call(agent.url, "PUT", "/v1/agent/service/register", body)
    assert status == 200
    c = _c(agent)
    try:
        checks = c.agent.checks()
        assert [checks[f"service:init-1:{i}"]["Status"] for i in (1, 2, 3)] == ["critical", "passing", "warning"]
        assert checks["service:init-1:1"]["Name"] == "Service 'init' check"
        # the HTTP check starts as told and then runs: a refused connection turns it critical
        wait_for(lambda: c.agent.checks()["init-http"]["Status"] == "critical", timeout=15, what="http probe")
        # a re-registration keeps each check's current state, whatever Status it gives
        c.agent.check.ttl_pass("service:init-1:1", "ok")
        body["Checks"][0] = {"TTL": "30s", "Status": "critical"}
        call(agent.url, "PUT", "/v1/agent/service/register", body)
        chk = c.agent.checks()["service:init-1:1"]
        assert (chk["Status"], chk["Output"]) == ("passing", "ok")
        # an invalid Status is refused before anything is stored
        status, text, _ = call(agent.url, "PUT", "/v1/agent/service/register",
                               {"Name": "bad", "Check": {"TTL": "10s", "Status": "fine"}})
        assert (status, text) == (400, b"Status for checks must 'passing', 'warning', 'critical'")
        status, text, _ = call(agent.url, "PUT", "/v1/agent/check/register",
                               {"Name": "bad", "TTL": "10s", "Status": "fine"})
        assert (status, text) == (400, b"Bad check status")
        assert "bad" not in c.agent.services()
    finally:
        c.agent.service.deregister("init-1")


# ----- Locality -----
def test_locality_round_trips(agent: DevAgent) -> None:
    loc = {"Region": "eu-west-1", "Zone": "eu-west-1b"}
    status, _, _ = call(agent.url, "PUT", "/v1/agent/service/register",
                        {"Name": "loc", "ID": "loc-1", "Port": 5, "Locality": loc})
    assert status == 200
    try:
        assert _c(agent).agent.services()["loc-1"]["Locality"] == loc
        _, body, _ = call(agent.url, "GET", "/v1/agent/service/loc-1")
        assert body["Locality"] == loc
        _, body, _ = call(agent.url, "GET", "/v1/catalog/service/loc")
        assert body[0]["ServiceLocality"] == loc
        _, body, _ = call(agent.url, "GET", "/v1/health/service/loc")
        assert body[0]["Service"]["Locality"] == loc
        _, body, _ = call(agent.url, "GET", "/v1/catalog/node-services/compat-node")
        assert [s["Locality"] for s in body["Services"] if s["ID"] == "loc-1"] == [loc]
    finally:
        call(agent.url, "PUT", "/v1/agent/service/deregister/loc-1")
    status, body, _ = call(agent.url, "PUT", "/v1/catalog/register", {
        "Node": "ext-1", "Address": "10.0.0.9", "Locality": {"Region": "r1"},
        "Service": {"Service": "ext", "Port": 80, "Locality": {"Region": "r1", "Zone": "z2"}}})
    assert (status, body) == (200, True)
    try:
        _, body, _ = call(agent.url, "GET", "/v1/catalog/node/ext-1")
        assert body["Node"]["Locality"] == {"Region": "r1"}
        assert body["Services"]["ext"]["Locality"] == {"Region": "r1", "Zone": "z2"}
    finally:
        call(agent.url, "PUT", "/v1/catalog/deregister", {"Node": "ext-1"})
    status, text, _ = call(agent.url, "PUT", "/v1/agent/service/register", {"Name": "l", "Locality": ["x"]})
    assert status == 400 and text.startswith(b"Request decode failed: Locality")


# ----- script checks -----
def test_script_checks_are_refused_by_default(agent: DevAgent) -> None:
    words = (b"Scripts are disabled on this agent from remote calls; to enable, configure "
             b"'enable_script_checks' to true")
    status, body, _ = call(agent.url, "PUT", "/v1/agent/check/register",
                           {"Name": "s", "Args": ["/bin/true"], "Interval": "10s"})
    assert (status, body) == (500, words)
    status, body, _ = call(agent.url, "PUT", "/v1/agent/service/register",
                           {"Name": "s", "Check": {"Args": ["/bin/true"], "Interval": "10s"}})
    assert (status, body) == (500, words)
    assert "s" not in _c(agent).agent.services() and _c(agent).agent.checks() == {}


def _status(agent: DevAgent, cid: str) -> dict[str, Any]:
    return dict(_c(agent).agent.checks().get(cid) or {})


def test_script_checks_run_with_enable_script_checks(scripts: DevAgent) -> None:
    c = _c(scripts)
    py = sys.executable
    assert c.agent.check.register("script_check", Check.script(["/bin/true"], "1s")) is True
    wait_for(lambda: _status(scripts, "script_check").get("Status") == "passing", timeout=15, what="script pass")
    assert c.agent.checks()["script_check"]["Type"] == "script"
    c.agent.check.deregister("script_check")
    code_of = {"warn": 1, "crit": 2}
    for name, code in code_of.items():
        c.agent.check.register(name, Check.script([py, "-c", f"print('{name}'); raise SystemExit({code})"], "1s"))
    wait_for(lambda: _status(scripts, "warn").get("Status") == "warning", timeout=15, what="script warning")
    wait_for(lambda: _status(scripts, "crit").get("Status") == "critical"
             and _status(scripts, "crit").get("Output") == "crit\n", timeout=15, what="script critical")
    assert _status(scripts, "warn")["Output"] == "warn\n"
    for name in code_of:
        c.agent.check.deregister(name)
    # a service's script check, bounded output, and a timeout
    status, _, _ = call(scripts.url, "PUT", "/v1/agent/service/register", {
        "Name": "sc", "ID": "sc-1", "Checks": [
            {"CheckID": "loud", "Args": [py, "-c", "print('y' * 50000)"], "Interval": "1s", "OutputMaxSize": 100},
            {"CheckID": "slow", "Args": [py, "-c", "import time; time.sleep(60)"], "Interval": "10s",
             "Timeout": "300ms"}]})
    assert status == 200
    wait_for(lambda: _status(scripts, "loud").get("Status") == "passing", timeout=15, what="loud script")
    assert _status(scripts, "loud")["Output"].startswith("Captured 100 of 50001 bytes")
    wait_for(lambda: _status(scripts, "slow").get("Output", "").startswith("Timed out (300ms) running check"),
             timeout=15, what="script timeout")
    assert _status(scripts, "slow")["Status"] == "critical"
    c.agent.service.deregister("sc-1")
    assert c.agent.checks() == {}
    # the agent still answers after all that
    time.sleep(0.1)
    assert c.status.leader()


def test_local_script_checks_do_not_open_the_http_api() -> None:
    a = DevAgent("-enable-local-script-checks")
    try:
        status, body, _ = call(a.url, "PUT", "/v1/agent/check/register",
                               {"Name": "s", "Args": ["/bin/true"], "Interval": "10s"})
        assert status == 500 and body.startswith(b"Scripts are disabled on this agent from remote calls")
    finally:
        a.stop()


# ----- metrics, monitor, force-leave -----
def test_metrics_json_shape_and_real_numbers(agent: DevAgent) -> None:
    c = _c(agent)
    c.kv.put("metrics/probe", "1")
    status, body, _ = call(agent.url, "GET", "/v1/agent/metrics")
    assert status == 200 and set(body) == {"Timestamp", "Gauges", "Points", "Counters", "Samples"}
    assert body["Timestamp"].endswith(" +0000 UTC")
    gauges = {g["Name"]: g["Value"] for g in body["Gauges"]}
    assert gauges["consul.state.nodes"] == 1 and gauges["consul.state.kv_entries"] >= 1
    assert gauges["consul.runtime.alloc_bytes"] > 1_000_000 and gauges["consul.runtime.num_goroutines"] >= 1
    assert gauges["consul.server.isLeader"] == 1
    for s in body["Samples"]:
        assert set(s) == {"Name", "Count", "Rate", "Sum", "Min", "Max", "Mean", "Stddev", "Labels"}
    status, text, headers = call(agent.url, "GET", "/v1/agent/metrics?format=prometheus")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"# TYPE consul_state_nodes gauge\nconsul_state_nodes 1\n" in text
    assert b'consul_api_http_count{method="PUT",path="v1_kv_"}' in text  # the PUT above, counted
    status, text, _ = call(agent.url, "GET", "/v1/agent/metrics",
                           headers={"Accept": "application/openmetrics-text"})
    assert status == 200 and text.startswith(b"# HELP")


def test_prometheus_off_as_consul_default() -> None:
    a = DevAgent("-prometheus-retention-time", "0s")
    try:
        status, body, _ = call(a.url, "GET", "/v1/agent/metrics?format=prometheus")
        assert (status, body) == (415, b"Prometheus is not enabled since its retention time is not positive")
        assert call(a.url, "GET", "/v1/agent/metrics")[0] == 200
    finally:
        a.stop()


def test_monitor_streams_log_lines(agent: DevAgent) -> None:
    import http.client
    import json

    status, body, _ = call(agent.url, "GET", "/v1/agent/monitor?loglevel=verbose")
    assert (status, body) == (400, b"Unknown log level: verbose")
    conns = []
    try:
        for query in ("loglevel=warn", "loglevel=debug&logjson"):
            conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=20)
            conn.request("GET", f"/v1/agent/monitor?{query}")
            resp = conn.getresponse()
            assert resp.status == 200
            conns.append((conn, resp))
        c = _c(agent)
        c.agent.check.register("mon-ttl", Check.ttl("1s"))
        c.agent.check.ttl_pass("mon-ttl")  # expires a second later: a WARN line
        text_line = conns[0][1].readline().decode()
        assert " [WARN]  agent: check TTL expired: check=mon-ttl" in text_line
        doc = json.loads(conns[1][1].readline())
        assert doc["@level"] == "warn" and doc["@message"] == "check TTL expired" and doc["check"] == "mon-ttl"
        c.agent.check.deregister("mon-ttl")
    finally:
        for conn, _ in conns:
            conn.close()
    # the agent keeps serving after the monitors left
    wait_for(lambda: call(agent.url, "GET", "/v1/agent/self")[0] == 200, timeout=5, what="agent answers")


def test_force_leave_as_consul(agent: DevAgent) -> None:
    status, body, _ = call(agent.url, "PUT", "/v1/agent/force-leave/no-such-node")
    assert (status, body) == (500, b"agent: No node found with name 'no-such-node'")
    status, body, _ = call(agent.url, "PUT", "/v1/agent/force-leave/no-such-node?prune")
    assert (status, body) == (500, b"agent: No node found with name 'no-such-node'")
    assert call(agent.url, "PUT", "/v1/agent/force-leave/compat-node?prune")[0] == 200
    assert call(agent.url, "PUT", "/v1/agent/force-leave/other.dc1?wan")[0] == 200
    assert call(agent.url, "GET", "/v1/agent/force-leave/compat-node")[0] == 405
    assert _c(agent).status.leader()  # still the leader, still serving


# ----- peer, cached, stale, consistent -----
def test_unknown_peer_filters_everything_out(agent: DevAgent) -> None:
    c = _c(agent)
    c.agent.service.register("foo", service_id="foo:1", check=Check.ttl("10s"))
    try:
        assert c.health.service("foo", peer="non-existent-peer")[1] == []
        assert [n["Service"]["ID"] for n in c.health.service("foo")[1]] == ["foo:1"]
        for path, empty in (("/v1/catalog/services", {}), ("/v1/catalog/service/foo", []),
                            ("/v1/catalog/nodes", []), ("/v1/health/checks/foo", []),
                            ("/v1/health/node/compat-node", []), ("/v1/health/state/any", []),
                            ("/v1/health/connect/foo", []), ("/v1/catalog/node/compat-node", None)):
            status, body, headers = call(agent.url, "GET", f"{path}?peer=nope")
            assert (status, body) == (200, empty), path
            assert int(headers["X-Consul-Index"]) >= 1
        status, body, _ = call(agent.url, "GET", "/v1/catalog/services?peer=")
        assert "foo" in body  # an empty peer is the local cluster
    finally:
        c.agent.service.deregister("foo:1")


def test_cached_reports_consuls_cache_headers(agent: DevAgent) -> None:
    for path in ("/v1/catalog/services", "/v1/catalog/service/consul", "/v1/health/service/consul",
                 "/v1/health/connect/consul", "/v1/health/ingress/consul"):
        status, _, first = call(agent.url, "GET", f"{path}?cached")
        assert status == 200 and first["X-Cache"] == "MISS" and "Age" not in first, path
        status, _, second = call(agent.url, "GET", f"{path}?cached")
        assert (second["X-Cache"], second["Age"]) == ("HIT", "0"), path
        _, _, plain = call(agent.url, "GET", path)
        assert "X-Cache" not in plain
    # a blocking ?cached query that has to wait for newer data is not a hit
    _, _, h = call(agent.url, "GET", "/v1/catalog/services?cached")
    index = h["X-Consul-Index"]
    status, _, h = call(agent.url, "GET", f"/v1/catalog/services?cached&index={index}&wait=100ms")
    assert status == 200 and h["X-Cache"] == "MISS"


def test_consistency_modes(agent: DevAgent) -> None:
    for mode, effective in (("stale", "stale"), ("consistent", "consistent"), ("", "leader")):
        status, _, h = call(agent.url, "GET", f"/v1/catalog/nodes?{mode}")
        assert status == 200
        assert (h["X-Consul-KnownLeader"], h["X-Consul-LastContact"]) == ("true", "0")
        assert h["X-Consul-Effective-Consistency"] == effective
    status, body, _ = call(agent.url, "GET", "/v1/health/service/consul?stale&consistent")
    assert (status, body) == (400, b"Cannot specify ?stale with ?consistent, conflicting semantics.")
    assert call(agent.url, "GET", "/v1/status/leader")[0] == 200
