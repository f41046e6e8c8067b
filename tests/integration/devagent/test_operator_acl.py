"""Operator endpoints (raft peers, leadership transfer, autopilot configuration, keyring, usage), ACL
templated policies and UUID-index lookups, written from Consul's HTTP API docs for /operator and
/acl/templated-policy, and checked against what a single-server dev cluster answers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.integration.devagent.b_http import call
from tests.support import DevAgent

pytestmark = pytest.mark.integration

MGMT = "7c4e9a1b-2d3f-4a5b-8c6d-00000000c0de"


@pytest.fixture(scope="module")
def agent() -> Iterator[DevAgent]:
    a = DevAgent("-acl-enabled", "-acl-initial-management", MGMT, "-acl-default-policy", "deny")
    try:
        yield a
    finally:
        a.stop()


def _call(agent: DevAgent, method: str, path: str, body: object = None, token: str | None = MGMT):
    return call(agent.url, method, path, body, token=token)


def _token(agent: DevAgent, rules: str) -> str:
    status, policy, _ = _call(agent, "PUT", "/v1/acl/policy", {"Name": f"p-{uuid.uuid4().hex}", "Rules": rules})
    assert status == 200, policy
    status, token, _ = _call(agent, "PUT", "/v1/acl/token", {"Policies": [{"ID": policy["ID"]}]})
    assert status == 200
    return str(token["SecretID"])


def test_raft_configuration_index_is_zero(agent: DevAgent) -> None:
    status, body, _ = _call(agent, "GET", "/v1/operator/raft/configuration")
    assert status == 200 and body["Index"] == 0
    assert [(s["Leader"], s["Voter"]) for s in body["Servers"]] == [(True, True)]


def test_raft_remove_peer(agent: DevAgent) -> None:
    status, body, _ = _call(agent, "DELETE", "/v1/operator/raft/peer")
    assert status == 400 and b"Must specify either ?id" in body
    status, body, _ = _call(agent, "DELETE", "/v1/operator/raft/peer?id=a&address=b")
    assert (status, body) == (400, b"Must specify only one of ?id or ?address")
    status, body, _ = _call(agent, "DELETE", "/v1/operator/raft/peer?address=10.255.255.1:8300")
    assert (status, body) == (500, b'address "10.255.255.1:8300" was not found in the Raft configuration')
    status, body, _ = _call(agent, "DELETE", "/v1/operator/raft/peer?id=00000000-0000-0000-0000-000000000099")
    assert status == 500 and body == b'id "00000000-0000-0000-0000-000000000099" was not found in the Raft ' \
                                     b"configuration"
    _, conf, _ = _call(agent, "GET", "/v1/operator/raft/configuration")
    own = conf["Servers"][0]
    # the only server is the last voter: raft refuses to remove it, and it stays
    status, body, _ = _call(agent, "DELETE", f"/v1/operator/raft/peer?id={own['ID']}")
    assert (status, body) == (500, b"need at least one voter in configuration")
    assert _call(agent, "GET", "/v1/operator/raft/configuration")[1]["Servers"] == conf["Servers"]
    reader = _token(agent, 'operator = "read"')
    status, body, _ = _call(agent, "DELETE", "/v1/operator/raft/peer?address=x", token=reader)
    assert status == 403 and b"operator:write" in body


def test_raft_transfer_leader_without_other_servers(agent: DevAgent) -> None:
    status, body, _ = _call(agent, "POST", "/v1/operator/raft/transfer-leader")
    assert (status, body) == (500, b"cannot find peer")
    status, body, _ = _call(agent, "POST", "/v1/operator/raft/transfer-leader?id=someone-else")
    assert (status, body) == (500, b"Could not find address for server id someone-else")


def test_autopilot_configuration_defaults_and_cas(agent: DevAgent) -> None:
    status, conf, _ = _call(agent, "GET", "/v1/operator/autopilot/configuration")
    assert status == 200
    assert {k: conf[k] for k in ("CleanupDeadServers", "LastContactThreshold", "MaxTrailingLogs", "MinQuorum",
                                 "ServerStabilizationTime", "RedundancyZoneTag", "DisableUpgradeMigration",
                                 "UpgradeVersionTag")} == {
        "CleanupDeadServers": True, "LastContactThreshold": "200ms", "MaxTrailingLogs": 250, "MinQuorum": 0,
        "ServerStabilizationTime": "10s", "RedundancyZoneTag": "", "DisableUpgradeMigration": False,
        "UpgradeVersionTag": ""}
    # a stale cas changes nothing and answers false
    status, body, _ = _call(agent, "PUT", f"/v1/operator/autopilot/configuration?cas={conf['ModifyIndex'] + 50}",
                            {"CleanupDeadServers": False})
    assert (status, body) == (200, False)
    assert _call(agent, "GET", "/v1/operator/autopilot/configuration")[1] == conf
    # without cas the PUT always applies; fields left out take Consul's defaults, durations as strings
    status, body, _ = _call(agent, "PUT", "/v1/operator/autopilot/configuration",
                            {"CleanupDeadServers": False, "LastContactThreshold": "1s", "MaxTrailingLogs": 10})
    assert (status, body) == (200, True)
    _, updated, _ = _call(agent, "GET", "/v1/operator/autopilot/configuration")
    assert updated["CleanupDeadServers"] is False and updated["LastContactThreshold"] == "1s"
    assert updated["MaxTrailingLogs"] == 10 and updated["ModifyIndex"] > conf["ModifyIndex"]
    assert updated["CreateIndex"] == conf["CreateIndex"]
    status, body, _ = _call(agent, "PUT", f"/v1/operator/autopilot/configuration?cas={updated['ModifyIndex']}",
                            {"CleanupDeadServers": True})
    assert (status, body) == (200, True)
    _, final, _ = _call(agent, "GET", "/v1/operator/autopilot/configuration")
    assert final["CleanupDeadServers"] is True and final["MaxTrailingLogs"] == 250
    status, body, _ = _call(agent, "PUT", "/v1/operator/autopilot/configuration", {"LastContactThreshold": "soon"})
    assert status == 400 and body.startswith(b"Error parsing autopilot config:")
    status, body, _ = _call(agent, "PUT", "/v1/operator/autopilot/configuration?cas=x", {})
    assert status == 400 and body.startswith(b"Error parsing cas value")
    reader = _token(agent, 'operator = "read"')
    assert _call(agent, "GET", "/v1/operator/autopilot/configuration", token=reader)[0] == 200
    assert _call(agent, "PUT", "/v1/operator/autopilot/configuration", {}, token=reader)[0] == 403


def test_keyring_without_gossip_encryption(agent: DevAgent) -> None:
    status, body, _ = _call(agent, "GET", "/v1/operator/keyring")
    assert status == 500
    text = body.decode()
    assert text.startswith("4 errors occurred:\n") and "WAN error: 1/1 nodes reported failure" in text
    assert "dc1 (LAN) error: 1/1 nodes reported failure" in text
    assert "Keyring is empty (encryption not enabled)" in text
    key = {"Key": "8CooQRX1+VK7MsQQK6lx2LhumpSfQzUjE63HdAu2hgA="}
    for method in ("POST", "PUT", "DELETE"):
        status, body, _ = _call(agent, method, "/v1/operator/keyring", key)
        assert status == 500 and b"No keyring to modify (encryption not enabled)" in body
    status, body, _ = _call(agent, "POST", "/v1/operator/keyring", {"Key": 5})
    assert status == 400 and body.startswith(b"Request decode failed")
    status, body, _ = _call(agent, "GET", "/v1/operator/keyring?local-only=true")
    assert status == 500 and body.startswith(b"2 errors occurred:") and b"WAN" not in body
    status, body, _ = _call(agent, "GET", "/v1/operator/keyring?relay-factor=9")
    assert (status, body) == (400, b"Invalid relay-factor: Relay factor must be in range: [0, 5]")
    status, body, _ = _call(agent, "PUT", "/v1/operator/keyring?local-only=true", key)
    assert status == 400 and body.startswith(b"Invalid use of local-only")
    reader = _token(agent, 'keyring = "read"')
    assert _call(agent, "GET", "/v1/operator/keyring", token=reader)[0] == 500  # allowed, then refused
    assert _call(agent, "POST", "/v1/operator/keyring", key, token=reader)[0] == 403


def test_usage(agent: DevAgent) -> None:
    assert _call(agent, "PUT", "/v1/agent/service/register", {"Name": "billing", "Port": 80})[0] == 200
    assert _call(agent, "PUT", "/v1/agent/service/register",
                 {"Name": "billing-proxy", "Kind": "connect-proxy", "Port": 21000,
                  "Proxy": {"DestinationServiceName": "billing"}})[0] == 200
    status, body, _ = _call(agent, "GET", "/v1/operator/usage")
    assert status == 200 and body["KnownLeader"] is True and body["ConsistencyLevel"] == "leader"
    dc = body["Usage"]["dc1"]
    assert dc["Nodes"] == 1 and dc["ServiceInstances"] == 3  # consul, billing, billing-proxy
    assert dc["Services"] == 3 and dc["BillableServiceInstances"] == 1
    assert dc["ConnectServiceInstances"]["connect-proxy"] == 1
    assert set(dc["ConnectServiceInstances"]) == {"api-gateway", "connect-native", "connect-proxy",
                                                  "ingress-gateway", "mesh-gateway", "terminating-gateway"}
    assert _call(agent, "GET", "/v1/operator/usage?stale")[1]["ConsistencyLevel"] == "stale"
    assert _call(agent, "GET", "/v1/operator/usage?dc=dc9")[0] == 500


def test_templated_policies_list_read_preview(agent: DevAgent) -> None:
    status, listing, _ = _call(agent, "GET", "/v1/acl/templated-policies")
    assert status == 200
    assert set(listing) == {"builtin/service", "builtin/node", "builtin/dns", "builtin/nomad-server",
                            "builtin/api-gateway", "builtin/nomad-client"}
    status, svc, _ = _call(agent, "GET", "/v1/acl/templated-policy/name/builtin/service")
    assert status == 200 and svc == listing["builtin/service"]
    assert svc["TemplateName"] == "builtin/service" and '"required": ["name"]' in svc["Schema"]
    assert 'service "{{.Name}}"' in svc["Template"]
    assert _call(agent, "GET", "/v1/acl/templated-policy/name/builtin/dns")[1]["Schema"] == ""
    status, body, _ = _call(agent, "GET", "/v1/acl/templated-policy/name/builtin/nope")
    assert (status, body) == (400, b"Invalid templated policy Name: builtin/nope")
    status, preview, _ = _call(agent, "POST", "/v1/acl/templated-policy/preview/builtin/service", {"Name": "api"})
    assert status == 200
    assert preview["Name"] == f"synthetic-policy-{preview['ID']}"
    assert preview["Description"] == "synthetic policy generated from templated policy: builtin/service"
    assert 'service "api" {' in preview["Rules"] and 'service "api-sidecar-proxy" {' in preview["Rules"]
    status, body, _ = _call(agent, "POST", "/v1/acl/templated-policy/preview/builtin/service", {})
    assert status == 400 and b"has an invalid name" in body
    status, body, _ = _call(agent, "POST", "/v1/acl/templated-policy/preview/builtin/api-gateway", {})
    assert status == 400 and b"name is required" in body
    status, preview, _ = _call(agent, "POST", "/v1/acl/templated-policy/preview/builtin/dns")
    assert status == 200 and 'query_prefix ""' in preview["Rules"]
    assert _call(agent, "GET", "/v1/acl/templated-policies", token="anonymous")[0] == 403


def test_token_with_templated_policy_grants_its_rules(agent: DevAgent) -> None:
    status, token, _ = _call(agent, "PUT", "/v1/acl/token", {
        "Description": "svc", "TemplatedPolicies": [
            {"TemplateName": "builtin/service", "TemplateVariables": {"Name": "web"}},
            {"TemplateName": "builtin/service", "TemplateVariables": {"Name": "web"}},  # duplicate: dropped
        ]})
    assert status == 200
    assert token["TemplatedPolicies"] == [{"TemplateID": "00000000-0000-0000-0000-000000000003",
                                           "TemplateName": "builtin/service", "TemplateVariables": {"name": "web"}}]
    _, read, _ = _call(agent, "GET", f"/v1/acl/token/{token['AccessorID']}")
    assert read["TemplatedPolicies"] == token["TemplatedPolicies"]
    secret = token["SecretID"]
    assert _call(agent, "PUT", "/v1/agent/service/register", {"Name": "web"}, token=secret)[0] == 200
    assert _call(agent, "PUT", "/v1/agent/service/register", {"Name": "web-sidecar-proxy", "Kind": "connect-proxy",
                                                              "Port": 21000,
                                                              "Proxy": {"DestinationServiceName": "web"}},
                 token=secret)[0] == 200
    assert _call(agent, "PUT", "/v1/agent/service/register", {"Name": "db"}, token=secret)[0] == 403
    assert _call(agent, "GET", "/v1/catalog/service/db", token=secret)[0] == 200  # service_prefix "" read
    status, body, _ = _call(agent, "PUT", "/v1/acl/token", {"TemplatedPolicies": [{"TemplateName": "builtin/x"}]})
    assert (status, body) == (500, b'templated policy "builtin/x" does not exist')
    status, body, _ = _call(agent, "PUT", "/v1/acl/token", {"TemplatedPolicies": [{"TemplateName": "builtin/node"}]})
    assert status == 500 and body.startswith(b'validation error for templated policy: "builtin/node": node identity')


def test_token_and_policy_ids_are_uuids(agent: DevAgent) -> None:
    status, body, _ = _call(agent, "GET", "/v1/acl/token/unknown")
    assert (status, body) == (500, b"failed acl token lookup: index error: UUID must be 36 characters")
    status, body, _ = _call(agent, "GET", "/v1/acl/policy/unknown")
    assert (status, body) == (500, b"failed acl policy lookup: index error: UUID must be 36 characters")
    status, body, _ = _call(agent, "GET", "/v1/acl/token/zzzzzzzz-0000-0000-0000-000000000000")
    assert status == 500 and b"invalid byte" in body
    # a well-formed UUID that names nothing is a 404, as before
    status, body, _ = _call(agent, "GET", "/v1/acl/token/00000000-0000-0000-0000-0000000000ff")
    assert (status, body) == (404, b"Requested token does not exist: ACL not found")
    assert _call(agent, "GET", "/v1/acl/policy/00000000-0000-0000-0000-0000000000ff")[0] == 404


def test_catalog_deregister_routes_by_body_datacenter(agent: DevAgent) -> None:
    body = {"Datacenter": "dc1", "Node": "n-dereg", "Address": "10.1.10.11", "Service": {"Service": "s1"}}
    assert _call(agent, "PUT", "/v1/catalog/register", body)[0] == 200
    status, reply, _ = _call(agent, "PUT", "/v1/catalog/deregister", {"Node": "n-dereg", "Datacenter": "dc2"})
    assert (status, reply) == (500, b"No path to datacenter")
    assert _call(agent, "GET", "/v1/catalog/node/n-dereg")[1] is not None  # nothing was removed
    assert _call(agent, "PUT", "/v1/catalog/deregister", {"Node": "n-dereg", "Datacenter": "dc1"})[1] is True
    assert _call(agent, "GET", "/v1/catalog/node/n-dereg")[1] is None
