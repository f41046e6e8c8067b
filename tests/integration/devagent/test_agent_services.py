"""Agent services and checks against a real dev agent, through py-consul and raw HTTP."""

from __future__ import annotations

import threading
import time
from typing import Any
from urllib.parse import quote

import consul
import pytest

from tests.integration.devagent.b_http import call
from tests.support import DevAgent, wait_for

pytestmark = pytest.mark.integration


def _c(agent: DevAgent) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=agent.port)


def test_register_with_sidecar_expansion(module_agent: DevAgent) -> None:
    c = _c(module_agent)
    c.agent.service.register(
        "orders", service_id="orders-1", port=8080, tags=["v1"], meta={"version": "1"},
        connect={"SidecarService": {"Proxy": {"Upstreams": [{"DestinationName": "payments",
                                                               "LocalBindPort": 9191}]}}})
    services = c.agent.services()
    assert "orders-1" in services
    sc = services["orders-1-sidecar-proxy"]
    assert sc["Kind"] == "connect-proxy" and sc["Service"] == "orders-sidecar-proxy"
    assert 21000 <= sc["Port"] <= 21255
    assert sc["Proxy"]["DestinationServiceName"] == "orders"
    assert sc["Proxy"]["DestinationServiceID"] == "orders-1"
    assert sc["Proxy"]["LocalServiceAddress"] == "127.0.0.1" and sc["Proxy"]["LocalServicePort"] == 8080
    up = sc["Proxy"]["Upstreams"][0]
    assert up == {**up, "DestinationName": "payments", "LocalBindPort": 9191, "LocalBindAddress": "127.0.0.1",
                  "DestinationType": "service"}
    chks = c.agent.checks()
    listening = chks["service:orders-1-sidecar-proxy:1"]
    assert listening["Name"] == "Connect Sidecar Listening" and listening["Type"] == "tcp"
    assert listening["Definition"]["TCP"] == f"127.0.0.1:{sc['Port']}" and listening["Interval"] == "10s"
    alias = chks["service:orders-1-sidecar-proxy:2"]
    assert alias["Name"] == "Connect Sidecar Aliasing orders-1" and alias["Definition"]["AliasService"] == "orders-1"
    # snake_case body registers the same way; a second sidecar gets the next port
    status, _, _ = call(module_agent.url, "PUT", "/v1/agent/service/register", {
        "name": "billing", "id": "billing-1", "port": 7070,
        "connect": {"sidecar_service": {"proxy": {"upstreams": [{"destination_name": "orders",
                                                                   "local_bind_port": 9292}]}}}})
    assert status == 200
    sc2 = c.agent.services()["billing-1-sidecar-proxy"]
    assert sc2["Port"] != sc["Port"] and sc2["Proxy"]["Upstreams"][0]["LocalBindPort"] == 9292
    # the catalog sees the proxy as a connect instance of "orders"
    _, nodes = c.health.connect("orders")
    assert [n["Service"]["ID"] for n in nodes] == ["orders-1-sidecar-proxy"]
    assert nodes[0]["Service"]["Port"] == sc["Port"]
    # deregistering the parent removes the sidecar registered through SidecarService
    c.agent.service.deregister("orders-1")
    services = c.agent.services()
    assert "orders-1" not in services and "orders-1-sidecar-proxy" not in services
    assert not any(k.startswith("service:orders-1") for k in c.agent.checks())
    c.agent.service.deregister("billing-1")


def test_service_by_id_shape_hash_and_blocking(module_agent: DevAgent) -> None:
    c = _c(module_agent)
    c.agent.service.register("shape", service_id="shape-1", port=1234, tags=["a"])
    status, body, headers = call(module_agent.url, "GET", "/v1/agent/service/shape-1")
    assert status == 200
    digest = headers["X-Consul-ContentHash"]
    assert body["ContentHash"] == digest and body["ID"] == "shape-1" and body["Service"] == "shape"
    assert body["Weights"] == {"Passing": 1, "Warning": 1} and body["Datacenter"] == "dc1"
    status, body, _ = call(module_agent.url, "GET", "/v1/agent/service/none-such")
    assert status == 404 and body == b"unknown service ID: none-such"
    # a hash-blocking read waits for a change and answers the new definition
    result: dict[str, Any] = {}

    def block() -> None:
        result["r"] = call(module_agent.url, "GET", f"/v1/agent/service/shape-1?hash={digest}&wait=30s")

    t = threading.Thread(target=block)
    t.start()
    time.sleep(0.5)
    assert t.is_alive()
    c.agent.service.register("shape", service_id="shape-1", port=1235, tags=["a"])
    t.join(30)
    status, body, headers = result["r"]
    assert status == 200 and body["Port"] == 1235 and headers["X-Consul-ContentHash"] != digest
    # unchanged hash answers at the wait timeout with the same hash
    same = headers["X-Consul-ContentHash"]
    status, _, headers = call(module_agent.url, "GET", f"/v1/agent/service/shape-1?hash={same}&wait=200ms")
    assert status == 200 and headers["X-Consul-ContentHash"] == same
    c.agent.service.deregister("shape-1")


