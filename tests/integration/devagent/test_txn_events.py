"""txn, events, status and agent self/members against one dev agent."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from typing import Any

import consul
import pytest

from tests.support import DevAgent, agent_json

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def agent() -> Iterator[DevAgent]:
    a = DevAgent("-node", "node-a", "-datacenter", "dc7")
    try:
        yield a
    finally:
        a.stop()


def _c(agent: DevAgent) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=agent.port, dc="dc7")


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_txn_applies_all(agent: DevAgent) -> None:
    c = _c(agent)
    res = c.txn.put([
        {"KV": {"Verb": "set", "Key": "txn/a", "Value": _b64("1")}},
        {"KV": {"Verb": "set", "Key": "txn/b", "Value": _b64("2"), "Flags": 7}},
        {"KV": {"Verb": "get", "Key": "txn/a"}},
    ])
    assert res["Errors"] is None
    assert [r["KV"]["Key"] for r in res["Results"]] == ["txn/a", "txn/b", "txn/a"]
    assert res["Results"][0]["KV"]["Value"] is None  # writes answer without the value
    assert base64.b64decode(res["Results"][2]["KV"]["Value"]) == b"1"
    assert c.kv.get("txn/b")[1]["Flags"] == 7


def test_txn_all_or_nothing(agent: DevAgent) -> None:
    c = _c(agent)
    c.kv.put("txn2/existing", "x")
    _, entry = c.kv.get("txn2/existing")
    status, _, body = agent_json(agent, "PUT", "/v1/txn", [
                                 {"KV": {"Verb": "set", "Key": "txn2/new", "Value": _b64("n")}},
                                 {"KV": {"Verb": "check-index", "Key": "txn2/existing",
                                         "Index": entry["ModifyIndex"] + 99}},
                                 {"KV": {"Verb": "delete", "Key": "txn2/existing"}},
                                 {"KV": {"Verb": "nonsense", "Key": "txn2/k"}},
                                 ])
    assert status == 409
    assert body["Results"] is None
    assert [e["OpIndex"] for e in body["Errors"]] == [1, 3]
    assert "failed index check" in body["Errors"][0]["What"]
    assert c.kv.get("txn2/new")[1] is None
    assert c.kv.get("txn2/existing")[1]["Value"] == b"x"
    # the same transaction with the right index applies
    res = c.txn.put([
        {"KV": {"Verb": "set", "Key": "txn2/new", "Value": _b64("n")}},
        {"KV": {"Verb": "check-index", "Key": "txn2/existing", "Index": entry["ModifyIndex"]}},
        {"KV": {"Verb": "delete-cas", "Key": "txn2/existing", "Index": entry["ModifyIndex"]}},
        {"KV": {"Verb": "check-not-exists", "Key": "txn2/existing"}},
    ])
    assert res["Errors"] is None
    assert c.kv.get("txn2/existing")[1] is None and c.kv.get("txn2/new")[1]["Value"] == b"n"


def test_txn_locks_and_bad_bodies(agent: DevAgent) -> None:
    c = _c(agent)
    sid = c.session.create(lock_delay=0)
    res = c.txn.put([{"KV": {"Verb": "lock", "Key": "txn3/l", "Session": sid, "Value": _b64("v")}},
                     {"KV": {"Verb": "check-session", "Key": "txn3/l", "Session": sid}}])
    assert res["Results"][0]["KV"]["Session"] == sid
    status, _, body = agent_json(agent, "PUT", "/v1/txn", b"[{")
    assert status == 400 and body.startswith(b"Failed to parse body")
    status, _, body = agent_json(agent, "PUT", "/v1/txn", [{"KV": {"Verb": "get", "Key": "x"}}] * 65)
    assert status == 413
    status, _, body = agent_json(agent, "PUT", "/v1/txn", [{"KV": {"Verb": "set", "Key": "x", "Value": "***"}}])
    assert status == 400
    c.session.destroy(sid)


def test_events_fire_list_and_blocking(agent: DevAgent) -> None:
    c = _c(agent)
    index, before = c.event.list()
    assert isinstance(before, list)
    fired = c.event.fire("deploy", body="v1")
    assert fired["Name"] == "deploy" and fired["LTime"] == 0 and fired["ID"]
    index2, events = c.event.list(name="deploy")
    assert events[-1]["Name"] == "deploy" and events[-1]["Payload"] == b"v1"
    assert events[-1]["Version"] == 1 and events[-1]["LTime"] >= 1
    assert index2 != index
    got: dict[str, Any] = {}

    def block() -> None:
        got["r"] = c.event.list(index=index2, wait="30s")

    th = threading.Thread(target=block)
    th.start()
    th.join(0.5)
    assert th.is_alive()
    c.event.fire("deploy", body="v2")
    th.join(20)
    assert not th.is_alive()
    assert got["r"][1][-1]["Payload"] == b"v2"
    # node filter that does not match this agent: fired, but not kept here
    status, _, body = agent_json(agent, "PUT", "/v1/event/fire/elsewhere?node=^other$", b"")
    assert status == 200 and body["NodeFilter"] == "^other$"
    assert c.event.list(name="elsewhere")[1] == []
    status, _, _ = agent_json(agent, "PUT", "/v1/event/fire/big", b"x" * 600)
    assert status == 500


def test_status_and_agent_self(agent: DevAgent) -> None:
    c = _c(agent)
    assert c.status.leader() == "127.0.0.1:8300"
    assert c.status.peers() == ["127.0.0.1:8300"]
    me = c.agent.self()
    assert me["Config"]["Version"] == "1.22.0"
    assert me["Config"]["Datacenter"] == "dc7" and me["Config"]["NodeName"] == "node-a"
    assert me["Config"]["Server"] is True and me["Config"]["NodeID"]
    assert me["Member"]["Name"] == "node-a" and me["Member"]["Status"] == 1
    members = c.agent.members()
    assert [m["Name"] for m in members] == ["node-a"]
    # the agent's own node and serfHealth check are in the catalog store
    status, _, body = agent_json(agent, "PUT", "/v1/session/create", {"Node": "node-a", "NodeChecks": ["serfHealth"]})
    assert status == 200 and body["ID"]
    status, _, body = agent_json(agent, "GET", "/v1/kv/x?dc=elsewhere")
    assert status == 500 and body == b"No path to datacenter"


def test_default_ttl_minimum_is_ten_seconds(agent: DevAgent) -> None:
    status, _, body = agent_json(agent, "PUT", "/v1/session/create", {"TTL": "5s"})
    assert status == 500 and b"must be between [10s=24h0m0s]" in body
    status, _, body = agent_json(agent, "PUT", "/v1/session/create", {"TTL": "10s"})
    assert status == 200


@pytest.mark.parametrize(("method", "path", "body"), [
    ("PUT", "/v1/session/create", b"[1,2]"),
    ("PUT", "/v1/session/create", b'{"LockDelay": {"x": 1}}'),
    ("PUT", "/v1/session/create", b'{"TTL": 5}'),
    ("PUT", "/v1/session/create", b"\xff\xfe"),
    ("PUT", "/v1/txn", b'{"KV": 1}'),
    ("PUT", "/v1/txn", b'[{"KV": {"Verb": 5, "Key": []}}]'),
    ("PUT", "/v1/txn", b'[{"KV": {"Verb": "set", "Key": "k", "Flags": "x"}}]'),
    ("PUT", "/v1/txn", b"[null, 3]"),
    ("GET", "/v1/kv/x?index=-1", None),
    ("GET", "/v1/kv/x?index=1&wait=1parsec", None),
    ("GET", "/v1/kv/x?stale&consistent", None),
    ("PUT", "/v1/kv/x?flags=-3", b""),
    ("DELETE", "/v1/kv/x?cas=abc", None),
    ("PUT", "/v1/event/fire/x?tag=t", b""),
    ("GET", "/v1/session/info/", None),
])
def test_malformed_requests_answer_with_a_message(agent: DevAgent, method: str, path: str, body: bytes | None) -> None:
    status, _, answer = agent_json(agent, method, path, body)
    assert 400 <= status < 600, (status, answer)
    text = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
    assert text and b"Traceback" not in text
    assert agent_json(agent, "GET", "/v1/status/leader")[0] == 200


def test_operator_raft_configuration(agent: DevAgent) -> None:
    status, _, body = agent_json(agent, "GET", "/v1/operator/raft/configuration")
    assert status == 200
    assert [(s["Node"], s["Leader"], s["Voter"]) for s in body["Servers"]] == [("node-a", True, True)]
    c = _c(agent)
    assert c.operator.raft_config()["Servers"][0]["Address"] == "127.0.0.1:8300"
    status, _, body = agent_json(agent, "GET", "/v1/operator/autopilot/health")
    assert status == 200 and body["Healthy"] is True


def test_coordinates(agent: DevAgent) -> None:
    c = _c(agent)
    dcs = c.coordinate.datacenters()
    assert dcs[0]["Datacenter"] == "dc7" and dcs[0]["Coordinates"][0]["Node"] == "node-a"
    _, coords = c.coordinate.nodes()
    assert [x["Node"] for x in coords] == ["node-a"] and len(coords[0]["Coord"]["Vec"]) == 8
    vec = [0.1] * 8
    status, _, _ = agent_json(agent, "PUT", "/v1/coordinate/update",
                              {"Node": "node-a", "Coord": {"Vec": vec, "Error": 0.5, "Adjustment": 0, "Height": 0.001}})
    assert status == 200
    status, _, body = agent_json(agent, "GET", "/v1/coordinate/node/node-a")
    assert status == 200 and body[0]["Coord"]["Vec"] == vec
    assert agent_json(agent, "GET", "/v1/coordinate/node/nope")[0] == 404
    assert agent_json(agent, "PUT", "/v1/coordinate/update", {"Node": "node-a", "Coord": {"Vec": "x"}})[0] == 400
    # Consul accepts an update for a node it does not know and drops it (state store CoordinateBatchUpdate)
    assert agent_json(agent, "PUT", "/v1/coordinate/update", {"Node": "ghost", "Coord": {"Vec": vec}})[0] == 200
    assert agent_json(agent, "GET", "/v1/coordinate/node/ghost")[0] == 404
    # a coordinate of another dimensionality is not compatible with the agent's own
    status, _, body = agent_json(agent, "PUT", "/v1/coordinate/update", {"Node": "node-a", "Coord": {"Vec": [0.1] * 3}})
    assert status == 500 and "incompatible coordinate" in str(body)
