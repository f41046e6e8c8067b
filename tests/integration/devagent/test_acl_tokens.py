"""ACLs: bootstrap, tokens with policies and service identities, enforcement (403), and ACLs off (401)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import consul
import pytest

from tests.support import DevAgent, agent_json

pytestmark = pytest.mark.integration

MGMT = "6d2f0bd4-5b47-4d38-9d6e-000000000001"


@pytest.fixture(scope="module")
def agent() -> Iterator[DevAgent]:
    a = DevAgent("-acl-enabled", "-acl-initial-management", MGMT)
    try:
        yield a
    finally:
        a.stop()


def _c(agent: DevAgent, token: str | None = None) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=agent.port, token=token)


def test_anonymous_gets_nothing_and_management_everything(agent: DevAgent) -> None:
    anon = _c(agent)
    with pytest.raises(consul.ACLPermissionDenied, match="Permission denied"):
        anon.kv.put("acl/k", "v")
    status, _, body = agent_json(agent, "GET", "/v1/kv/acl/k")
    assert status == 403 and body.startswith(b"Permission denied")
    mgmt = _c(agent, MGMT)
    assert mgmt.kv.put("acl/k", "v") is True
    assert mgmt.kv.get("acl/k")[1]["Value"] == b"v"
    # the token is accepted as a header, as a Bearer token and as ?token=
    assert agent_json(agent, "GET", "/v1/kv/acl/k", token=MGMT)[0] == 200
    assert agent_json(agent, "GET", "/v1/kv/acl/k", bearer=MGMT)[0] == 200
    assert agent_json(agent, "GET", f"/v1/kv/acl/k?token={MGMT}")[0] == 200
    status, _, body = agent_json(agent, "GET", "/v1/kv/acl/k", token="no-such-secret")
    assert status == 403 and body == b"ACL not found"
    # the initial management token is the bootstrap
    status, _, body = agent_json(agent, "PUT", "/v1/acl/bootstrap")
    assert status == 403 and b"ACL bootstrap no longer allowed" in body


def test_policy_token_and_enforcement(agent: DevAgent) -> None:
    mgmt = _c(agent, MGMT)
    policy = mgmt.acl.policy.create(
        name="app-rw", description="app keys",
        rules={"key_prefix": {"app/": {"policy": "write"}}, "key": {"app/locked": {"policy": "read"}},
               "service_prefix": {"": {"policy": "read"}}})  # py-consul sends rules as JSON
    assert policy["Name"] == "app-rw" and policy["ID"]
    assert json.loads(mgmt.acl.policy.read(policy["ID"])["Rules"])["key"] == {"app/locked": {"policy": "read"}}
    hcl = mgmt.acl.policy.read(policy["ID"])  # HCL rules, as the Consul CLI and UI send them
    rules = 'service "web" { policy = "write" }\nservice_prefix "" { policy = "read" }'
    status, _, body = agent_json(agent, "PUT", "/v1/acl/policy", {"Name": "hcl-policy", "Rules": rules}, token=MGMT)
    assert status == 200 and body["Name"] == "hcl-policy" and hcl["ID"] != body["ID"]
    assert "app-rw" in [p["Name"] for p in mgmt.acl.policy.list()]
    tok = mgmt.acl.token.create(description="app", policies_name=["app-rw"])
    assert tok["Policies"] == [{"ID": policy["ID"], "Name": "app-rw"}]
    secret = tok["SecretID"]
    app = _c(agent, secret)
    assert app.kv.put("app/x", "1") is True
    with pytest.raises(consul.ACLPermissionDenied):
        app.kv.put("app/locked", "1")
    with pytest.raises(consul.ACLPermissionDenied):
        app.kv.put("other/x", "1")
    mgmt.kv.put("other/y", "secret")
    # recurse filters what the token cannot read
    _, entries = app.kv.get("", recurse=True)
    assert {e["Key"] for e in entries} <= {"app/x", "app/locked"}
    req = urllib.request.Request(agent.url + "/v1/kv/?recurse", headers={"X-Consul-Token": secret})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    # delete-tree needs write on everything under the prefix
    status, _, _ = agent_json(agent, "DELETE", "/v1/kv/app/?recurse", token=secret)
    assert status == 403
    status, _, _ = agent_json(agent, "DELETE", "/v1/kv/app/x?recurse", token=secret)
    assert status == 200
    me = app.acl.token.read_self()
    assert me["AccessorID"] == tok["AccessorID"]
    # reading tokens needs acl:read
    with pytest.raises(consul.ACLPermissionDenied):
        app.acl.token.list()
    listed = mgmt.acl.token.list()
    assert tok["AccessorID"] in [t["AccessorID"] for t in listed]
    # updates take effect at once
    mgmt.acl.token.update(tok["AccessorID"], description="app", policies_id=[])
    with pytest.raises(consul.ACLPermissionDenied):
        app.kv.put("app/x", "2")
    assert mgmt.acl.token.delete(tok["AccessorID"]) is True
    status, _, body = agent_json(agent, "GET", "/v1/kv/app/x", token=secret)
    assert status == 403 and body == b"ACL not found"
    assert mgmt.acl.policy.delete(policy["ID"]) is True
    status, _, _ = agent_json(agent, "GET", f"/v1/acl/policy/{policy['ID']}", token=MGMT)
    assert status == 404


def test_service_identity_token(agent: DevAgent) -> None:
    mgmt = _c(agent, MGMT)
    tok = mgmt.acl.token.create(service_identities=[{"ServiceName": "web"}])
    authz_secret = tok["SecretID"]
    assert tok["ServiceIdentities"] == [{"ServiceName": "web"}]
    # a service identity grants no KV access
    status, _, _ = agent_json(agent, "PUT", "/v1/kv/web", b"x", token=authz_secret)
    assert status == 403
    # sessions need session:write on the node: not granted either
    status, _, _ = agent_json(agent, "PUT", "/v1/session/create", b"", token=authz_secret)
    assert status == 403


def test_bad_acl_requests(agent: DevAgent) -> None:
    status, _, body = agent_json(agent, "PUT", "/v1/acl/policy", b"{", token=MGMT)
    assert status == 400 and body.startswith(b"Policy decoding failed")
    status, _, body = agent_json(agent, "PUT", "/v1/acl/policy",
                                 {"Name": "bad", "Rules": 'key "x" { policy = "sudo" }'}, token=MGMT)
    assert status == 500 and b"Invalid Policy" in body
    status, _, body = agent_json(agent, "PUT", "/v1/acl/token", {"Policies": [{"Name": "nope"}]}, token=MGMT)
    assert status == 500 and b"No such ACL policy" in body
    status, _, body = agent_json(agent, "PUT", "/v1/acl/token", {"ServiceIdentities": [{"ServiceName": "Bad Name"}]},
                                 token=MGMT)
    assert status == 500 and b"invalid name" in body
    status, _, _ = agent_json(agent, "GET", "/v1/acl/token/00000000-0000-0000-0000-0000000000ff", token=MGMT)
    assert status == 404
    status, _, body = agent_json(agent, "DELETE", "/v1/acl/policy/00000000-0000-0000-0000-000000000001", token=MGMT)
    assert status == 500


def test_acls_disabled_answer_401() -> None:
    a = DevAgent()
    try:
        status, _, body = agent_json(a, "GET", "/v1/acl/tokens")
        assert status == 401 and body == b"ACL support disabled"
        with pytest.raises(consul.ACLDisabled):
            _c(a).acl.token.list()
    finally:
        a.stop()


def test_agent_default_token_serves_requests_without_one(agent: DevAgent) -> None:
    assert agent_json(agent, "PUT", "/v1/kv/deflt", b"x")[0] == 403
    assert agent_json(agent, "PUT", "/v1/agent/token/default", {"Token": MGMT})[0] == 403  # needs acl:write
    assert agent_json(agent, "PUT", "/v1/agent/token/default", {"Token": MGMT}, token=MGMT)[0] == 200
    try:
        assert agent_json(agent, "PUT", "/v1/kv/deflt", b"x")[0] == 200
    finally:
        assert agent_json(agent, "PUT", "/v1/agent/acl_token", {"Token": ""}, token=MGMT)[0] == 404
        assert agent_json(agent, "PUT", "/v1/agent/token/acl_token", {"Token": ""}, token=MGMT)[0] == 200
    assert agent_json(agent, "PUT", "/v1/kv/deflt", b"x")[0] == 403