def test_services_and_checks_filter(module_agent: DevAgent) -> None:
    c = _c(module_agent)
    c.agent.service.register("flt", service_id="flt-1", port=1, meta={"version": "1"}, check=consul.Check.ttl("60s"))
    c.agent.service.register("flt", service_id="flt-2", port=2, meta={"version": "2"}, check=consul.Check.ttl("60s"))
    got = c.agent.services(filter_expr='Service == flt and Meta.version == "2"')
    assert list(got) == ["flt-2"]
    status, body, _ = call(module_agent.url, "GET", "/v1/agent/services?filter=" + quote('Meta.version == "1"'))
    assert status == 200 and list(body) == ["flt-1"]
    status, body, _ = call(module_agent.url, "GET", "/v1/agent/checks?filter=ServiceID%20%3D%3D%20flt-1")
    assert status == 200 and list(body) == ["service:flt-1"]
    status, body, _ = call(module_agent.url, "GET", "/v1/agent/services?filter=Service%20%3D%3D")
    assert status == 400 and body.startswith(b"Failed to create boolean expression evaluator")
    c.agent.service.deregister("flt-1")
    c.agent.service.deregister("flt-2")


def test_ttl_updates_and_unknown_check(module_agent: DevAgent) -> None:
    c = _c(module_agent)
    c.agent.service.register("ttl", service_id="ttl-1", port=1, check=consul.Check.ttl("60s"))
    assert c.agent.checks()["service:ttl-1"]["Status"] == "critical"
    c.agent.check.ttl_pass("service:ttl-1", "all good")
    chk = c.agent.checks()["service:ttl-1"]
    assert chk["Status"] == "passing" and chk["Output"] == "all good"
    c.agent.check.ttl_warn("service:ttl-1", "meh")
    assert c.agent.checks()["service:ttl-1"]["Status"] == "warning"
    status, _, _ = call(module_agent.url, "PUT", "/v1/agent/check/update/service:ttl-1",
                        {"Status": "critical", "Output": "down"})
    chk = c.agent.checks()["service:ttl-1"]
    assert status == 200 and chk["Status"] == "critical" and chk["Output"] == "down"
    status, body, _ = call(module_agent.url, "PUT", "/v1/agent/check/update/service:ttl-1", {"Status": "bogus"})
    assert status == 400 and body == b"Invalid check status: 'bogus'"
    status, body, _ = call(module_agent.url, "PUT", "/v1/agent/check/pass/nope")
    assert status == 404
    assert body == b'Unknown check ID "nope". Ensure that the check ID is passed, not the check name.'
    assert not c.agent.check.ttl_pass("nope")
    # node-level check register/deregister
    assert c.agent.check.register("node-ttl", check=consul.Check.ttl("60s"), check_id="node-ttl")
    assert c.agent.checks()["node-ttl"]["ServiceID"] == ""
    assert c.agent.check.deregister("node-ttl")
    assert "node-ttl" not in c.agent.checks()
    status, body, _ = call(module_agent.url, "PUT", "/v1/agent/check/register",
                           {"Name": "x", "ServiceID": "ghost", "TTL": "5s"})
    assert status == 404 and body == b'ServiceID "ghost" does not exist'
    c.agent.service.deregister("ttl-1")


def test_maintenance_modes(module_agent: DevAgent) -> None:
    c = _c(module_agent)
    c.agent.service.register("mnt", service_id="mnt-1", port=1)
    assert c.agent.service.maintenance("mnt-1", True, "upgrading")
    chk = c.agent.checks()["_service_maintenance:mnt-1"]
    assert chk["Status"] == "critical" and chk["Notes"] == "upgrading" and chk["Name"] == "Service Maintenance Mode"
    _, nodes = c.health.service("mnt", passing=True)
    assert nodes == []
    assert c.agent.service.maintenance("mnt-1", False)
    assert "_service_maintenance:mnt-1" not in c.agent.checks()
    status, body, _ = call(module_agent.url, "PUT", "/v1/agent/service/maintenance/mnt-1")
    assert status == 400 and body == b"Missing value for enable"
    status, _, _ = call(module_agent.url, "PUT", "/v1/agent/service/maintenance/ghost?enable=true")
    assert status == 404
    assert c.agent.maintenance(True, "node work")
    assert c.agent.checks()["_node_maintenance"]["Notes"] == "node work"
    assert c.agent.maintenance(False)
    assert "_node_maintenance" not in c.agent.checks()
    c.agent.service.deregister("mnt-1")


