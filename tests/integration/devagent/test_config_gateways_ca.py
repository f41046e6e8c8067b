"""Config entries of every CE kind, write-time graph checks, gateway-services, health/ingress and the
Connect CA configuration, against a running dev agent (from Consul's API docs: /v1/config,
/v1/catalog/gateway-services, /v1/health/ingress, /v1/connect/ca/configuration)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import consul
import pytest

from tests.integration.devagent.b_http import call
from tests.support import DevAgent

pytestmark = pytest.mark.integration

MGMT = "6d2f0bd4-5b47-4d38-9d6e-0000000000aa"


def _c(agent: DevAgent, token: str | None = None) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=agent.port, token=token)


def test_every_kind_is_stored_listed_and_deleted(module_agent: DevAgent) -> None:
    url = module_agent.url
    c = _c(module_agent)
    entries: list[dict[str, Any]] = [
        {"Kind": "ingress-gateway", "Name": "ing-all", "Listeners": [{"Port": 8443, "Protocol": "tcp",
                                                                       "Services": [{"Name": "legacy"}]}]},
        {"Kind": "terminating-gateway", "Name": "term-all", "Services": [{"Name": "billing"}]},
        {"Kind": "api-gateway", "Name": "api-all", "Listeners": [{"Name": "l", "Port": 9443, "Protocol": "http"}]},
        {"Kind": "mesh", "TransparentProxy": {"MeshDestinationsOnly": True}},
        {"Kind": "exported-services", "Name": "default", "Services": [{"Name": "web", "Consumers": [{"Peer": "p"}]}]},
        {"Kind": "http-route", "Name": "hr", "Parents": [{"Name": "api-all"}],
         "Rules": [{"Services": [{"Name": "web"}]}]},
        {"Kind": "tcp-route", "Name": "tr", "Parents": [{"Name": "api-all"}], "Services": [{"Name": "db"}]},
        {"Kind": "jwt-provider", "Name": "okta", "JSONWebKeySet": {"Remote": {"URI": "https://example.com/jwks"}}},
        {"Kind": "file-system-certificate", "Name": "fs", "Certificate": "/c.pem", "PrivateKey": "/k.pem"},
    ]
    for entry in entries:
        status, body, _ = call(url, "PUT", "/v1/config", entry)
        assert (status, body) == (200, True), (entry, body)
    assert c.config.get("mesh", "mesh")["TransparentProxy"] == {"MeshDestinationsOnly": True}
    assert "Name" not in c.config.get("mesh", "mesh")
    ing = c.config.get("ingress-gateway", "ing-all")
    assert ing["Listeners"][0]["Services"] == [{"Name": "legacy"}] and ing["ModifyIndex"] > 0
    assert [e["Name"] for e in c.config.list("tcp-route")] == ["tr"]
    assert c.config.get("api-gateway", "api-all")["Status"] == {}
    # one gateway name per kind family, as Consul's checkGatewayClash
    status, body, _ = call(url, "PUT", "/v1/config", {"Kind": "terminating-gateway", "Name": "ing-all"})
    assert status == 500 and b'a "ingress-gateway" config entry with that name already exists' in body
    # sameness groups are Enterprise: Consul CE refuses them
    status, body, _ = call(url, "PUT", "/v1/config", {"Kind": "sameness-group", "Name": "sg"})
    assert (status, body) == (500, b"sameness-groups are an enterprise-only feature")
    for entry in entries:
        kind, name = entry["Kind"], str(entry.get("Name", "mesh"))
        assert c.config.delete(kind, name) is True
        assert c.config.get(kind, name) is None
    status, body, _ = call(url, "GET", "/v1/config/bogus-kind")
    assert (status, body) == (500, b"invalid config entry kind: bogus-kind")
    status, body, _ = call(url, "DELETE", "/v1/config/bogus-kind/x")
    assert (status, body) == (400, b"invalid config entry kind: bogus-kind")


def test_discovery_chain_entries_are_checked_across_entries_and_never_half_applied(module_agent: DevAgent) -> None:
    url = module_agent.url
    splitter = {"Kind": "service-splitter", "Name": "shop",
                "Splits": [{"Weight": 90, "ServiceSubset": "v1"}, {"Weight": 10, "ServiceSubset": "v2"}]}
    status, body, _ = call(url, "PUT", "/v1/config", {**splitter, "Splits": [{"Weight": 100}]})
    assert (status, body) == (500, b'discovery chain "shop" uses a protocol "tcp" that does not permit advanced '
                                   b"routing or splitting behavior")
    assert call(url, "PUT", "/v1/config", {"Kind": "service-defaults", "Name": "shop", "Protocol": "http"})[1] is True
    status, body, _ = call(url, "PUT", "/v1/config", splitter)
    assert (status, body) == (500, b'service "shop" does not have a subset named "v1"')
    assert call(url, "GET", "/v1/config/service-splitter/shop")[0] == 404  # nothing half-applied
    resolver = {"Kind": "service-resolver", "Name": "shop", "DefaultSubset": "v1",
                "Subsets": {"v1": {"Filter": "Service.Meta.version == 1"},
                            "v2": {"Filter": "Service.Meta.version == 2"}}}
    assert call(url, "PUT", "/v1/config", resolver)[1] is True
    assert call(url, "PUT", "/v1/config", splitter)[1] is True
    router = {"Kind": "service-router", "Name": "shop",
              "Routes": [{"Match": {"HTTP": {"PathPrefix": "/admin"}}, "Destination": {"ServiceSubset": "v2"}}]}
    assert call(url, "PUT", "/v1/config", router)[1] is True
    # the chain now needs HTTP: deleting the service-defaults that made it legal is refused (as Consul)
    status, body, _ = call(url, "DELETE", "/v1/config/service-defaults/shop")
    assert status == 500 and b"does not permit advanced routing or splitting behavior" in body
    # neither may the resolver lose a subset the splitter uses
    status, body, _ = call(url, "PUT", "/v1/config", {**resolver, "Subsets": {"v1": {}}, "DefaultSubset": "v1"})
    assert (status, body) == (500, b'service "shop" does not have a subset named "v2"')
    for kind in ("service-router", "service-splitter", "service-resolver", "service-defaults"):
        assert call(url, "DELETE", f"/v1/config/{kind}/shop")[0] == 200
    # a field of the wrong type is a decoding error (400); a value Validate refuses a 500
    status, body, _ = call(url, "PUT", "/v1/config", {"Kind": "service-resolver", "Name": "x", "Subsets": []})
    assert status == 400 and body.startswith(b"Request decoding failed: ")
    status, body, _ = call(url, "PUT", "/v1/config", {"Kind": "service-resolver", "Name": "x", "Redirect": {}})
    assert (status, body) == (500, b"Redirect is empty")
    # an L7 intention needs an HTTP-like destination, through the intentions API too
    l7 = {"Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]}
    status, body, _ = call(url, "PUT", "/v1/connect/intentions/exact?source=ui&destination=plain-tcp", l7)
    assert (status, body) == (500, b'service "plain-tcp" has protocol "tcp", which is incompatible with L7 '
                                   b"intentions permissions")
    assert call(url, "GET", "/v1/config/service-intentions/plain-tcp")[0] == 404


def test_hostile_config_bodies_get_a_400_and_the_agent_keeps_serving(module_agent: DevAgent) -> None:
    url = module_agent.url
    for body in [b"{", b"[]", b'"x"', b"null", json.dumps({"Kind": 7}).encode(),
                 json.dumps({"Kind": "service-router", "Name": "x", "Routes": [{"Match": 5}]}).encode(),
                 json.dumps({"Kind": "service-defaults", "Name": ["x"]}).encode()]:
        status, got, _ = call(url, "PUT", "/v1/config", body)
        assert status == 400, (body, got)
    status, _, _ = call(url, "PUT", "/v1/config", b"{" + b" " * (600 * 1024) + b"}")
    assert status == 413
    assert call(url, "GET", "/v1/status/leader")[0] == 200


def _register(url: str, node: str, svc: dict[str, object]) -> None:
    status, body, _ = call(url, "PUT", "/v1/catalog/register", {"Node": node, "Address": "10.0.0.9", "Service": svc})
    assert status == 200, body


def test_gateway_services_and_health_ingress(module_agent: DevAgent) -> None:
    url = module_agent.url
    for name in ("api", "web", "ledger"):
        _register(url, "gw-node", {"Service": name, "ID": name, "Port": 80})
    _register(url, "gw-node", {"Service": "ingress", "ID": "ingress", "Kind": "ingress-gateway", "Port": 8080})
    assert call(url, "PUT", "/v1/config", {"Kind": "service-defaults", "Name": "api", "Protocol": "http"})[1] is True
    # a listener whose service speaks another protocol is refused, in Consul's words
    bad = {"Kind": "ingress-gateway", "Name": "ingress",
           "Listeners": [{"Port": 8080, "Protocol": "http", "Services": [{"Name": "web"}]}]}
    status, body, _ = call(url, "PUT", "/v1/config", bad)
    assert (status, body) == (500, b'service "web" has protocol "tcp", which does not match defined listener '
                                   b'protocol "http"')
    ingress = {"Kind": "ingress-gateway", "Name": "ingress", "Listeners": [
        {"Port": 8080, "Protocol": "http", "Services": [{"Name": "api", "Hosts": ["api.example.com"]}]},
        {"Port": 9000, "Protocol": "tcp", "Services": [{"Name": "ledger"}]}]}
    assert call(url, "PUT", "/v1/config", ingress)[1] is True
    status, rows, headers = call(url, "GET", "/v1/catalog/gateway-services/ingress")
    assert status == 200 and int(headers["X-Consul-Index"]) >= 1
    assert [(g["Service"]["Name"], g["Port"], g["Protocol"]) for g in rows] == [("api", 8080, "http"),
                                                                                ("ledger", 9000, "tcp")]
    assert rows[0]["Gateway"] == {"Name": "ingress"} and rows[0]["GatewayKind"] == "ingress-gateway"
    assert rows[0]["Hosts"] == ["api.example.com"] and "Hosts" not in rows[1]
    # health/ingress lists the gateway's instances for a service it exposes
    status, nodes, _ = call(url, "GET", "/v1/health/ingress/api")
    assert status == 200 and [n["Service"]["ID"] for n in nodes] == ["ingress"]
    assert call(url, "GET", "/v1/health/ingress/web")[1] == []
    # terminating gateway with a wildcard: every typical service, explicit entries win
    term = {"Kind": "terminating-gateway", "Name": "egress",
            "Services": [{"Name": "*", "CAFile": "/ca.pem"}, {"Name": "ledger", "SNI": "ledger.internal"}]}
    assert call(url, "PUT", "/v1/config", term)[1] is True
    _, rows, _ = call(url, "GET", "/v1/catalog/gateway-services/egress")
    by_name = {g["Service"]["Name"]: g for g in rows}
    assert {"api", "web", "ledger"} <= set(by_name) and "ingress" not in by_name and "consul" not in by_name
    assert by_name["web"]["FromWildcard"] is True and by_name["web"]["CAFile"] == "/ca.pem"
    assert by_name["ledger"]["SNI"] == "ledger.internal" and "FromWildcard" not in by_name["ledger"]
    assert by_name["web"]["ServiceKind"] == "service" and by_name["web"]["GatewayKind"] == "terminating-gateway"
    # a newly registered service joins the wildcard (the answer follows the catalog)
    _, _, headers = call(url, "GET", "/v1/catalog/gateway-services/egress")
    _register(url, "gw-node", {"Service": "late", "ID": "late", "Port": 81})
    _, rows, _ = call(url, "GET", f"/v1/catalog/gateway-services/egress?index={headers['X-Consul-Index']}&wait=5s")
    assert "late" in {g["Service"]["Name"] for g in rows}
    assert call(url, "GET", "/v1/catalog/gateway-services/nothing")[1] == []
    for kind, name in (("ingress-gateway", "ingress"), ("terminating-gateway", "egress"), ("service-defaults", "api")):
        assert call(url, "DELETE", f"/v1/config/{kind}/{name}")[0] == 200


@pytest.fixture(scope="module")
def acl_agent() -> Iterator[DevAgent]:
    a = DevAgent("-acl-enabled", "-acl-initial-management", MGMT)
    try:
        yield a
    finally:
        a.stop()


def test_ca_configuration_reports_the_weft_ca(acl_agent: DevAgent) -> None:
    url = acl_agent.url
    c = _c(acl_agent, MGMT)
    conf = c.connect.ca.configuration(token=MGMT)
    assert conf["Provider"] == "weft" and conf["Config"]["LeafCertTTL"] == "72h"
    assert conf["State"]["Roots"] == "0" and conf["State"]["StateStored"] == "false"
    # the CA's state as it publishes it in KV
    roots = {"ActiveRootID": "ab:cd", "TrustDomain": "1234.consul", "Roots": [{"ID": "ab:cd", "Active": True}]}
    c.kv.put("weft/ca/roots", json.dumps(roots), token=MGMT)
    c.kv.put("weft/ca/state", json.dumps({"v": 1, "alg": "AES-256-GCM", "kek": "f00d", "nonce": "", "ct": ""}),
             token=MGMT)
    c.kv.put("weft/ca/cluster-id", "1234", token=MGMT)
    state = c.connect.ca.configuration(token=MGMT)["State"]
    assert state == {"ActiveRootID": "ab:cd", "TrustDomain": "1234.consul", "Roots": "1", "ClusterID": "1234",
                     "StateStored": "true", "LeaderLockHeld": "false", "StateSealedWith": "AES-256-GCM",
                     "StateKEKFingerprint": "f00d"}
    # same provider: the Config is stored; another provider: refused, nothing changes
    assert c.connect.ca.update_configuration(provider="weft", config={"LeafCertTTL": "24h"}, token=MGMT) is True
    updated = c.connect.ca.configuration(token=MGMT)
    assert updated["Config"]["LeafCertTTL"] == "24h" and updated["ModifyIndex"] > 0
    status, body, _ = call(url, "PUT", "/v1/connect/ca/configuration", {"Provider": "consul", "Config": {}}, token=MGMT)
    assert status == 400 and b'cannot be switched to "consul"' in body
    status, body, _ = call(url, "PUT", "/v1/connect/ca/configuration",
                           {"Provider": "weft", "Config": {"LeafCertTTL": "10m"}}, token=MGMT)
    assert (status, body) == (500, b"LeafCertTTL must be at least 1h")
    status, body, _ = call(url, "PUT", "/v1/connect/ca/configuration", b"{nope", token=MGMT)
    assert status == 400 and body.startswith(b"Request decode failed")
    assert c.connect.ca.configuration(token=MGMT)["Config"]["LeafCertTTL"] == "24h"
    # operator:read / operator:write, as Consul
    status, body, _ = call(url, "GET", "/v1/connect/ca/configuration")
    assert status == 403 and b"operator:read" in body
