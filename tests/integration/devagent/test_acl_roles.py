"""ACL roles, auth methods, binding rules, login/logout, written from Consul's ACL HTTP API docs.
Through py-consul where it has the call, raw HTTP for the errors."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import consul
import pytest

from tests.integration.devagent.b_http import call
from tests.support import DevAgent

pytestmark = pytest.mark.integration

MGMT = "5d2a0d6e-8f4c-4b7e-9c63-00000000a11e"
K8S_CONFIG = {"Host": "https://192.0.2.1:443", "CACert": "-----BEGIN CERTIFICATE-----\n...",
              "ServiceAccountJWT": "eyJhbGciOi..."}


@pytest.fixture(scope="module")
def agent() -> Iterator[DevAgent]:
    a = DevAgent("-acl-enabled", "-acl-initial-management", MGMT)
    try:
        yield a
    finally:
        a.stop()


def _c(agent: DevAgent) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=agent.port, token=MGMT)


def test_role_crud_and_list(agent: DevAgent) -> None:
    c = _c(agent)
    status, policy, _ = call(agent.url, "PUT", "/v1/acl/policy", {"Name": "kv-read", "Rules": 'key_prefix "" '
                                                                 '{ policy = "read" }'}, token=MGMT)
    assert status == 200
    role = c.acl.role.create("reader", description="reads", policies_id=[policy["ID"]],
                             service_identities=[{"ServiceName": "web"}])
    assert role["Name"] == "reader" and role["Policies"] == [{"ID": policy["ID"], "Name": "kv-read"}]
    assert role["ServiceIdentities"] == [{"ServiceName": "web"}] and "NodeIdentities" not in role
    assert role["Hash"] and role["CreateIndex"] == role["ModifyIndex"]
    assert c.acl.role.read(role["ID"])["Description"] == "reads"
    assert c.acl.role.read_by_name("reader")["ID"] == role["ID"]
    by_name = c.acl.role.create("by-name", policies_name=["kv-read"])
    assert by_name["Policies"] == [{"ID": policy["ID"], "Name": "kv-read"}]
    assert [r["Name"] for r in c.acl.role.list()] == ["by-name", "reader"]
    assert [r["Name"] for r in c.acl.role.list(policy=policy["ID"])] == ["by-name", "reader"]
    updated = c.acl.role.update(role["ID"], "reader", description="still reads", policies_id=[policy["ID"]])
    assert updated["Description"] == "still reads" and updated["CreateIndex"] == role["CreateIndex"]
    assert c.acl.role.delete(by_name["ID"]) is True
    assert c.acl.role.delete(by_name["ID"]) is True  # unknown: still true, as Consul
    status, body, _ = call(agent.url, "GET", f"/v1/acl/role/{by_name['ID']}", token=MGMT)
    assert (status, body) == (404, b"Requested role does not exist: ACL not found")
    status, body, _ = call(agent.url, "GET", "/v1/acl/role/name/nope", token=MGMT)
    assert (status, body) == (404, b"Requested role does not exist: ACL not found")


@pytest.mark.parametrize(("path", "body", "status", "text"), [
    ("/v1/acl/role", {"Description": "x"}, 500, "Invalid Role: no Name is set"),
    ("/v1/acl/role", {"Name": "bad name"}, 500,
     "Invalid Role: invalid Name. Only alphanumeric characters, '-' and '_' are allowed"),
    ("/v1/acl/role", {"Name": "r", "Policies": [{"ID": "00000000-0000-0000-0000-00000000dead"}]}, 500,
     'No such ACL policy with ID "00000000-0000-0000-0000-00000000dead"'),
    ("/v1/acl/role", {"Name": "r", "ServiceIdentities": [{"ServiceName": ""}]}, 500,
     "Service identity is missing the service name field on this role"),
    ("/v1/acl/role", {"Name": "r", "NodeIdentities": [{"NodeName": "n"}]}, 500,
     "Node identity is missing the datacenter field on this role"),
    ("/v1/acl/role", {"Name": "r", "ID": "x"}, 400, "Role ID in URL and payload do not match"),
    ("/v1/acl/role", {"Name": 3}, 400, "Role decoding failed"),
    ("/v1/acl/role/not-a-uuid", {"Name": "r"}, 500, "Role ID invalid UUID"),
    ("/v1/acl/role/00000000-0000-0000-0000-000000000777", {"Name": "r"}, 500,
     "cannot find role 00000000-0000-0000-0000-000000000777"),
])
def test_role_validation_words(agent: DevAgent, path: str, body: dict[str, object], status: int, text: str) -> None:
    got, answer, _ = call(agent.url, "PUT", path, body, token=MGMT)
    assert got == status and answer.decode().startswith(text)


def test_role_name_is_unique(agent: DevAgent) -> None:
    c = _c(agent)
    c.acl.role.create("unique-role")
    status, body, _ = call(agent.url, "PUT", "/v1/acl/role", {"Name": "unique-role"}, token=MGMT)
    assert (status, body) == (500, b'Invalid Role: A Role with Name "unique-role" already exists')


def test_roles_on_tokens_grant_their_policies_and_identities(agent: DevAgent) -> None:
    c = _c(agent)
    status, policy, _ = call(agent.url, "PUT", "/v1/acl/policy", {"Name": "kv-writer", "Rules": 'key_prefix "app/" '
                                                                 '{ policy = "write" }'}, token=MGMT)
    assert status == 200
    role = c.acl.role.create("app-writer", policies_id=[policy["ID"]], service_identities=[{"ServiceName": "api"}])
    status, token, _ = call(agent.url, "PUT", "/v1/acl/token", {"Roles": [{"Name": "app-writer"}]}, token=MGMT)
    assert status == 200 and token["Roles"] == [{"ID": role["ID"], "Name": "app-writer"}]
    secret = token["SecretID"]
    assert call(agent.url, "PUT", "/v1/kv/app/x", b"1", token=secret)[0] == 200
    assert call(agent.url, "PUT", "/v1/kv/other/x", b"1", token=secret)[0] == 403
    # the role's service identity: service:write on api
    assert call(agent.url, "PUT", "/v1/agent/service/register", {"Name": "api", "Port": 1}, token=secret)[0] == 200
    assert call(agent.url, "PUT", "/v1/agent/service/register", {"Name": "db", "Port": 1}, token=secret)[0] == 403
    # the token lists by role; the role changes take effect at once; a deleted role grants nothing
    status, tokens, _ = call(agent.url, "GET", f"/v1/acl/tokens?role={role['ID']}", token=MGMT)
    assert [t["AccessorID"] for t in tokens] == [token["AccessorID"]]
    c.acl.role.update(role["ID"], "app-writer", service_identities=[{"ServiceName": "api"}])
    assert call(agent.url, "PUT", "/v1/kv/app/y", b"1", token=secret)[0] == 403
    c.acl.role.delete(role["ID"])
    assert call(agent.url, "PUT", "/v1/agent/service/register", {"Name": "api", "Port": 2}, token=secret)[0] == 403
    status, view, _ = call(agent.url, "GET", f"/v1/acl/token/{token['AccessorID']}", token=MGMT)
    assert status == 200 and "Roles" not in view
    status, body, _ = call(agent.url, "PUT", "/v1/acl/token", {"Roles": [{"Name": "no-such-role"}]}, token=MGMT)
    assert (status, body) == (500, b'No such ACL role with name "no-such-role"')


def test_auth_methods_and_binding_rules(agent: DevAgent) -> None:
    c = _c(agent)
    method = c.acl.auth_method.create("k8s", "kubernetes", config=K8S_CONFIG, max_token_ttl="10m",
                                      description="cluster A")
    assert (method["Name"], method["Type"], method["MaxTokenTTL"], method["Config"]["Host"]) == (
        "k8s", "kubernetes", "10m0s", "https://192.0.2.1:443")
    assert c.acl.auth_method.read("k8s")["Description"] == "cluster A"
    [stub] = c.acl.auth_method.list()
    assert stub["Name"] == "k8s" and "Config" not in stub
    rule = c.acl.binding_rule.create("k8s", "service", "${serviceaccount.name}",
                                     selector='serviceaccount.namespace == "default"')
    assert rule["AuthMethod"] == "k8s" and rule["BindType"] == "service"
    assert c.acl.binding_rule.read(rule["ID"])["BindName"] == "${serviceaccount.name}"
    assert [r["ID"] for r in c.acl.binding_rule.list(auth_method="k8s")] == [rule["ID"]]
    assert c.acl.binding_rule.list(auth_method="other") == []
    status, body, _ = call(agent.url, "PUT", f"/v1/acl/binding-rule/{rule['ID']}",
                           {"AuthMethod": "k8s", "BindType": "role", "BindName": "ops"}, token=MGMT)
    assert status == 200 and body["BindType"] == "role" and body["CreateIndex"] == rule["CreateIndex"]
    # login: a dev agent cannot verify Kubernetes tokens
    status, body, _ = call(agent.url, "POST", "/v1/acl/login", {"AuthMethod": "k8s", "BearerToken": "x"})
    assert status == 500 and body.startswith(b"Login with auth method type 'kubernetes' is not supported")
    status, body, _ = call(agent.url, "POST", "/v1/acl/login", {"AuthMethod": "nope", "BearerToken": "x"})
    assert (status, body) == (403, b'ACL not found: auth method "nope" not found')
    status, body, _ = call(agent.url, "POST", "/v1/acl/login", b"{not json")
    assert status == 400 and body.startswith(b"Failed to decode request body")
    # logout: only a token a login made
    assert call(agent.url, "POST", "/v1/acl/logout") == (401, b"Supplied token does not exist", call(
        agent.url, "POST", "/v1/acl/logout")[2])
    assert call(agent.url, "POST", "/v1/acl/logout", token=MGMT)[:2] == (403, b"Permission denied")
    assert call(agent.url, "POST", "/v1/acl/logout", token="f" * 8)[:2] == (403, b"ACL not found")
    # deleting the method deletes its rules
    assert c.acl.auth_method.delete("k8s") is True
    assert c.acl.binding_rule.list() == []
    assert c.acl.auth_method.delete("k8s") is True
    status, body, _ = call(agent.url, "GET", "/v1/acl/auth-method/k8s", token=MGMT)
    assert (status, body) == (404, b"Requested auth method does not exist: ACL not found")
    status, body, _ = call(agent.url, "GET", f"/v1/acl/binding-rule/{rule['ID']}", token=MGMT)
    assert (status, body) == (404, b"Requested binding rule does not exist: ACL not found")


@pytest.mark.parametrize(("body", "text"), [
    ({"Type": "kubernetes"}, "Invalid Auth Method: no Name is set"),
    ({"Name": "a b", "Type": "kubernetes"}, "Invalid Auth Method: invalid Name."),
    ({"Name": "m", "Type": "ldap"}, "Invalid Auth Method: Type should be one of: [jwt kubernetes oidc]"),
    ({"Name": "m", "Type": "kubernetes", "Config": {"Host": "h"}}, "Invalid Auth Method: Config.CACert is required"),
    ({"Name": "m", "Type": "jwt", "Config": {}}, "Invalid Auth Method: exactly one of 'JWTValidationPubKeys'"),
    ({"Name": "m", "Type": "kubernetes", "Config": K8S_CONFIG, "MaxTokenTTL": "48h"},
     "MaxTokenTTL 48h0m0s cannot be more than 24h0m0s"),
    ({"Name": "m", "Type": "kubernetes", "Config": K8S_CONFIG, "MaxTokenTTL": "5s"},
     "MaxTokenTTL 5s cannot be less than 1m0s"),
    ({"Name": "m", "Type": "kubernetes", "Config": K8S_CONFIG, "TokenLocality": "planet"},
     "Invalid Auth Method: TokenLocality should be one of 'local' or 'global'"),
])
def test_auth_method_validation_words(agent: DevAgent, body: dict[str, object], text: str) -> None:
    status, answer, _ = call(agent.url, "PUT", "/v1/acl/auth-method", body, token=MGMT)
    assert status == 500 and answer.decode().startswith(text)


def test_auth_method_type_is_immutable_and_rule_words(agent: DevAgent) -> None:
    c = _c(agent)
    c.acl.auth_method.create("jwt-m", "jwt", config={"JWKSURL": "https://192.0.2.1/keys"})
    status, body, _ = call(agent.url, "PUT", "/v1/acl/auth-method/jwt-m",
                           {"Type": "kubernetes", "Config": K8S_CONFIG}, token=MGMT)
    assert (status, body) == (500, b"the Type field of an Auth Method is immutable")
    status, body, _ = call(agent.url, "PUT", "/v1/acl/auth-method/jwt-m", {"Name": "other"}, token=MGMT)
    assert (status, body) == (400, b"AuthMethod Name in URL and payload do not match")
    for rule, text in (({"BindType": "service", "BindName": "x"}, "Invalid Binding Rule: no AuthMethod is set"),
                       ({"AuthMethod": "nope", "BindType": "service", "BindName": "x"},
                        'cannot find auth method with name "nope"'),
                       ({"AuthMethod": "jwt-m", "BindName": "x"}, "Invalid Binding Rule: no BindType is set"),
                       ({"AuthMethod": "jwt-m", "BindType": "service"}, "Invalid Binding Rule: no BindName is set"),
                       ({"AuthMethod": "jwt-m", "BindType": "group", "BindName": "x"},
                        'Invalid Binding Rule: unknown BindType "group"'),
                       ({"AuthMethod": "jwt-m", "BindType": "service", "BindName": "x", "Selector": "a =="},
                        "invalid Binding Rule: Selector is invalid")):
        status, body, _ = call(agent.url, "PUT", "/v1/acl/binding-rule", rule, token=MGMT)
        assert status == 500 and body.decode().startswith(text), body
    status, body, _ = call(agent.url, "PUT", "/v1/acl/binding-rule/not-a-uuid",
                           {"AuthMethod": "jwt-m", "BindType": "service", "BindName": "x"}, token=MGMT)
    assert (status, body) == (500, b"Binding Rule ID invalid UUID")
    status, body, _ = call(agent.url, "POST", "/v1/acl/login", {"AuthMethod": "jwt-m", "BearerToken": "a.b.c"})
    assert status == 500 and b"'jwt' is not supported" in body
    c.acl.auth_method.delete("jwt-m")


def test_acl_permissions_and_acls_off(agent: DevAgent) -> None:
    anon = consul.Consul(host="127.0.0.1", port=agent.port)
    with pytest.raises(consul.ACLPermissionDenied):
        anon.acl.role.list()
    status, _, _ = call(agent.url, "PUT", "/v1/acl/auth-method", {"Name": "x", "Type": "jwt"})
    assert status == 403
    # the operational endpoints: agent:read for metrics and monitor, operator:write for force-leave
    for method, path in (("GET", "/v1/agent/metrics"), ("GET", "/v1/agent/monitor"),
                         ("PUT", "/v1/agent/force-leave/x")):
        status, body, _ = call(agent.url, method, path)
        assert status == 403 and body.startswith(b"Permission denied"), path
    assert call(agent.url, "GET", "/v1/agent/metrics", token=MGMT)[0] == 200
    off = DevAgent()
    try:
        for method, path in (("GET", "/v1/acl/roles"), ("PUT", "/v1/acl/role"), ("GET", "/v1/acl/auth-methods"),
                             ("GET", "/v1/acl/binding-rules"), ("POST", "/v1/acl/login")):
            assert call(off.url, method, path, {})[:2] == (401, b"ACL support disabled")
    finally:
        off.stop()
    # hostile bodies end their request only
    for body in (b"[]", b'{"Name": {"x": 1}}', base64.b64encode(b"\x00" * 64), b'{"Policies": "all"}'):
        status, _, _ = call(agent.url, "PUT", "/v1/acl/role", body, token=MGMT)
        assert status == 400
    assert call(agent.url, "GET", "/v1/acl/roles", token=MGMT)[0] == 200
