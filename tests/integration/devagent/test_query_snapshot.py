"""Prepared queries (/v1/query) and snapshots (/v1/snapshot) against a running dev agent, written from
Consul's API docs, through py-consul where it has the call."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import consul
import pytest

from tests.integration.devagent.b_http import call
from tests.support import DevAgent

pytestmark = pytest.mark.integration

MGMT = "6d2f0bd4-5b47-4d38-9d6e-0000000000bb"


@pytest.fixture(scope="module")
def acl_agent() -> Iterator[DevAgent]:
    a = DevAgent("-acl-enabled", "-acl-initial-management", MGMT)
    try:
        yield a
    finally:
        a.stop()


def _register(url: str, node: str, sid: str, tags: list[str], status: str, token: str | None = None) -> None:
    body = {"Node": node, "Address": "10.0.0.7", "NodeMeta": {"rack": node},
            "Service": {"Service": "redis", "ID": sid, "Port": 6379, "Tags": tags},
            "Check": {"CheckID": f"{sid}-chk", "Name": "c", "Status": status, "ServiceID": sid}}
    assert call(url, "PUT", "/v1/catalog/register", body, token=token)[0] == 200


def test_py_consul_query_flow(module_agent: DevAgent) -> None:
    """py-consul's own query test, unchanged in substance (it always sends a name_prefix_match template)."""
    c = consul.Consul(host="127.0.0.1", port=module_agent.port)
    assert c.query.list() == []
    query = c.query.create("foo", "fooquery")
    assert query["ID"]
    got = c.query.get(query["ID"])
    assert len(got) == 1 and got[0]["Name"] == "fooquery" and got[0]["ID"] == query["ID"]
    assert c.query.explain("fooquery")["Query"]["Service"]["Service"] == "foo"
    assert c.query.update(query["ID"], "bar", "fooquery") is True
    assert c.query.get(query["ID"])[0]["Service"]["Service"] == "bar"
    assert c.query.delete(query["ID"])
    assert c.query.list() == []


def test_execute_filters_and_templates(module_agent: DevAgent) -> None:
    url = module_agent.url
    _register(url, "q1", "redis-1", ["primary"], "passing")
    _register(url, "q2", "redis-2", ["replica"], "warning")
    _register(url, "q3", "redis-3", ["replica"], "critical")
    status, created, _ = call(url, "POST", "/v1/query", {"Name": "redis-any", "Service": {"Service": "redis"},
                                                         "DNS": {"TTL": "10s"}})
    assert status == 200 and set(created) == {"ID"}
    status, res, headers = call(url, "GET", "/v1/query/redis-any/execute")
    assert status == 200 and int(headers["X-Consul-Index"]) > 0
    assert sorted(n["Service"]["ID"] for n in res["Nodes"]) == ["redis-1", "redis-2"]  # critical dropped
    assert res["Service"] == "redis" and res["DNS"] == {"TTL": "10s"} and res["Datacenter"] == "dc1"
    assert res["Failovers"] == 0 and {"Node", "Service", "Checks"} <= set(res["Nodes"][0])
    by_id = call(url, "GET", f"/v1/query/{created['ID']}/execute?limit=1")[1]
    assert len(by_id["Nodes"]) == 1
    q2 = call(url, "POST", "/v1/query", {"Name": "redis-primary-passing", "Service": {
        "Service": "redis", "OnlyPassing": True, "Tags": ["!replica"], "Near": "_agent"}})[1]
    nodes = call(url, "GET", f"/v1/query/{q2['ID']}/execute?near=_agent")[1]["Nodes"]
    assert [n["Service"]["ID"] for n in nodes] == ["redis-1"]
    # a template: the longest name prefix wins, the regexp's groups render the query
    tmpl = {"Name": "svc-", "Template": {"Type": "name_prefix_match", "Regexp": "^svc-(.+)$"},
            "Service": {"Service": "${match(1)}"}}
    assert call(url, "POST", "/v1/query", tmpl)[0] == 200
    res = call(url, "GET", "/v1/query/svc-redis/execute")[1]
    assert res["Service"] == "redis" and len(res["Nodes"]) == 2
    explained = call(url, "GET", "/v1/query/svc-redis/explain")[1]["Query"]
    assert explained["Service"]["Service"] == "redis" and explained["Name"] == "svc-"
    # Consul's errors
    assert call(url, "GET", "/v1/query/nothing-here/execute")[:2] == (404, b"Query not found")
    assert call(url, "GET", "/v1/query/00000000-0000-0000-0000-000000000000")[:2] == (404, b"Query not found")
    assert call(url, "POST", "/v1/query", {"Service": {}})[:2] == (500, b"Must provide a Service name to query")
    assert call(url, "POST", "/v1/query", {"Name": "redis-any", "Service": {"Service": "x"}})[:2] == \
        (500, b"name 'redis-any' aliases an existing query name")
    assert call(url, "POST", "/v1/query", {"Service": {"Service": "x"}, "Session": "nope"})[:2] == \
        (500, b'invalid session "nope"')
    assert call(url, "PUT", "/v1/query/unknown-id", {"Service": {"Service": "x"}})[:2] == \
        (500, b"Cannot modify non-existent prepared query: 'unknown-id'")
    for bad in (b"{", b"[]", json.dumps({"Service": {"Tags": "x"}}).encode(), json.dumps({"Name": 5}).encode()):
        status, body, _ = call(url, "POST", "/v1/query", bad)
        assert status == 400 and body.startswith(b"Request decode failed"), (bad, body)
    assert call(url, "GET", "/v1/query/redis-any/execute?limit=x")[0] == 500
    for q in call(url, "GET", "/v1/query")[1]:
        assert call(url, "DELETE", f"/v1/query/{q['ID']}")[0] == 200
    assert call(url, "GET", "/v1/status/leader")[0] == 200