def test_validation_errors_answer_400_and_agent_keeps_serving(module_agent: DevAgent) -> None:
    url = module_agent.url
    cases: list[tuple[Any, bytes]] = [
        (b"{not json", b"Request decode failed"),
        (b"", b"Request decode failed: EOF"),
        ({"Port": 1}, b"Missing service name"),
        ({"Name": "x", "Address": "0.0.0.0"}, b"Invalid service address"),
        ({"Name": "x", "Port": "eighty"}, b"Request decode failed"),
        ({"Name": "x", "Check": {"HTTP": "http://127.0.0.1:1/"}}, b"Invalid check: Interval must be > 0"),
        ({"Name": "x", "Kind": "connect-proxy", "Port": 1}, b"Validation failed: 1 error occurred:"),
        ({"Name": "x", "Check": {"TTL": "1s", "Status": "sideways"}},
         b"Status for checks must 'passing', 'warning', 'critical'"),
    ]
    for body, want in cases:
        status, got, _ = call(url, "PUT", "/v1/agent/service/register", body)
        assert status == 400, (body, got)
        assert isinstance(got, bytes) and got.startswith(want), (body, got)
    status, got, _ = call(url, "PUT", "/v1/agent/service/deregister/never")
    assert status == 404 and got.startswith(b'Unknown service ID "never"')
    status, _, _ = call(url, "GET", "/v1/agent/services")
    assert status == 200


def test_agent_health_by_id_and_name(module_agent: DevAgent) -> None:
    c = _c(module_agent)
    c.agent.service.register("ah", service_id="ah-1", port=1, check=consul.Check.ttl("60s"))
    c.agent.service.register("ah", service_id="ah-2", port=2, check=consul.Check.ttl("60s"))
    c.agent.check.ttl_pass("service:ah-1")
    status, body, _ = call(module_agent.url, "GET", "/v1/agent/health/service/id/ah-1")
    assert status == 200 and body["AggregatedStatus"] == "passing" and body["Service"]["ID"] == "ah-1"
    c.agent.check.ttl_warn("service:ah-2")
    status, body, _ = call(module_agent.url, "GET", "/v1/agent/health/service/name/ah")
    assert status == 429 and {e["AggregatedStatus"] for e in body} == {"passing", "warning"}
    status, body, _ = call(module_agent.url, "GET", "/v1/agent/health/service/id/ah-2?format=text")
    assert status == 429 and body == b"warning"
    status, body, _ = call(module_agent.url, "GET", "/v1/agent/health/service/id/nothing")
    assert status == 404 and body["AggregatedStatus"] == "critical"
    c.agent.service.deregister("ah-1")
    c.agent.service.deregister("ah-2")


def test_services_checks_and_intentions_survive_a_restart(tmp_path: Any) -> None:
    data = tmp_path / "data"
    first = DevAgent(data_dir=data)
    try:
        c = _c(first)
        c.agent.service.register("keep", service_id="keep-1", port=5, check=consul.Check.ttl("1s"),
                                 connect={"SidecarService": {}})
        c.agent.check.ttl_pass("service:keep-1")
        assert call(first.url, "PUT", "/v1/connect/intentions/exact?source=a&destination=keep",
                    {"Action": "allow"})[1] is True
        port = first.port
    finally:
        first.stop()
    second = DevAgent(data_dir=data, port=port)
    try:
        c = _c(second)
        services = c.agent.services()
        assert "keep-1" in services and "keep-1-sidecar-proxy" in services
        assert c.connect.intentions.read("a", "keep")["Action"] == "allow"
        # the TTL check runs again after the restart: it expires
        wait_for(lambda: c.agent.checks()["service:keep-1"]["Status"] == "critical", timeout=30, what="TTL expiry")
        # deregistering still removes the sidecar registered through SidecarService
        c.agent.service.deregister("keep-1")
        assert "keep-1-sidecar-proxy" not in c.agent.services()
    finally:
        second.stop()


def test_reregistration_and_replace_existing_checks(module_agent: DevAgent) -> None:
    c = _c(module_agent)
    url = module_agent.url
    body = {"Name": "rr", "ID": "rr-1", "Port": 1, "Checks": [{"TTL": "60s"}, {"TTL": "60s", "CheckID": "rr-extra"}]}
    assert call(url, "PUT", "/v1/agent/service/register", body)[0] == 200
    c.agent.check.ttl_pass("service:rr-1:1", "kept")
    # re-registering keeps the state of an unchanged check and leaves other checks alone
    assert call(url, "PUT", "/v1/agent/service/register", {**body, "Tags": ["new"]})[0] == 200
    chk = c.agent.checks()["service:rr-1:1"]
    assert chk["Status"] == "passing" and chk["Output"] == "kept" and chk["ServiceTags"] == ["new"]
    # a check registered for the service is attached to it
    assert c.agent.check.register("side", check=consul.Check.ttl("60s"), check_id="rr-side", service_id="rr-1")
    assert c.agent.checks()["rr-side"]["ServiceName"] == "rr"
    # replace-existing-checks drops the checks the new definition does not name
    assert call(url, "PUT", "/v1/agent/service/register?replace-existing-checks",
                {"Name": "rr", "ID": "rr-1", "Port": 1, "Check": {"TTL": "60s"}})[0] == 200
    ids = {k for k in c.agent.checks() if k.startswith(("service:rr-1", "rr-"))}
    assert ids == {"service:rr-1"}
    c.agent.service.deregister("rr-1")
