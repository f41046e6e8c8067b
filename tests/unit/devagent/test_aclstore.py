"""ACL tokens and policies in the store: built-ins, bootstrap, links, identities, expiry."""

from __future__ import annotations

import datetime

import pytest

from devagent import acl, aclstore
from devagent.agent import Agent, AgentConfig


def _agent(initial: str | None = None) -> Agent:
    agent = Agent(AgentConfig(node_name="n1", acl_enabled=True, acl_initial_management=initial))
    aclstore.ensure_builtins(agent.store, initial)
    return agent


def test_builtins_and_bootstrap_once() -> None:
    agent = _agent()
    assert agent.store.get("acl_policies", acl.GLOBAL_MANAGEMENT_ID) is not None
    anon = agent.authorizer("")
    assert not anon.key_read("k") and not anon.service_read("s")
    with agent.store.write() as tx:
        token = aclstore.bootstrap(tx)
    assert agent.authorizer(str(token["SecretID"])).management
    with pytest.raises(aclstore.BootstrapNotAllowed, match="reset index"), agent.store.write() as tx:
        aclstore.bootstrap(tx)
    with pytest.raises(acl.ACLNotFound):
        agent.authorizer("unknown")


def test_initial_management_counts_as_bootstrap() -> None:
    agent = _agent("secret-1")
    assert agent.authorizer("secret-1").management
    with pytest.raises(aclstore.BootstrapNotAllowed), agent.store.write() as tx:
        aclstore.bootstrap(tx)


def _token(agent: Agent, **req: object) -> dict[str, object]:
    with agent.store.write() as tx:
        return aclstore.token_set(agent.store, tx, aclstore.decode_token(req), create=True, accessor_in_url="",
                                  caller_secret="", datacenter="dc1")


def test_policy_links_by_name_and_dangling_links() -> None:
    agent = _agent()
    with agent.store.write() as tx:
        p = aclstore.policy_set(agent.store, tx, aclstore.decode_policy(
            {"name": "kv", "rules": 'key_prefix "a/" { policy = "write" }'}), create=True, id_in_url="")
    tok = _token(agent, policies=[{"name": "kv"}])
    assert tok["Policies"] == [{"ID": p["ID"], "Name": "kv"}]
    authz = agent.authorizer(str(tok["SecretID"]))
    assert authz.key_write("a/b") and not authz.key_write("b")
    with agent.store.write() as tx:
        aclstore.policy_delete(agent.store, tx, str(p["ID"]))
    assert not agent.authorizer(str(tok["SecretID"])).key_write("a/b")
    view = aclstore.token_view(agent.store, agent.store.get("acl_tokens", str(tok["AccessorID"])) or {},
                               show_secret=False)
    assert "Policies" not in view and view["SecretID"] == aclstore.REDACTED


def test_validation_errors() -> None:
    agent = _agent()
    with pytest.raises(aclstore.ACLError, match="No such ACL policy"):
        _token(agent, Policies=[{"Name": "nope"}])
    with pytest.raises(aclstore.ACLError, match="invalid name"):
        _token(agent, ServiceIdentities=[{"ServiceName": "Web Server"}])
    with pytest.raises(aclstore.ACLError, match="Invalid Policy"), agent.store.write() as tx:
        aclstore.policy_set(agent.store, tx, {"Name": "bad name"}, create=True, id_in_url="")
    with pytest.raises(aclstore.ACLError, match="global-management"), agent.store.write() as tx:
        aclstore.policy_delete(agent.store, tx, acl.GLOBAL_MANAGEMENT_ID)
    with pytest.raises(aclstore.ACLError, match="should be between"):
        _token(agent, ExpirationTTL="10s")


def test_expiring_token_stops_working() -> None:
    agent = _agent()
    tok = _token(agent, ExpirationTTL="1m", Policies=[{"ID": acl.GLOBAL_MANAGEMENT_ID}])
    assert tok["ExpirationTTL"] == "1m0s"
    assert agent.authorizer(str(tok["SecretID"])).management
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=61)
    assert aclstore.expired(tok, later)
    assert not aclstore.expired(tok)
