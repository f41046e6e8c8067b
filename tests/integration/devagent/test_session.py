"""Sessions and locks against a dev agent whose smallest session TTL is 1s (Consul's session_ttl_min)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import consul
import pytest

from tests.support import DevAgent, agent_http, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def agent() -> Iterator[DevAgent]:
    a = DevAgent("-session-ttl-min", "1s")
    try:
        yield a
    finally:
        a.stop()


def _c(agent: DevAgent) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=agent.port)


def _create(agent: DevAgent, **body: object) -> str:
    """Create through raw HTTP: py-consul refuses TTLs under 10s client-side."""
    status, _, raw = agent_http(agent, "PUT", "/v1/session/create", json.dumps(body).encode())
    assert status == 200, raw
    return str(json.loads(raw)["ID"])


def test_create_info_shape_and_defaults(agent: DevAgent) -> None:
    c = _c(agent)
    sid = c.session.create(name="shape", ttl=10)
    _, info = c.session.info(sid)
    assert info["ID"] == sid and info["Name"] == "shape"
    assert info["Behavior"] == "release" and info["TTL"] == "10s"
    assert info["LockDelay"] == 15_000_000_000
    assert info["NodeChecks"] == ["serfHealth"]
    node = c.agent.self()["Config"]["NodeName"]
    assert info["Node"] == node
    _, on_node = c.session.node(node)
    assert sid in [s["ID"] for s in on_node]
    _, all_sessions = c.session.list()
    assert sid in [s["ID"] for s in all_sessions]
    assert c.session.destroy(sid) is True
    _, gone = c.session.info(sid)
    assert gone is None
    status, _, body = agent_http(agent, "GET", f"/v1/session/info/{sid}")
    assert status == 200 and json.loads(body) == []


def test_ttl_validation_and_bad_bodies(agent: DevAgent) -> None:
    status, _, body = agent_http(agent, "PUT", "/v1/session/create", json.dumps({"TTL": "500ms"}).encode())
    assert status == 500 and b"Invalid Session TTL" in body
    status, _, body = agent_http(agent, "PUT", "/v1/session/create", json.dumps({"TTL": "86401s"}).encode())
    assert status == 500 and b"Invalid Session TTL" in body
    status, _, body = agent_http(agent, "PUT", "/v1/session/create", json.dumps({"Behavior": "explode"}).encode())
    assert status == 500 and b"Invalid Behavior" in body
    status, _, body = agent_http(agent, "PUT", "/v1/session/create", b"{not json")
    assert status == 400 and body.startswith(b"Request decode failed")
    status, _, body = agent_http(agent, "PUT", "/v1/session/create", json.dumps({"Node": "nope"}).encode())
    assert status == 500 and b"Missing node registration" in body
    status, _, body = agent_http(agent, "PUT", "/v1/session/create", json.dumps({"NodeChecks": ["nope"]}).encode())
    assert status == 500 and b"Missing check 'nope' registration" in body
    status, _, body = agent_http(agent, "PUT", "/v1/session/renew/00000000-0000-0000-0000-00000000dead")
    assert status == 404 and b"not found" in body


def test_lock_is_exclusive_and_release_lets_others_in(agent: DevAgent) -> None:
    c = _c(agent)
    s1 = c.session.create(name="one", lock_delay=0)
    s2 = c.session.create(name="two", lock_delay=0)
    assert c.kv.put("lock/a", "one", acquire=s1) is True
    assert c.kv.put("lock/a", "two", acquire=s2) is False
    _, entry = c.kv.get("lock/a")
    assert entry["Session"] == s1 and entry["LockIndex"] == 1 and entry["Value"] == b"one"
    assert c.kv.put("lock/a", "x", release=s2) is False
    assert c.kv.put("lock/a", "released", release=s1) is True
    _, entry = c.kv.get("lock/a")
    assert "Session" not in entry and entry["Value"] == b"released"
    assert c.kv.put("lock/a", "two", acquire=s2) is True
    _, entry = c.kv.get("lock/a")
    assert entry["Session"] == s2 and entry["LockIndex"] == 2
    status, _, body = agent_http(agent, "PUT", "/v1/kv/lock/b?acquire=00000000-0000-0000-0000-000000000000", b"")
    assert status == 500 and b"invalid session" in body
    c.session.destroy(s1)
    c.session.destroy(s2)


def test_ttl_lapse_releases_lock_then_lock_delay_holds(agent: DevAgent) -> None:
    c = _c(agent)
    holder = _create(agent, Name="holder", TTL="1s", LockDelay="3s")
    assert c.kv.put("ttl/lock", "held", acquire=holder) is True
    other = c.session.create(name="other", lock_delay=0)
    # Consul reaps a session between TTL and 2 x TTL after its last renewal
    t0 = time.monotonic()
    wait_for(lambda: "Session" not in c.kv.get("ttl/lock")[1], timeout=20, what="TTL expiry to release the lock")
    assert time.monotonic() - t0 >= 0.9
    assert c.session.info(holder)[1] is None
    assert c.kv.get("ttl/lock")[1]["Value"] == b"held"  # release keeps the key
    assert c.kv.put("ttl/lock", "other", acquire=other) is False  # lock-delay (3s) still running
    wait_for(lambda: c.kv.put("ttl/lock", "other", acquire=other), timeout=20, what="lock-delay to end")
    c.session.destroy(other)


def test_renew_keeps_session_alive_and_delete_behavior(agent: DevAgent) -> None:
    c = _c(agent)
    sid = _create(agent, Name="renewed", TTL="1s", Behavior="delete", LockDelay=0)
    assert c.kv.put("eph/key", "v", acquire=sid) is True
    for _ in range(8):  # 2.4s > 2 x TTL
        renewed = c.session.renew(sid)
        assert renewed["ID"] == sid
        time.sleep(0.3)
    assert c.session.info(sid)[1] is not None
    wait_for(lambda: c.kv.get("eph/key")[1] is None, timeout=20, what="delete behavior on expiry")


def test_destroy_releases(agent: DevAgent) -> None:
    c = _c(agent)
    sid = c.session.create(lock_delay=0)
    c.kv.put("destroy/k", "v", acquire=sid)
    index, _ = c.kv.get("destroy/k")
    c.session.destroy(sid)
    new_index, entry = c.kv.get("destroy/k")
    assert "Session" not in entry and int(new_index) > int(index)


def test_failing_check_invalidates_its_sessions(agent: DevAgent) -> None:
    c = _c(agent)
    c.agent.service.register("locker", service_id="locker-1", check=consul.Check.ttl("30s"))
    c.agent.check.ttl_pass("service:locker-1")
    sid = _create(agent, Name="guarded", LockDelay=0, NodeChecks=["serfHealth"],
                  ServiceChecks=[{"ID": "service:locker-1"}])
    assert c.kv.put("guarded/lock", "me", acquire=sid) is True
    c.agent.check.ttl_fail("service:locker-1", notes="down")
    wait_for(lambda: c.session.info(sid)[1] is None, timeout=10, what="session invalidated by the check")
    assert "Session" not in c.kv.get("guarded/lock")[1]
    # a session cannot be created on a critical check
    status, _, body = agent_http(agent, "PUT", "/v1/session/create",
                                 json.dumps({"ServiceChecks": [{"ID": "service:locker-1"}]}).encode())
    assert status == 500 and b"critical" in body
    c.agent.service.deregister("locker-1")
