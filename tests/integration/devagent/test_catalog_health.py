"""Catalog and health endpoints: registration through the catalog, ``passing`` semantics, tags,
filters, and blocking queries that wake on a change of THAT service only."""

from __future__ import annotations

import threading
import time
from typing import Any
from urllib.parse import quote

import consul
import pytest

from tests.integration.devagent.b_http import call
from tests.support import DevAgent

pytestmark = pytest.mark.integration


def _c(agent: DevAgent) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=agent.port)


def _ids(entries: list[dict[str, Any]]) -> list[str]:
    return sorted(e["Service"]["ID"] for e in entries)


def test_catalog_register_read_deregister(module_agent: DevAgent) -> None:
    c = _c(module_agent)
    status, body, _ = call(module_agent.url, "PUT", "/v1/catalog/register", {
        "Node": "ext-node", "Address": "10.1.2.3", "NodeMeta": {"rack": "r1"},
        "Service": {"Service": "extsvc", "ID": "ext-1", "Port": 80, "Tags": ["blue"]},
        "Check": {"CheckID": "ext-check", "Name": "ext", "Status": "passing", "ServiceID": "ext-1"}})
    assert (status, body) == (200, True)
    # py-consul's register (node metadata goes in the query string, which Consul ignores)
    assert c.catalog.register("ext-node", "10.1.2.3", service={"Service": "extsvc", "ID": "ext-1", "Port": 80,
                                                                "Tags": ["blue"]}, skip_node_update=True)
    assert c.catalog.datacenters() == ["dc1"]
    _, nodes = c.catalog.nodes()
    ext = next(n for n in nodes if n["Node"] == "ext-node")
    assert ext["Address"] == "10.1.2.3" and ext["Meta"] == {"rack": "r1"}
    _, services = c.catalog.services()
    assert services["extsvc"] == ["blue"]
    _, instances = c.catalog.service("extsvc")
    assert instances[0]["ServiceID"] == "ext-1" and instances[0]["Address"] == "10.1.2.3"
    assert instances[0]["ServicePort"] == 80 and instances[0]["NodeMeta"] == {"rack": "r1"}
    _, tagged = c.catalog.service("extsvc", tag="green")
    assert tagged == []
    _, node = c.catalog.node("ext-node")
    assert list(node["Services"]) == ["ext-1"] and node["Node"]["Node"] == "ext-node"
    status, body, _ = call(module_agent.url, "GET", "/v1/catalog/node-services/ext-node")
    assert status == 200 and [s["ID"] for s in body["Services"]] == ["ext-1"]
    _, health = c.health.service("extsvc", passing=True)
    assert _ids(health) == ["ext-1"]
    _, node_checks = c.health.node("ext-node")
    assert [ch["CheckID"] for ch in node_checks] == ["ext-check"]
    assert c.catalog.deregister("ext-node", service_id="ext-1")
    assert c.catalog.service("extsvc")[1] == []
    assert c.catalog.deregister("ext-node")
    assert all(n["Node"] != "ext-node" for n in c.catalog.nodes()[1])
    status, body, _ = call(module_agent.url, "PUT", "/v1/catalog/register", {"Node": "x"})
    assert status == 500 and body == b"Must provide address if SkipNodeUpdate is not set"
    status, body, _ = call(module_agent.url, "GET", "/v1/catalog/node-services/ghost-node")
    assert status == 200 and body == {"Node": None, "Services": None}
    _, missing = c.catalog.node("ghost-node")
    assert missing is None