def test_query_bound_to_a_session_goes_with_it(module_agent: DevAgent) -> None:
    url = module_agent.url
    sid = call(url, "PUT", "/v1/session/create", {"Name": "s"})[1]["ID"]
    qid = call(url, "POST", "/v1/query", {"Session": sid, "Service": {"Service": "redis"}})[1]["ID"]
    _, _, headers = call(url, "GET", "/v1/query")
    result: dict[str, object] = {}
    t = threading.Thread(target=lambda: result.update(
        r=call(url, "GET", f"/v1/query?index={headers['X-Consul-Index']}&wait=10s")))
    t.start()
    assert call(url, "PUT", f"/v1/session/destroy/{sid}")[0] == 200
    t.join(15)
    assert result["r"][1] == []  # type: ignore[index]
    assert call(url, "GET", f"/v1/query/{qid}")[0] == 404


def test_query_acls_and_token_redaction(acl_agent: DevAgent) -> None:
    url = acl_agent.url
    status, _, _ = call(url, "POST", "/v1/query", {"Name": "secret-q", "Service": {"Service": "redis"}})
    assert status == 403
    qid = call(url, "POST", "/v1/query", {"Name": "secret-q", "Token": "sekrit", "Service": {"Service": "redis"}},
               token=MGMT)[1]["ID"]
    assert call(url, "GET", f"/v1/query/{qid}", token=MGMT)[1][0]["Token"] == "sekrit"
    policy = call(url, "PUT", "/v1/acl/policy", {"Name": "q-read", "Rules": 'query_prefix "" { policy = "read" }'},
                  token=MGMT)[1]
    reader = call(url, "PUT", "/v1/acl/token", {"Policies": [{"ID": policy["ID"]}]}, token=MGMT)[1]["SecretID"]
    assert call(url, "GET", f"/v1/query/{qid}", token=reader)[1][0]["Token"] == "<hidden>"
    assert call(url, "GET", "/v1/query")[1] == []  # anonymous sees nothing (filtered)
    assert call(url, "DELETE", f"/v1/query/{qid}", token=reader)[0] == 403
    assert call(url, "DELETE", f"/v1/query/{qid}", token=MGMT)[0] == 200


