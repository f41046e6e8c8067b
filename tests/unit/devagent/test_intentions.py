"""Intentions: precedence, Consul's validation, the legacy view, match order, decisions (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from devagent import configcheck as check
from devagent import configentries as ce
from devagent import intentions as ix


def _entry(name: str, *sources: dict[str, Any]) -> dict[str, Any]:
    return ix.normalize_entry({"Kind": ix.KIND, "Name": name, "Sources": list(sources)})


def test_normalize_sorts_by_precedence_and_defaults_type() -> None:
    e = _entry("db", {"Name": "*", "Action": "DENY"}, {"Name": "web", "Action": "allow",
                                                        "Permissions": None})
    assert [s["Name"] for s in e["Sources"]] == ["web", "*"]
    assert e["Sources"][1]["Action"] == "deny" and e["Sources"][0]["Type"] == "consul"
    assert [s["Precedence"] for s in e["Sources"]] == [9, 8]


@pytest.mark.parametrize(("sources", "name", "error"), [
    ([], "db", "At least one source is required"),
    ([{"Name": "web"}], "db", r"Sources\[0\].Action must be set to 'allow' or 'deny'"),
    ([{"Name": "web", "Action": "allow", "Permissions": [{"Action": "allow", "HTTP": {"PathExact": "/"}}]}], "db",
     r"Sources\[0\].Action must be omitted if Permissions are specified"),
    ([{"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathExact": "/"}}]}], "*",
     "cannot be specified on intentions with wildcarded destinations"),
    ([{"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathExact": "x"}}]}], "db",
     "PathExact doesn't start with '/'"),
    ([{"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {}}]}], "db", "should not be empty"),
    ([{"Name": "web", "Action": "allow"}, {"Name": "web", "Action": "deny"}], "db", 'defines "web" more than once'),
    ([{"Name": "we*", "Action": "allow"}], "db", "wildcard character"),
    ([{"Name": "web", "Action": "allow"}], "", "Name is required"),
])
def test_validation_words(sources: list[dict[str, Any]], name: str, error: str) -> None:
    with pytest.raises(ix.IntentionError, match=error):
        ix.validate_entry(_entry(name, *sources))


def test_legacy_view_and_string() -> None:
    e = {**_entry("db", {"Name": "web", "Action": "allow"}), "CreateIndex": 3, "ModifyIndex": 4}
    (ixn,) = ix.to_intentions(e)
    assert ixn["SourceName"] == "web" and ixn["DestinationName"] == "db" and ixn["Precedence"] == 9
    assert ixn["SourceNS"] == ixn["DestinationNS"] == "default" and ixn["ID"] == ""
    assert ixn["CreateIndex"] == 3 and ixn["Hash"]
    assert ix.intention_string(ixn) == "web => db (Precedence: 9, Action: ALLOW)"
    legacy = {**ixn, "ID": "abc"}
    assert ix.intention_string(legacy) == "web => db (ID: abc, Precedence: 9, Action: ALLOW)"


def test_match_order_and_decide() -> None:
    entries = [
        _entry("db", {"Name": "*", "Action": "deny"}, {"Name": "web", "Action": "allow"}),
        _entry("*", {"Name": "web", "Action": "deny"}, {"Name": "*", "Action": "allow"}),
    ]
    all_ixns = [i for e in entries for i in ix.to_intentions(e)]
    ordered = ix.match(all_ixns, "destination", "db")
    assert [(i["SourceName"], i["DestinationName"]) for i in ordered] == \
        [("web", "db"), ("*", "db"), ("web", "*"), ("*", "*")]
    assert ix.decide(all_ixns, "web", "db")["Action"] == "allow"  # type: ignore[index]
    assert ix.decide(all_ixns, "api", "db")["Action"] == "deny"  # type: ignore[index]
    assert ix.decide(all_ixns, "web", "cache")["Action"] == "deny"  # type: ignore[index]
    assert ix.decide(all_ixns, "api", "cache")["Action"] == "allow"  # type: ignore[index]
    assert ix.decide([], "a", "b") is None
    by_source = ix.match(all_ixns, "source", "web")
    assert [i["Precedence"] for i in by_source] == [9, 8, 6, 5]


def test_allowed_l7_counts_as_deny_and_default() -> None:
    l7 = {"Action": "", "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]}
    assert ix.allowed(l7, True) is False
    assert ix.allowed({"Action": "allow"}, False) is True
    assert ix.allowed(None, True) is True and ix.allowed(None, False) is False


def test_upsert_and_remove_keep_one_store() -> None:
    e = ix.upsert_source(None, "db", {"Name": "web", "Action": "allow"}, now="t1")
    e = ix.upsert_source(e, "db", {"Name": "api", "Action": "deny"}, now="t2")
    e = ix.upsert_source(e, "db", {"Name": "web", "Action": "deny"}, now="t3")
    assert [(s["Name"], s["Action"]) for s in e["Sources"]] == [("web", "deny"), ("api", "deny")]
    assert e["Sources"][0]["_CreatedAt"] == "t1" and e["Sources"][0]["_UpdatedAt"] == "t3"
    e2 = ix.remove_source(e, "web")
    assert e2 is not None and [s["Name"] for s in e2["Sources"]] == ["api"]
    assert ix.remove_source(e2, "api") is None


def test_spiffe_and_components() -> None:
    assert ix.spiffe_service("spiffe://td.consul/ns/default/dc/dc1/svc/web") == ("default", "web")
    assert ix.spiffe_service("spiffe://td.consul/ap/default/ns/default/dc/dc1/svc/web") == ("default", "web")
    assert ix.spiffe_service("spiffe://td.consul/agent/client/dc/dc1/id/x") is None
    assert ix.parse_component("default/default/web", "source") == "web"
    with pytest.raises(ix.IntentionError):
        ix.parse_component("a/b/c/d", "source")


def test_config_entry_decoding_and_rules() -> None:
    entry = check.normalize_and_validate(ce.decode({"kind": "service-defaults", "name": "db", "protocol": "GRPC"}))
    assert entry == {"Kind": "service-defaults", "Name": "db", "Protocol": "grpc", "TransparentProxy": {},
                     "MeshGateway": {}, "Expose": {}}
    with pytest.raises(Exception, match="invalid config entry kind"):
        ce.decode({"Kind": "nope", "Name": "x"})
    with pytest.raises(Exception, match="Kind"):
        ce.decode({"Name": "x"})
    with pytest.raises(Exception, match="invalid config key"):
        ce.decode({"Kind": "service-defaults", "Name": "x", "Bogus": 1})
    with pytest.raises(ce.ConfigEntryError, match='only "global" is supported'):
        check.normalize_and_validate(ce.decode({"Kind": "proxy-defaults", "Name": "x"}))
    with pytest.raises(ce.ConfigEntryError, match="must be 100"):
        check.normalize_and_validate(ce.decode({"Kind": "service-splitter", "Name": "x",
                                                "Splits": [{"Weight": 60}, {"Weight": 30, "Service": "y"}]}))
    check.normalize_and_validate(ce.decode({"Kind": "service-splitter", "Name": "x",
                                            "Splits": [{"Weight": 60}, {"Weight": 40, "Service": "y"}]}))
    row = {"Kind": ix.KIND, "Name": "db", "Sources": [{"Name": "web", "_CreatedAt": "t"}], "_x": 1}
    assert ce.public_entry(row) == {"Kind": ix.KIND, "Name": "db", "Sources": [{"Name": "web"}]}