def test_health_service_passing_semantics(module_agent: DevAgent) -> None:
    c = _c(module_agent)
    for i in (1, 2, 3):
        c.agent.service.register("pass", service_id=f"pass-{i}", port=i, tags=[f"t{i}", "all"],
                                 meta={"n": str(i)}, check=consul.Check.ttl("60s"))
    c.agent.check.ttl_pass("service:pass-1")
    c.agent.check.ttl_warn("service:pass-2")  # warning is not passing
    _, every = c.health.service("pass")
    assert _ids(every) == ["pass-1", "pass-2", "pass-3"]
    checks = {ch["CheckID"] for ch in every[0]["Checks"]}
    assert "serfHealth" in checks  # node checks are part of every entry
    _, passing = c.health.service("pass", passing=True)
    assert _ids(passing) == ["pass-1"]
    _, t2 = c.health.service("pass", tag="t2")
    assert _ids(t2) == ["pass-2"]
    status, body, _ = call(module_agent.url, "GET", "/v1/health/service/pass?tag=all&tag=t3")
    assert status == 200 and _ids(body) == ["pass-3"]
    status, body, _ = call(module_agent.url, "GET", "/v1/health/service/pass?filter=" + quote(
        'Service.Meta.n == "1" or Checks.Status == warning'))
    assert status == 200 and _ids(body) == ["pass-1", "pass-2"]
    status, body, _ = call(module_agent.url, "GET", "/v1/health/service/pass?filter=" + quote("Service.ID =="))
    assert status == 400
    # a failing node-level check makes every instance on the node non-passing
    assert c.agent.check.register("node-down", check=consul.Check.ttl("60s"), check_id="node-down")
    _, passing = c.health.service("pass", passing=True)
    assert passing == []
    assert c.agent.check.deregister("node-down")
    _, crit = c.health.state("critical")
    assert "service:pass-3" in {ch["CheckID"] for ch in crit}
    _, warn = c.health.state("warning")
    assert [ch["CheckID"] for ch in warn] == ["service:pass-2"]
    status, _, _ = call(module_agent.url, "GET", "/v1/health/state/bogus")
    assert status == 400
    _, svc_checks = c.health.checks("pass")
    assert sorted(ch["CheckID"] for ch in svc_checks) == ["service:pass-1", "service:pass-2", "service:pass-3"]
    for i in (1, 2, 3):
        c.agent.service.deregister(f"pass-{i}")


def test_blocking_health_query_wakes_only_for_its_service(module_agent: DevAgent) -> None:
    c = _c(module_agent)
    c.agent.service.register("watched", service_id="watched-1", port=1, check=consul.Check.ttl("60s"))
    c.agent.service.register("other", service_id="other-1", port=2, check=consul.Check.ttl("60s"))
    index, _ = c.health.service("watched")
    result: dict[str, Any] = {}

    def block() -> None:
        result["r"] = c.health.service("watched", index=index, wait="60s")

    t = threading.Thread(target=block)
    t.start()
    time.sleep(0.5)
    # changes elsewhere do not wake it
    c.agent.service.register("other", service_id="other-2", port=3)
    c.agent.check.ttl_pass("service:other-1")
    c.kv.put("unrelated", "x")
    time.sleep(1.0)
    assert t.is_alive()
    c.agent.check.ttl_pass("service:watched-1")
    t.join(30)
    assert not t.is_alive()
    new_index, entries = result["r"]
    assert int(new_index) > int(index)
    assert entries[0]["Checks"][-1]["Status"] == "passing"
    # the index is that of this service: other writes do not move it
    c.agent.service.register("other", service_id="other-3", port=4)
    again, _ = c.health.service("watched")
    assert again == new_index
    for sid in ("watched-1", "other-1", "other-2", "other-3"):
        c.agent.service.deregister(sid)


