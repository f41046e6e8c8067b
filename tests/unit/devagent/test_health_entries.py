"""health/service entries come from a per-instance cache: every change of an instance, its checks,
its node or the node's checks shows in the next answer, a rolled-back write never does, and the
joined body is byte for byte the serialisation of the answer (mocked requests, no sockets)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from devagent import api_health, registry
from devagent import services as sv
from devagent.agent import Agent, AgentConfig
from devagent.http import QueryResult, Req, query_response
from devagent.state import Store


def _agent() -> Agent:
    agent = Agent(AgentConfig(node_name="self"))
    registry.install(agent.store)
    return agent


def _node(store: Store, name: str, addr: str) -> None:
    with store.write() as tx:
        tx.put("nodes", name, {"ID": "", "Node": name, "Address": addr, "Datacenter": "dc1",
                               "TaggedAddresses": {}, "Meta": {}, "CreateIndex": tx.index, "ModifyIndex": tx.index})


def _service(store: Store, node: str, sid: str, tags: list[str]) -> None:
    with store.write() as tx:
        registry.put_service(tx, node, {"ID": sid, "Service": "web", "Tags": tags, "Port": 80, "Address": "",
                                        "Meta": {}})


def _check(store: Store, node: str, cid: str, status: str, sid: str = "") -> None:
    with store.write() as tx:
        tx.put("checks", f"{node}/{cid}", {
            "Node": node, "CheckID": cid, "Name": cid, "Status": status, "Notes": "", "Output": "",
            "ServiceID": sid, "ServiceName": "web" if sid else "", "ServiceTags": [], "Type": "",
            "CreateIndex": tx.index, "ModifyIndex": tx.index})


def _answer(agent: Agent, query: str = "") -> tuple[list[dict[str, Any]], QueryResult]:
    r = Req(make_mocked_request("GET", "/v1/health/service/web" + query), agent)
    res, _ = api_health.health_entries(r, registry.instances(agent.store, "web"), ("service", "web"))
    return res.value, res


def _expected(store: Store) -> list[dict[str, Any]]:
    """The entries computed from scratch, without any cache."""
    out = []
    for row in registry.instances(store, "web"):
        node = store.get("nodes", row["Node"])
        assert node is not None
        checks = store.by_index("checks", "nodelevel", row["Node"]) + registry.service_checks(store, row["Node"],
                                                                                              row["ID"])
        out.append({"Node": sv.public(node), "Service": sv.node_service(row),
                    "Checks": [sv.public(c) for c in sorted(checks, key=lambda c: c["CheckID"])]})
    return out


def test_entries_follow_every_change_and_the_body_is_the_serialisation() -> None:
    agent = _agent()
    store = agent.store
    for n in ("n1", "n2"):
        _node(store, n, "10.0.0.1")
        for i in range(3):
            _service(store, n, f"web-{i}", ["v1"])
            _check(store, n, f"c-{i}", sv.PASSING, f"web-{i}")
    changes: list[Callable[[], None]] = [
        lambda: _check(store, "n1", "c-1", sv.CRITICAL, "web-1"),  # a service check
        lambda: _check(store, "n2", "maint", sv.WARNING),  # a node-level check
        lambda: _node(store, "n1", "10.9.9.9"),  # the node row
        lambda: _service(store, "n2", "web-0", ["v2"]),  # the service row
        lambda: _check(store, "n1", "c-1", sv.PASSING, "web-1"),
    ]
    for change in [None, *changes]:
        if change is not None:
            change()
        value, _ = _answer(agent)
        assert value == _expected(store)
        assert value == _answer(agent)[0]  # and again from the cache
    _, res = _answer(agent)
    r = Req(make_mocked_request("GET", "/v1/health/service/web"), agent)
    body = query_response(r, res).body
    assert body == json.dumps(res.value, separators=(",", ":")).encode()
    pretty = Req(make_mocked_request("GET", "/v1/health/service/web?pretty"), agent)
    assert query_response(pretty, res).body == (json.dumps(res.value, indent=4) + "\n").encode()


def test_passing_and_tag_filters_use_current_checks() -> None:
    agent = _agent()
    store = agent.store
    _node(store, "n1", "10.0.0.1")
    _service(store, "n1", "a", ["blue"])
    _service(store, "n1", "b", ["green"])
    _check(store, "n1", "ca", sv.PASSING, "a")
    _check(store, "n1", "cb", sv.PASSING, "b")
    assert [e["Service"]["ID"] for e in _answer(agent, "?passing")[0]] == ["a", "b"]
    _check(store, "n1", "cb", sv.CRITICAL, "b")
    assert [e["Service"]["ID"] for e in _answer(agent, "?passing")[0]] == ["a"]
    _check(store, "n1", "node", sv.CRITICAL)
    assert _answer(agent, "?passing")[0] == []
    assert [e["Service"]["ID"] for e in _answer(agent, "?tag=green")[0]] == ["b"]
    value, res = _answer(agent, "?tag=green")
    assert res.parts is not None and len(res.parts) == len(value) == 1


def test_a_rolled_back_write_never_shows() -> None:
    agent = _agent()
    store = agent.store
    _node(store, "n1", "10.0.0.1")
    _service(store, "n1", "a", [])
    _check(store, "n1", "ca", sv.PASSING, "a")
    assert _answer(agent)[0][0]["Checks"][0]["Status"] == sv.PASSING
    r = Req(make_mocked_request("GET", "/v1/health/service/web"), agent)
    with pytest.raises(RuntimeError), store.write() as tx:
        registry.set_status(tx, "n1", "ca", sv.CRITICAL, "down")
        seen, _ = api_health.health_entries(r, registry.instances(store, "web"), ("service", "web"))
        assert seen.value[0]["Checks"][0]["Status"] == sv.CRITICAL  # read inside the transaction
        raise RuntimeError("abort")
    assert _answer(agent)[0][0]["Checks"][0]["Status"] == sv.PASSING
    assert _answer(agent)[0] == _expected(store)


def test_the_endpoint_answers_every_change_and_reuses_across_unrelated_writes() -> None:
    agent = _agent()
    store = agent.store
    _node(store, "n1", "10.0.0.1")
    _service(store, "n1", "a", [])
    _check(store, "n1", "ca", sv.PASSING, "a")

    async def get(query: str = "") -> list[dict[str, Any]]:
        r = Req(make_mocked_request("GET", "/v1/health/service/web" + query, match_info={"name": "web"}), agent)
        resp = await api_health.service(r)
        assert isinstance(resp, web.Response) and isinstance(resp.body, bytes)
        assert int(resp.headers["X-Consul-Index"]) >= 1
        return json.loads(resp.body)  # type: ignore[no-any-return]

    def kv_write() -> None:
        with store.write() as tx:
            tx.put("kvs", "unrelated", {"Key": "unrelated", "Value": None, "Flags": tx.index,
                                        "CreateIndex": tx.index, "ModifyIndex": tx.index})

    async def main() -> None:
        changes: list[Callable[[], None]] = [
            kv_write,
            lambda: _check(store, "n1", "ca", sv.CRITICAL, "a"),
            kv_write,
            lambda: _check(store, "n1", "serf", sv.WARNING),
            lambda: _node(store, "n1", "10.1.1.1"),
            lambda: _service(store, "n1", "b", ["x"]),
            kv_write,
        ]
        for change in changes:
            change()
            assert await get() == _expected(store)
            assert await get("?passing") == [e for e in _expected(store)
                                              if all(c["Status"] == sv.PASSING for c in e["Checks"])]

    asyncio.run(main())
