"""Config entries (cas, 404s, list, blocking) and Connect: intentions through both APIs are one
store, match order, check, agent/connect/authorize, CA roots from KV."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import consul
import pytest

from tests.integration.devagent.b_http import call
from tests.support import DevAgent

pytestmark = pytest.mark.integration


def _c(agent: DevAgent) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=agent.port)


def test_config_entries_with_cas(module_agent: DevAgent) -> None:
    url = module_agent.url
    assert call(url, "PUT", "/v1/config", {"Kind": "service-defaults", "Name": "cfg", "Protocol": "grpc"})[1] is True
    status, entry, headers = call(url, "GET", "/v1/config/service-defaults/cfg")
    assert status == 200 and entry["Protocol"] == "grpc" and entry["ModifyIndex"] >= entry["CreateIndex"] > 0
    assert int(headers["X-Consul-Index"]) >= entry["ModifyIndex"]
    # cas=0 creates only; cas=<index> must match the current ModifyIndex
    assert call(url, "PUT", "/v1/config?cas=0", {"Kind": "service-defaults", "Name": "cfg", "Protocol": "http"})[1] \
        is False
    assert call(url, "PUT", "/v1/config?cas=1", {"Kind": "service-defaults", "Name": "cfg", "Protocol": "http"})[1] \
        is False
    assert call(url, "PUT", f"/v1/config?cas={entry['ModifyIndex']}",
                {"kind": "service-defaults", "name": "cfg", "protocol": "http"})[1] is True
    current = call(url, "GET", "/v1/config/service-defaults/cfg")[1]
    assert current["Protocol"] == "http"
    status, listed, _ = call(url, "GET", "/v1/config/service-defaults")
    assert status == 200 and [e["Name"] for e in listed] == ["cfg"]
    assert call(url, "DELETE", f"/v1/config/service-defaults/cfg?cas={entry['ModifyIndex']}")[1] is False
    assert call(url, "DELETE", f"/v1/config/service-defaults/cfg?cas={current['ModifyIndex']}")[1] is True
    status, body, _ = call(url, "GET", "/v1/config/service-defaults/cfg")
    assert status == 404 and body == b'Config entry not found for "service-defaults" / "cfg"'
    # py-consul against the same endpoints
    c = _c(module_agent)
    assert c.config.set("proxy-defaults", "global", {"Config": {"protocol": "grpc"}}) is True
    assert c.config.set("proxy-defaults", "global", {"Config": {}}, cas=1) is False
    assert c.config.get("proxy-defaults", "global")["Config"] == {"protocol": "grpc"}
    # errors in Consul's words: decoding failures are 400s, what Validate refuses a 500 (an RPC error)
    for body, code, want in [
        ({"Kind": "proxy-defaults", "Name": "x"}, 500, b'invalid name ("x"), only "global" is supported'),
        ({"Kind": "nope", "Name": "x"}, 400, b"Request decoding failed: invalid config entry kind: nope"),
        ({"Name": "x"}, 400, b"Request decoding failed: Payload does not contain a kind/Kind key at the top level"),
        ({"Kind": "service-splitter", "Name": "x", "Splits": [{"Weight": 50}]}, 500,
         b"the sum of all split weights must be 100, not 50.000000"),
        (b"[1,", 400, b"Request decoding failed"),
    ]:
        status, got, _ = call(url, "PUT", "/v1/config", body)
        assert status == code and got.startswith(want), (body, got)


def test_config_list_blocks_until_a_change_of_that_kind(module_agent: DevAgent) -> None:
    url = module_agent.url
    _, _, headers = call(url, "GET", "/v1/config/service-resolver")
    index = headers["X-Consul-Index"]
    result: dict[str, Any] = {}

    def block() -> None:
        result["r"] = call(url, "GET", f"/v1/config/service-resolver?index={index}&wait=30s")

    t = threading.Thread(target=block)
    t.start()
    time.sleep(0.5)
    assert call(url, "PUT", "/v1/config", {"Kind": "service-defaults", "Name": "r"})[1] is True
    time.sleep(0.5)
    assert t.is_alive()
    call(url, "PUT", "/v1/config", {"Kind": "service-resolver", "Name": "res", "DefaultSubset": "v1",
                                    "Subsets": {"v1": {"Filter": "Service.Meta.version == 1"}}})
    t.join(30)
    status, body, _ = result["r"]
    assert status == 200 and [e["Name"] for e in body] == ["res"]


def test_intentions_through_both_apis_are_one_store(module_agent: DevAgent) -> None:
    url = module_agent.url
    c = _c(module_agent)
    # config entry -> intentions API
    assert call(url, "PUT", "/v1/config", {"Kind": "service-intentions", "Name": "db",
                                           "Sources": [{"Name": "*", "Action": "deny"},
                                                       {"Name": "web", "Action": "allow"}]})[1] is True
    status, ixns, _ = call(url, "GET", "/v1/connect/intentions")
    mine = [(i["SourceName"], i["Action"], i["Precedence"]) for i in ixns if i["DestinationName"] == "db"]
    assert mine == [("web", "allow", 9), ("*", "deny", 8)]
    exact = c.connect.intentions.read("web", "db")
    assert exact["Action"] == "allow" and exact["SourceType"] == "consul"
    # exact PUT, as the UI sends it -> config entry
    status, ok, _ = call(url, "PUT", "/v1/connect/intentions/exact?source=default/default/api&"
                                     "destination=default/default/db&dc=dc1", {
                                         "SourceName": "api", "DestinationName": "db", "SourceNS": "default",
                                         "DestinationNS": "default", "SourcePartition": "default",
                                         "DestinationPartition": "default", "SourceType": "consul", "Meta": {},
                                         "Description": "from the UI", "Action": "deny"})
    assert (status, ok) == (200, True)
    entry = c.config.get("service-intentions", "db")
    assert sorted(s["Name"] for s in entry["Sources"]) == ["*", "api", "web"]
    assert next(s for s in entry["Sources"] if s["Name"] == "api")["Description"] == "from the UI"
    # legacy create -> the entry, with a stable ID readable by ID
    status, created, _ = call(url, "POST", "/v1/connect/intentions",
                              {"SourceName": "web", "DestinationName": "cache", "Action": "allow"})
    assert status == 200
    ixn_id = created["ID"]
    status, by_id, _ = call(url, "GET", f"/v1/connect/intentions/{ixn_id}")
    assert status == 200 and by_id["ID"] == ixn_id and by_id["DestinationName"] == "cache"
    cache_entry = c.config.get("service-intentions", "cache")
    assert cache_entry["Sources"][0]["LegacyID"] == ixn_id
    status, body, _ = call(url, "POST", "/v1/connect/intentions",
                           {"SourceName": "web", "DestinationName": "cache", "Action": "deny"})
    assert status == 500 and body.startswith(b"duplicate intention found: web => cache")
    # legacy update keeps the ID and shows in the entry
    status, _, _ = call(url, "PUT", f"/v1/connect/intentions/{ixn_id}",
                        {"SourceName": "web", "DestinationName": "cache", "Action": "deny", "Description": "no"})
    assert status == 200
    assert c.config.get("service-intentions", "cache")["Sources"][0]["Action"] == "deny"
    assert call(url, "GET", f"/v1/connect/intentions/{ixn_id}")[1]["Action"] == "deny"
    # config entry write -> legacy view; delete through either API
    assert call(url, "DELETE", f"/v1/connect/intentions/{ixn_id}")[1] is True
    assert call(url, "GET", f"/v1/connect/intentions/{ixn_id}")[0] == 404
    assert call(url, "GET", "/v1/config/service-intentions/cache")[0] == 404
    assert c.connect.intentions.delete("api", "db")
    assert sorted(s["Name"] for s in c.config.get("service-intentions", "db")["Sources"]) == ["*", "web"]
    assert call(url, "GET", "/v1/connect/intentions/exact?source=api&destination=db")[:2] == \
        (404, b"Intention not found")
    # bad bodies
    status, body, _ = call(url, "PUT", "/v1/connect/intentions/exact?source=a&destination=b", {"Action": "maybe"})
    assert status == 400 and body == b"Sources[0].Action must be set to 'allow' or 'deny'"
    status, body, _ = call(url, "PUT", "/v1/connect/intentions/exact?destination=b", {"Action": "allow"})
    assert status == 400 and body == b"required query parameter 'source' not set"


def test_match_check_and_authorize(module_agent: DevAgent) -> None:
    url = module_agent.url
    # L7 permissions need an HTTP-like protocol on the destination, as Consul checks at write time
    call(url, "PUT", "/v1/config", {"Kind": "service-defaults", "Name": "pay", "Protocol": "http"})
    call(url, "PUT", "/v1/config", {"Kind": "service-intentions", "Name": "pay",
                                    "Sources": [{"Name": "web", "Action": "allow"}, {"Name": "*", "Action": "deny"},
                                                {"Name": "ui", "Permissions": [
                                                    {"Action": "allow", "HTTP": {"PathPrefix": "/v1"}}]}]})
    call(url, "PUT", "/v1/config", {"Kind": "service-intentions", "Name": "*",
                                    "Sources": [{"Name": "web", "Action": "deny"}]})
    status, matched, _ = call(url, "GET", "/v1/connect/intentions/match?by=destination&name=pay")
    assert status == 200
    assert [(i["SourceName"], i["DestinationName"]) for i in matched["pay"]] == \
        [("ui", "pay"), ("web", "pay"), ("*", "pay"), ("web", "*")]
    assert call(url, "GET", "/v1/connect/intentions/check?source=web&destination=pay")[1] == {"Allowed": True}
    assert call(url, "GET", "/v1/connect/intentions/check?source=other&destination=pay")[1] == {"Allowed": False}
    assert call(url, "GET", "/v1/connect/intentions/check?source=ui&destination=pay")[1] == {"Allowed": False}
    assert call(url, "GET", "/v1/connect/intentions/check?source=web&destination=ledger")[1] == {"Allowed": False}
    assert call(url, "GET", "/v1/connect/intentions/check?source=api&destination=ledger")[1] == {"Allowed": True}

    def authorize(source: str, target: str) -> dict[str, Any]:
        status, body, _ = call(url, "POST", "/v1/agent/connect/authorize", {
            "Target": target, "ClientCertURI": f"spiffe://11111111.consul/ns/default/dc/dc1/svc/{source}",
            "ClientCertSerial": "04:00"})
        assert status == 200
        return dict(body)

    assert authorize("web", "pay") == {"Authorized": True,
                                       "Reason": "Matched L4 intention: web => pay (Precedence: 9, Action: ALLOW)"}
    assert authorize("x", "pay") == {"Authorized": False,
                                     "Reason": "Matched L4 intention: * => pay (Precedence: 8, Action: DENY)"}
    assert authorize("ui", "pay") == {"Authorized": False,
                                      "Reason": "Matched L7 intention: ui => pay (Precedence: 9, Permissions: 1)"}
    assert authorize("x", "ledger") == {"Authorized": True, "Reason": "Default behavior configured by ACLs"}
    status, body, _ = call(url, "POST", "/v1/agent/connect/authorize", {"ClientCertURI": "spiffe://x"})
    assert status == 400 and body == b"Target service must be specified"
    status, body, _ = call(url, "POST", "/v1/agent/connect/authorize", {"Target": "pay", "ClientCertURI": "nope"})
    assert status == 400 and body == b"ClientCertURI not a valid Connect identifier"
    for name in ("pay", "*"):
        call(url, "DELETE", f"/v1/config/service-intentions/{name}")


def test_ca_roots_from_kv(module_agent: DevAgent) -> None:
    url = module_agent.url
    c = _c(module_agent)
    status, empty, headers = call(url, "GET", "/v1/connect/ca/roots")
    assert status == 200 and empty == {"ActiveRootID": "", "TrustDomain": "", "Roots": []}
    index = headers["X-Consul-Index"]
    result: dict[str, Any] = {}

    def block() -> None:
        result["r"] = call(url, "GET", f"/v1/agent/connect/ca/roots?index={index}&wait=30s")

    t = threading.Thread(target=block)
    t.start()
    time.sleep(0.5)
    bundle = {"ActiveRootID": "aa:bb", "TrustDomain": "11111111.consul",
              "Roots": [{"ID": "aa:bb", "Name": "Weft CA Root", "RootCert": "-----BEGIN CERTIFICATE-----\n",
                         "Active": True}]}
    assert c.kv.put("weft/ca/roots", json.dumps(bundle))
    t.join(30)
    status, body, _ = result["r"]
    assert status == 200 and body == bundle
    assert c.connect.ca.roots() == bundle
    c.kv.delete("weft/ca/roots")
