"""Session semantics on the store: invalidation by check, node, destroy; lock-delay; validation."""

from __future__ import annotations

import pytest

from devagent import kv, sessions
from devagent.agent import Agent, AgentConfig, serf_check
from devagent.codec import SECOND
from devagent.state import Store


def _agent() -> Agent:
    agent = Agent(AgentConfig(node_name="n1"))
    sessions.install_triggers(agent.store, agent.lock_delays)
    agent.ensure_local_node()
    return agent


def _session(agent: Agent, sid: str, **body: object) -> None:
    row = sessions.build(body or None, default_node="n1", session_id=sid, ttl_min=10 * SECOND)
    with agent.store.write() as tx:
        sessions.create(tx, row)


def test_build_defaults_and_lock_delay_units() -> None:
    row = sessions.build(None, default_node="n1", session_id="s", ttl_min=10 * SECOND)
    assert row["NodeChecks"] == ["serfHealth"] and row["Behavior"] == "release"
    assert row["LockDelay"] == 15 * SECOND and row["TTL"] == ""
    assert sessions.lock_delay(5) == 5 * SECOND  # small numbers are seconds
    assert sessions.lock_delay(2_000_000_000) == 2 * SECOND
    assert sessions.lock_delay("250ms") == 250_000_000
    row = sessions.build({"checks": []}, default_node="n1", session_id="s", ttl_min=10 * SECOND)
    assert row["NodeChecks"] is None
    with pytest.raises(sessions.SessionError, match="Invalid Session TTL"):
        sessions.build({"ttl": "9s"}, default_node="n1", session_id="s", ttl_min=10 * SECOND)


def test_critical_check_invalidates_and_releases_with_lock_delay() -> None:
    agent = _agent()
    _session(agent, "s1", LockDelay="2s")
    with agent.store.write() as tx:
        assert kv.kv_lock(tx, "k", "dg==", 0, "s1")
    crit = {**serf_check("n1", 1, 1), "Status": "critical"}
    with agent.store.write() as tx:
        tx.put("checks", "n1/serfHealth", {**crit, "ModifyIndex": tx.index})
    assert agent.store.get("sessions", "s1") is None
    row = agent.store.get("kvs", "k")
    assert row is not None and "Session" not in row and row["Value"] == "dg=="
    assert kv.lock_delay_active(agent.lock_delays, "k")
    # a session cannot be created on a critical check
    with pytest.raises(sessions.SessionError, match="critical"):
        _session(agent, "s2")


def test_node_delete_and_delete_behavior() -> None:
    agent = _agent()
    _session(agent, "s1", Behavior="delete", LockDelay=0)
    with agent.store.write() as tx:
        kv.kv_lock(tx, "eph", None, 0, "s1")
    with agent.store.write() as tx:
        tx.delete("nodes", "n1")
    assert agent.store.get("sessions", "s1") is None
    assert agent.store.get("kvs", "eph") is None
    assert not kv.lock_delay_active(agent.lock_delays, "eph")


def test_destroy_unknown_session_is_a_no_op() -> None:
    store = Store()
    with store.write() as tx:
        assert sessions.destroy(store, tx, "nope", {}) is False
    assert store.index == 0
