"""Prepared queries: decoding, Consul's checks, lookup by ID/name/template, rendering, filtering."""

from __future__ import annotations

from typing import Any

import pytest

from devagent import preparedqueries as pq
from devagent.codec import DecodeError


def query(**over: Any) -> dict[str, Any]:
    q = pq.decode({"Service": {"Service": "redis"}, **over})
    q["ID"] = over.get("ID", "q-" + (q["Name"] or "anon"))
    return q


def test_decode_accepts_any_key_case_and_refuses_wrong_types() -> None:
    q = pq.decode({"name": "n", "service": {"service": "s", "onlypassing": True, "tags": ["a"]},
                   "template": {"type": "name_prefix_match"}, "dns": {"ttl": "10s"}})
    assert q["Service"]["OnlyPassing"] is True and q["Template"]["Type"] == "name_prefix_match"
    assert q["DNS"] == {"TTL": "10s"} and q["Service"]["Failover"] == {"NearestN": 0, "Datacenters": [],
                                                                        "Targets": []}
    bad: dict[str, Any]
    for bad in ({"Name": 3}, {"Service": []}, {"Service": {"Tags": "x"}}, {"Service": {"OnlyPassing": "yes"}},
                {"Service": {"Failover": {"NearestN": True}}}):
        with pytest.raises(DecodeError):
            pq.decode(bad)


def test_consul_checks() -> None:
    with pytest.raises(pq.QueryError, match="Must provide a Service name to query"):
        pq.validate(pq.decode({}))
    with pytest.raises(pq.QueryError, match=r"Bad Template\.Type 'x'"):
        pq.validate(query(Template={"Type": "x"}))
    with pytest.raises(pq.QueryError, match="Bad Regexp"):
        pq.validate(query(Template={"Type": "name_prefix_match", "Regexp": "("}))
    with pytest.raises(pq.QueryError, match="Bad NearestN '-1', must be >= 0"):
        pq.validate(query(Service={"Service": "r", "Failover": {"NearestN": -1}}))
    with pytest.raises(pq.QueryError, match="Bad DNS TTL 'soon'"):
        pq.validate(query(DNS={"TTL": "soon"}))
    a = query(Name="a")
    with pytest.raises(pq.QueryError, match="name 'a' aliases an existing query name"):
        pq.check_clash(query(Name="a", ID="other"), [a])
    with pytest.raises(pq.QueryError, match="aliases an existing query ID"):
        pq.check_clash(query(Name=a["ID"], ID="other"), [a])
    t1 = query(Template={"Type": "name_prefix_match"}, ID="t1")
    with pytest.raises(pq.QueryError, match="a query template with an empty name already exists"):
        pq.check_clash(query(Template={"Type": "name_prefix_match"}, ID="t2"), [t1])


def test_lookup_and_template_rendering() -> None:
    static = query(Name="geo-db")
    catch_all = query(Template={"Type": "name_prefix_match"}, ID="all",
                      Service={"Service": "${name.full}"})
    geo = query(Name="geo-", ID="geo", Template={"Type": "name_prefix_match", "Regexp": "^geo-(.+?)-(.+)$",
                                                   "RemoveEmptyTags": True},
                Service={"Service": "${match(1)}", "Tags": ["${match(2)}", "${match(9)}", "${name.suffix}"]})
    qs = [static, catch_all, geo]
    assert pq.lookup("q-geo-db", qs) is static and pq.lookup("geo-db", qs) is static
    assert pq.lookup("geo-api-v1", qs) is geo and pq.lookup("web", qs) is catch_all
    assert pq.lookup("web", [static]) is None
    rendered = pq.render(geo, "geo-api-v1")
    assert rendered["Service"]["Service"] == "api" and rendered["Service"]["Tags"] == ["v1", "api-v1"]
    assert rendered["Name"] == "geo-" and rendered["Template"] == geo["Template"]
    assert pq.render(catch_all, "web")["Service"]["Service"] == "web"
    assert pq.render(static, "geo-db") == static


def entry(node: str, tags: list[str], statuses: dict[str, str], meta: dict[str, str] | None = None) -> dict[str, Any]:
    return {"Node": {"Node": node, "Meta": meta or {}}, "Service": {"Tags": tags, "Meta": {}},
            "Checks": [{"CheckID": cid, "Status": st} for cid, st in statuses.items()]}


def test_select_nodes_follows_consul_filtering() -> None:
    ok = entry("a", ["Primary"], {"serfHealth": "passing"})
    warn = entry("b", ["primary"], {"serfHealth": "passing", "c": "warning"})
    crit = entry("c", ["primary"], {"c": "critical"}, {"rack": "1"})
    entries = [ok, warn, crit]
    assert pq.select_nodes(query(), entries) == [ok, warn]
    assert pq.select_nodes(query(Service={"Service": "r", "OnlyPassing": True}), entries) == [ok]
    assert pq.select_nodes(query(Service={"Service": "r", "IgnoreCheckIDs": ["c"]}), entries) == entries
    assert pq.select_nodes(query(Service={"Service": "r", "Tags": ["PRIMARY"]}), entries) == [ok, warn]
    assert pq.select_nodes(query(Service={"Service": "r", "Tags": ["!primary"]}), entries) == []
    assert pq.select_nodes(query(Service={"Service": "r", "IgnoreCheckIDs": ["c"], "NodeMeta": {"rack": "1"}}),
                           entries) == [crit]
    shown = pq.public(query(Token="secret"), show_token=False)
    assert shown["Token"] == "<hidden>"