def test_snapshot_save_and_restore(acl_agent: DevAgent) -> None:
    """py-consul's snapshot test, plus what a restore must bring back and wake."""
    url = acl_agent.url
    c = consul.Consul(host="127.0.0.1", port=acl_agent.port, token=MGMT)
    c.kv.put("snapshot-test-key", "before-snapshot", token=MGMT)
    assert call(url, "PUT", "/v1/config", {"Kind": "service-defaults", "Name": "snap", "Protocol": "http"},
                token=MGMT)[1] is True
    _register(url, "snap-node", "snap-1", [], "passing", token=MGMT)
    status, snap, headers = call(url, "GET", "/v1/snapshot", token=MGMT)
    assert status == 200 and isinstance(snap, bytes) and snap[:2] == b"\x1f\x8b"
    assert int(headers["X-Consul-Index"]) > 0
    assert c.snapshot.save(token=MGMT)[:2] == b"\x1f\x8b"
    c.kv.put("snapshot-test-key", "after-snapshot", token=MGMT)
    c.kv.put("only-after", "x", token=MGMT)
    assert call(url, "DELETE", "/v1/config/service-defaults/snap", token=MGMT)[0] == 200
    # a watcher of the key wakes when the restore changes it
    index, _ = c.kv.get("snapshot-test-key", token=MGMT)
    woke: dict[str, object] = {}
    t = threading.Thread(target=lambda: woke.update(
        r=c.kv.get("snapshot-test-key", index=index, wait="10s", token=MGMT)))
    t.start()
    assert c.snapshot.restore(snap, token=MGMT) is True
    t.join(15)
    assert woke["r"][1]["Value"] == b"before-snapshot"  # type: ignore[index]
    assert c.kv.get("snapshot-test-key", token=MGMT)[1]["Value"] == b"before-snapshot"
    assert c.kv.get("only-after", token=MGMT)[1] is None
    assert c.config.get("service-defaults", "snap", token=MGMT)["Protocol"] == "http"
    assert [n["Service"]["ID"] for n in c.health.service("redis", token=MGMT)[1]] == ["snap-1"]
    # a single key answers its own ModifyIndex, as Consul's: the restored (older) one, so clients reset
    assert int(call(url, "GET", "/v1/kv/snapshot-test-key", token=MGMT)[2]["X-Consul-Index"]) < int(index)
    # the agent still knows itself and still serves
    assert call(url, "GET", "/v1/status/leader")[0] == 200
    # ACLs: a management-grade token, as Consul
    with pytest.raises(consul.ACLPermissionDenied):
        c.snapshot.save(token="anonymous")
    assert call(url, "PUT", "/v1/snapshot", snap)[0] == 403


def test_hostile_snapshots_change_nothing(acl_agent: DevAgent) -> None:
    url = acl_agent.url
    c = consul.Consul(host="127.0.0.1", port=acl_agent.port, token=MGMT)
    c.kv.put("keep-me", "1", token=MGMT)
    for body, want in [(b"not gzip", b"gzip: invalid header"),
                       (gzip.compress(b"[1, 2"), b"failed to read snapshot state"),
                       (gzip.compress(json.dumps({"Format": "consul"}).encode()), b"unknown format"),
                       (gzip.compress(json.dumps({"Format": "weft-devagent-snapshot", "Version": 1, "Index": 3,
                                                  "Tables": {"kvs": []}}).encode()), b"not objects of rows"),
                       (gzip.compress(b"x" * 10)[:-6], b"failed to decompress")]:
        status, got, _ = call(url, "PUT", "/v1/snapshot", body, token=MGMT)
        assert status == 500 and want in got, (status, got[:200])
    assert c.kv.get("keep-me", token=MGMT)[1]["Value"] == b"1"


def test_restore_is_durable_with_a_data_dir(tmp_path: Path) -> None:
    a = DevAgent(data_dir=tmp_path / "d")
    try:
        c = consul.Consul(host="127.0.0.1", port=a.port)
        c.kv.put("k", "v1")
        snap = call(a.url, "GET", "/v1/snapshot")[1]
        c.kv.put("k", "v2")
        assert call(a.url, "PUT", "/v1/snapshot", snap)[0] == 200
        qid = c.query.create("redis", "kept-query")["ID"]
        assert c.connect.ca.update_configuration(provider="weft", config={"LeafCertTTL": "12h"}) is True
    finally:
        a.stop()
    b = DevAgent(data_dir=tmp_path / "d")
    try:
        c = consul.Consul(host="127.0.0.1", port=b.port)
        assert c.kv.get("k")[1]["Value"] == b"v1"
        assert c.query.get(qid)[0]["Name"] == "kept-query"
        assert c.connect.ca.configuration()["Config"]["LeafCertTTL"] == "12h"
    finally:
        b.stop()
