"""ACL enforcement on the services, catalog, health, config and Connect endpoints: 403s where
Consul refuses, filtered lists (with X-Consul-Results-Filtered-By-ACLs) where Consul filters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.devagent.b_http import call
from tests.support import DevAgent

pytestmark = pytest.mark.integration

MGMT = "7c1f3f55-0b3e-4f0a-9e57-000000000b0b"
FILTERED = "X-Consul-Results-Filtered-By-ACLs"


@pytest.fixture(scope="module")
def agent() -> Iterator[DevAgent]:
    a = DevAgent("-acl-enabled", "-acl-initial-management", MGMT)
    try:
        yield a
    finally:
        a.stop()


def _token(agent: DevAgent, rules: str | None = None, service_identity: str | None = None) -> str:
    body: dict[str, Any] = {}
    if rules is not None:
        status, policy, _ = call(agent.url, "PUT", "/v1/acl/policy", {"Name": f"p{abs(hash(rules))}", "Rules": rules},
                                 token=MGMT)
        assert status == 200, policy
        body["Policies"] = [{"ID": policy["ID"]}]
    if service_identity is not None:
        body["ServiceIdentities"] = [{"ServiceName": service_identity}]
    status, tok, _ = call(agent.url, "PUT", "/v1/acl/token", body, token=MGMT)
    assert status == 200, tok
    return str(tok["SecretID"])


def test_service_register_needs_service_write(agent: DevAgent) -> None:
    web = _token(agent, service_identity="web")
    status, _, _ = call(agent.url, "PUT", "/v1/agent/service/register",
                        {"Name": "web", "ID": "web-1", "Port": 1, "Connect": {"SidecarService": {}}}, token=web)
    assert status == 200
    status, body, _ = call(agent.url, "PUT", "/v1/agent/service/register", {"Name": "db", "Port": 2}, token=web)
    assert status == 403
    assert body.startswith(b"Permission denied: token with AccessorID '") and \
        body.endswith(b"' lacks permission 'service:write' on \"db\"")
    # a proxy needs write on its destination too
    status, _, _ = call(agent.url, "PUT", "/v1/agent/service/register", {
        "Name": "web-sidecar-proxy", "ID": "p2", "Kind": "connect-proxy", "Port": 21500,
        "Proxy": {"DestinationServiceName": "db"}}, token=web)
    assert status == 403
    status, _, _ = call(agent.url, "PUT", "/v1/agent/service/register", {"Name": "db", "Port": 2}, token=MGMT)
    assert status == 200
    status, _, _ = call(agent.url, "PUT", "/v1/agent/service/deregister/db", token=web)
    assert status == 403
    status, _, _ = call(agent.url, "PUT", "/v1/agent/check/register", {"Name": "n", "TTL": "10s"}, token=web)
    assert status == 403  # a node check needs node:write
    status, body, _ = call(agent.url, "GET", "/v1/agent/services", token="no-such-token")
    assert status == 403 and body == b"ACL not found"


def test_lists_are_filtered_with_the_header(agent: DevAgent) -> None:
    call(agent.url, "PUT", "/v1/agent/service/register", {"Name": "seen", "ID": "seen-1", "Port": 3,
                                                          "Check": {"TTL": "60s"}}, token=MGMT)
    call(agent.url, "PUT", "/v1/agent/service/register", {"Name": "hidden", "ID": "hidden-1", "Port": 4,
                                                          "Check": {"TTL": "60s"}}, token=MGMT)
    reader = _token(agent, rules='service "seen" { policy = "read" }\nnode_prefix "" { policy = "read" }')
    status, body, headers = call(agent.url, "GET", "/v1/agent/services", token=reader)
    assert status == 200 and list(body) == ["seen-1"] and headers.get(FILTERED) == "true"
    status, body, headers = call(agent.url, "GET", "/v1/agent/checks", token=reader)
    # serfHealth lives in the catalog only (Consul's leader writes it): never in the agent's checks
    assert "service:seen-1" in body and "service:hidden-1" not in body and "serfHealth" not in body
    assert headers.get(FILTERED) == "true"
    status, body, headers = call(agent.url, "GET", "/v1/catalog/services", token=reader)
    assert list(body) == ["seen"] and headers.get(FILTERED) == "true"
    status, body, headers = call(agent.url, "GET", "/v1/health/service/hidden", token=reader)
    assert status == 200 and body == [] and headers.get(FILTERED) == "true"
    status, body, _ = call(agent.url, "GET", "/v1/health/service/seen", token=reader)
    assert [e["Service"]["ID"] for e in body] == ["seen-1"]
    # the anonymous token (default deny) sees nothing and gets no header (it is not authenticated)
    status, body, headers = call(agent.url, "GET", "/v1/catalog/services")
    assert status == 200 and body == {} and FILTERED not in headers
    status, body, _ = call(agent.url, "GET", "/v1/agent/service/seen-1")
    assert status == 403
    status, body, _ = call(agent.url, "GET", "/v1/agent/service/seen-1", token=reader)
    assert status == 200 and body["ID"] == "seen-1"


def test_intentions_and_config_entries(agent: DevAgent) -> None:
    ixn_writer = _token(agent, rules='service "db" { policy = "read" intentions = "write" }')
    plain = _token(agent, rules='service "db" { policy = "write" }')
    status, _, _ = call(agent.url, "PUT", "/v1/connect/intentions/exact?source=web&destination=db",
                        {"Action": "allow"}, token=ixn_writer)
    assert status == 200
    status, body, _ = call(agent.url, "PUT", "/v1/connect/intentions/exact?source=web&destination=cache",
                           {"Action": "allow"}, token=ixn_writer)
    assert status == 403 and b"lacks permission 'intention:write' on \"cache\"" in body
    status, _, _ = call(agent.url, "PUT", "/v1/config", {"Kind": "service-intentions", "Name": "db",
                                                         "Sources": [{"Name": "x", "Action": "deny"}]}, token=plain)
    assert status == 403  # service:write does not grant intention:write
    status, _, _ = call(agent.url, "PUT", "/v1/config", {"Kind": "service-defaults", "Name": "db",
                                                         "Protocol": "grpc"}, token=plain)
    assert status == 200
    status, body, _ = call(agent.url, "PUT", "/v1/config", {"Kind": "proxy-defaults", "Name": "global"}, token=plain)
    assert status == 403 and b"mesh:write" in body
    # listing intentions filters what the token cannot read
    call(agent.url, "PUT", "/v1/connect/intentions/exact?source=a&destination=secret", {"Action": "deny"},
         token=MGMT)
    status, body, headers = call(agent.url, "GET", "/v1/connect/intentions", token=ixn_writer)
    assert [i["DestinationName"] for i in body] == ["db"] and headers.get(FILTERED) == "true"
    # authorize needs service:write on the target; the default follows the ACL default policy (deny)
    status, _, _ = call(agent.url, "POST", "/v1/agent/connect/authorize", {
        "Target": "db", "ClientCertURI": "spiffe://t.consul/ns/default/dc/dc1/svc/nobody"}, token=ixn_writer)
    assert status == 403
    status, body, _ = call(agent.url, "POST", "/v1/agent/connect/authorize", {
        "Target": "db", "ClientCertURI": "spiffe://t.consul/ns/default/dc/dc1/svc/nobody"}, token=plain)
    assert status == 200 and body == {"Authorized": False, "Reason": "Default behavior configured by ACLs"}
    status, body, _ = call(agent.url, "POST", "/v1/agent/connect/authorize", {
        "Target": "db", "ClientCertURI": "spiffe://t.consul/ns/default/dc/dc1/svc/web"}, token=plain)
    assert body["Authorized"] is True and body["Reason"].startswith("Matched L4 intention: web => db")