def test_connect_instances(module_agent: DevAgent) -> None:
    c = _c(module_agent)
    c.agent.service.register("app", service_id="app-1", port=8000, connect={"SidecarService": {"Port": 21900}})
    status, _, _ = call(module_agent.url, "PUT", "/v1/agent/service/register", {
        "Name": "native", "ID": "native-1", "Port": 9000, "Connect": {"Native": True}})
    assert status == 200
    status, _, _ = call(module_agent.url, "PUT", "/v1/agent/service/register", {
        "Name": "app-proxy", "ID": "app-proxy-2", "Kind": "connect-proxy", "Port": 21901, "Address": "127.0.0.2",
        "Proxy": {"DestinationServiceName": "app", "LocalServicePort": 8001}})
    assert status == 200
    _, entries = c.health.connect("app")
    assert _ids(entries) == ["app-1-sidecar-proxy", "app-proxy-2"]
    direct = next(e for e in entries if e["Service"]["ID"] == "app-proxy-2")
    assert direct["Service"]["Kind"] == "connect-proxy" and direct["Service"]["Port"] == 21901
    assert direct["Service"]["Address"] == "127.0.0.2"
    _, native = c.health.connect("native")
    assert _ids(native) == ["native-1"]
    status, body, _ = call(module_agent.url, "GET", "/v1/catalog/connect/app")
    assert status == 200 and sorted(s["ServiceID"] for s in body) == ["app-1-sidecar-proxy", "app-proxy-2"]
    for sid in ("app-1", "native-1", "app-proxy-2"):
        c.agent.service.deregister(sid)
    assert c.health.connect("app")[1] == []
    # no gateway config entry kinds are kept: Consul's answer without them
    assert call(module_agent.url, "GET", "/v1/health/ingress/app")[:2] == (200, [])
    assert call(module_agent.url, "GET", "/v1/catalog/gateway-services/gw")[:2] == (200, [])


def test_txn_node_service_check_ops(module_agent: DevAgent) -> None:
    url = module_agent.url
    ops = [
        {"Node": {"Verb": "set", "Node": {"Node": "txn-node", "Address": "10.9.9.9"}}},
        {"Service": {"Verb": "set", "Node": "txn-node", "Service": {"ID": "txn-1", "Service": "txnsvc", "Port": 80}}},
        {"Check": {"Verb": "set", "Check": {"Node": "txn-node", "CheckID": "txn-check", "Name": "c",
                                            "Status": "passing", "ServiceID": "txn-1"}}},
    ]
    status, body, _ = call(url, "PUT", "/v1/txn", ops)
    assert status == 200, body
    assert [next(iter(res)) for res in body["Results"]] == ["Node", "Service", "Check"]
    assert body["Results"][1]["Service"]["Service"] == "txnsvc"
    c = _c(module_agent)
    _, entries = c.health.service("txnsvc", passing=True)
    assert _ids(entries) == ["txn-1"]
    # all or nothing: a stale cas fails the whole transaction with Consul's words
    modify = body["Results"][1]["Service"]["ModifyIndex"]
    status, body, _ = call(url, "PUT", "/v1/txn", [
        {"Service": {"Verb": "delete", "Node": "txn-node", "Service": {"ID": "txn-1"}}},
        {"Service": {"Verb": "cas", "Node": "txn-node", "Service": {"ID": "x", "Service": "x", "ModifyIndex": 7}}},
    ])
    assert status == 409
    assert body["Errors"] == [{"OpIndex": 1, "What": 'failed to set service "x" on node "txn-node", index is stale'}]
    assert _ids(c.health.service("txnsvc")[1]) == ["txn-1"]
    status, body, _ = call(url, "PUT", "/v1/txn", [
        {"Service": {"Verb": "get", "Node": "txn-node", "Service": {"ID": "txn-1"}}}])
    assert status == 200 and body["Results"][0]["Service"]["ModifyIndex"] == modify
    status, body, _ = call(url, "PUT", "/v1/txn", [
        {"Service": {"Verb": "set", "Node": "ghost", "Service": {"Service": "g"}}}])
    assert status == 409 and body["Errors"][0]["What"] == "Missing node registration"
    status, body, _ = call(url, "PUT", "/v1/txn", [{"Node": {"Verb": "delete", "Node": {"Node": "txn-node"}}}])
    assert status == 200
    assert c.health.service("txnsvc")[1] == []
