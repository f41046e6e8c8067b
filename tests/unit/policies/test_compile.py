"""Validation of every kind of bad document, last-good retention, merging and versions."""

from __future__ import annotations

import json
from typing import Any

import pytest

from policies.compile import (
    Compiler,
    Document,
    DocumentError,
    compile_tables,
    parse_entry,
    parse_table,
    validate_document,
)
from policies.evaluate import authorize
from policies.model import TCP, WILDCARD, destination_of_key, table_key_candidates

KEY = "weft/intentions/db"


def doc(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"Kind": "service-intentions", "Name": "db", "Sources": [{"Name": "web", "Action": "allow"}]}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


def src(**fields: Any) -> dict[str, Any]:
    return doc(Sources=[fields])


def l7(http: Any, action: str = "allow") -> dict[str, Any]:
    return src(Name="web", Permissions=[{"Action": action, "HTTP": http}])


# (id, document body, expected substrings of one error: field, problem)
BAD: list[tuple[str, Any, str, str]] = [
    ("not JSON", "{nope", "", "not valid JSON"),
    ("empty", "  ", "", "empty document"),
    ("not an object", "[1, 2]", "", "must be a JSON object"),
    ("kind missing", doc(Kind=...), "Kind", "is required"),
    ("kind wrong", doc(Kind="service-defaults"), "Kind", "must be 'service-intentions'"),
    ("name missing", doc(Name=...), "Name", "is required"),
    ("name partial wildcard", doc(Name="d*"), "Name", "partial values"),
    ("name invalid", doc(Name="db.prod"), "Name", "not valid"),
    ("name does not match key", doc(Name="cache"), "Name", "stored for destination 'db'"),
    ("sources missing", doc(Sources=...), "Sources", "at least one source"),
    ("sources empty", doc(Sources=[]), "Sources", "at least one source"),
    ("sources not a list", doc(Sources={"Name": "web"}), "Sources", "must be a list"),
    ("source not an object", doc(Sources=["web"]), "Sources[0]", "must be a JSON object"),
    ("source name missing", src(Action="allow"), "Sources[0].Name", "is required"),
    ("source partial wildcard", src(Name="web-*", Action="allow"), "Sources[0].Name", "partial values"),
    ("action missing", src(Name="web"), "Sources[0].Action", "must be set to 'allow' or 'deny'"),
    ("action invalid", src(Name="web", Action="permit"), "Sources[0].Action", "'permit'"),
    ("action and permissions", src(Name="web", Action="allow",
                                   Permissions=[{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]),
     "Sources[0].Action", "must be omitted if Permissions are specified"),
    ("L7 on wildcard destination", {"Kind": "service-intentions", "Name": "*", "Sources": [
        {"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]}]},
     "Sources[0].Permissions", "wildcarded destinations"),
    ("duplicate source", doc(Sources=[{"Name": "web", "Action": "allow"}, {"Name": "web", "Action": "deny"}]),
     "Sources[1]", "defines 'web' more than once"),
    ("type not consul", src(Name="web", Action="allow", Type="external"), "Sources[0].Type", "'consul'"),
    ("mode invalid", src(Name="web", Action="allow", Mode="dry-run"), "Sources[0].Mode", "'enforce' or 'audit'"),
    ("entry mode invalid", doc(Mode="log"), "Mode", "'enforce' or 'audit'"),
    ("permission action invalid", src(Name="web", Permissions=[{"Action": "maybe", "HTTP": {"PathPrefix": "/"}}]),
     "Sources[0].Permissions[0].Action", "'allow' or 'deny'"),
    ("permission HTTP missing", src(Name="web", Permissions=[{"Action": "allow"}]),
     "Sources[0].Permissions[0].HTTP", "is required"),
    ("permission HTTP empty", l7({}), "Sources[0].Permissions[0].HTTP", "should not be empty"),
    ("two path matchers", l7({"PathExact": "/a", "PathPrefix": "/b"}), "Permissions[0].HTTP",
     "at most one of PathExact, PathPrefix, or PathRegex"),
    ("PathExact without slash", l7({"PathExact": "a"}), "HTTP.PathExact", "doesn't start with '/'"),
    ("PathPrefix without slash", l7({"PathPrefix": "v1"}), "HTTP.PathPrefix", "doesn't start with '/'"),
    ("bad PathRegex", l7({"PathRegex": "/v1/(unclosed"}), "HTTP.PathRegex", "not a valid regular expression"),
    ("header without name", l7({"Header": [{"Exact": "x"}]}), "HTTP.Header[0]", "missing required Name"),
    ("header with two matchers", l7({"Header": [{"Name": "x", "Exact": "a", "Prefix": "b"}]}), "HTTP.Header[0]",
     "only contain one of Present, Exact, Prefix, Suffix, or Regex"),
    ("header with no matcher", l7({"Header": [{"Name": "x", "Invert": True}]}), "HTTP.Header[0]",
     "only contain one of"),
    ("bad header regex", l7({"Header": [{"Name": "x", "Regex": "[a-"}]}), "HTTP.Header[0].Regex",
     "not a valid regular expression"),
    ("header Present not a bool", l7({"Header": [{"Name": "x", "Present": "yes"}]}), "Header[0].Present",
     "true or false"),
    ("invalid method", l7({"Methods": ["GET", "FETCH"]}), "HTTP.Methods", "invalid method 'FETCH'"),
    ("duplicate method", l7({"Methods": ["GET", "get"]}), "HTTP.Methods", "'GET' more than once"),
    ("unknown field (typo)", l7({"PathPrefx": "/v1"}), "HTTP.PathPrefx", "unknown field"),
    ("unknown top-level field", doc(Destination="db"), "Destination", "unknown field"),
    ("description too long", src(Name="web", Action="allow", Description="x" * 513), "Sources[0].Description",
     "maximum length"),
    ("meta not strings", doc(Meta={"owner": 3}), "Meta.owner", "must be a string"),
    ("meta too many", doc(Meta={f"k{i}": "v" for i in range(65)}), "Meta", "maximum element count"),
    ("namespace not default", doc(Namespace="team-a"), "Namespace", "only 'default'"),
    ("peer", src(Name="web", Action="allow", Peer="other"), "Sources[0].Peer", "not supported"),
    ("JWT", doc(JWT={"Providers": [{"Name": "okta"}]}), "JWT", "not supported"),
    ("name not a string", doc(Name=5), "Name", "must be a string"),
]


@pytest.mark.parametrize(("name", "body", "field", "problem"), BAD, ids=[b[0] for b in BAD])
def test_bad_documents_are_rejected_naming_key_field_and_problem(name: str, body: Any, field: str,
                                                                 problem: str) -> None:
    text = body if isinstance(body, str) else json.dumps(body)
    with pytest.raises(DocumentError) as info:
        parse_entry(text, KEY, expect_name="db")
    errors = info.value.errors
    assert errors and all(e.startswith(KEY + ": ") for e in errors), errors
    assert any(field in e and problem in e for e in errors), errors


def test_all_problems_of_a_document_are_reported_at_once() -> None:
    body = doc(Sources=[{"Name": "web"}, {"Name": "api", "Action": "allow", "Permissions": []},
                        {"Name": "x*", "Action": "deny"}])
    errors = validate_document(json.dumps(body), KEY)
    assert len(errors) == 2 and "Sources[0].Action" in errors[0] and "Sources[2].Name" in errors[1]


def test_snake_case_and_any_case_keys_are_accepted_as_consul_decodes_them() -> None:
    body = {"kind": "service-intentions", "name": "db", "sources": [
        {"name": "web", "permissions": [{"action": "allow", "http": {"path_prefix": "/v1", "methods": ["get"],
                                                                     "header": [{"name": "x", "present": True}]}}]},
        {"Name": "*", "Action": "deny", "Precedence": 8, "Type": "consul"}]}
    entry = parse_entry(json.dumps(body), KEY)
    assert entry.sources[0].permissions[0].http.path_prefix == "/v1"
    assert entry.sources[0].permissions[0].http.methods == ("GET",)
    assert entry.sources[1].action == "deny"


def test_native_entry_fields_written_by_consul_are_accepted() -> None:
    native = {"Kind": "service-intentions", "Name": "db", "Namespace": "default", "Partition": "default",
              "Sources": [{"Name": "web", "Action": "allow", "Precedence": 9, "Type": "consul",
                           "LegacyID": "0b7c5e3a-1111-2222-3333-444444444444", "LegacyMeta": {},
                           "LegacyCreateTime": "2024-01-01T00:00:00Z", "Description": "from the UI"}],
              "CreateIndex": 10, "ModifyIndex": 12, "Hash": 123}
    entry = parse_entry(native, "service-intentions/db")
    assert entry.sources[0].legacy_id.startswith("0b7c5e3a")




def test_bad_document_keeps_last_good_version_in_force() -> None:
    compiler = Compiler("deny")
    good = json.dumps(doc())
    first = compiler.compile([Document.kv(KEY, good)])
    assert authorize(first.tables["db"], "web", TCP).allowed
    bad = json.dumps(doc(Sources=[{"Name": "web", "Action": "alow"}]))
    second = compiler.compile([Document.kv(KEY, bad)])
    assert len(second.errors) == 1 and "Sources[0].Action" in str(second.errors[0])
    assert second.used_last_good == [KEY] and not second.is_frozen("db")
    assert second.tables["db"] == first.tables["db"]
    assert second.tables["db"].version == first.tables["db"].version
    assert any("last good version" in w for w in second.warnings)
    # fixed: the new version takes effect
    fixed = json.dumps(doc(Sources=[{"Name": "web", "Action": "deny"}]))
    third = compiler.compile([Document.kv(KEY, fixed)])
    assert not third.errors and not authorize(third.tables["db"], "web", TCP).allowed


def test_bad_document_without_last_good_freezes_its_destination_only() -> None:
    compiler = Compiler("deny")
    result = compiler.compile([
        Document.kv(KEY, "{broken"),
        Document.kv("weft/intentions/cache", json.dumps(doc(Name="cache"))),
    ])
    assert result.is_frozen("db") and not result.is_frozen("cache") and not result.frozen_all
    assert "db" not in result.tables and "cache" in result.tables
    wild = compiler.compile([Document.kv("weft/intentions/*", "{broken")])
    assert wild.frozen_all and wild.is_frozen("anything")


def test_deleted_document_is_forgotten() -> None:
    compiler = Compiler("deny")
    compiler.compile([Document.kv(KEY, json.dumps(doc()))])
    result = compiler.compile([])
    assert set(result.tables) == {WILDCARD}
    again = compiler.compile([Document.kv(KEY, "{broken")])  # no last good any more
    assert again.is_frozen("db")


def test_native_bad_entry_is_rejected_with_its_entry_name() -> None:
    result = Compiler("deny").compile([Document.native({"Kind": "service-intentions", "Name": "db",
                                                        "Sources": [{"Name": "web", "Action": "allow",
                                                                     "Permissions": []}, {"Name": "web"}]})])
    assert result.errors and result.errors[0].errors[0].startswith("service-intentions/db: ")


def test_pair_in_both_sources_warns_naming_both_origins() -> None:
    result = Compiler("deny").compile([
        Document.kv(KEY, json.dumps(doc())),
        Document.native({"Kind": "service-intentions", "Name": "db", "Sources": [{"Name": "web", "Action": "deny"}]}),
    ])
    assert not result.errors
    (warning,) = result.warnings
    assert "KV weft/intentions/db Sources[0]" in warning and "native service-intentions/db Sources[0]" in warning
    assert "deny wins" in warning
    assert result.tables["db"].warnings == (warning,)


def test_versions_are_content_hashes_independent_of_document_order() -> None:
    a = Document.kv(KEY, json.dumps(doc()))
    b = Document.kv("weft/intentions/*", json.dumps(doc(Name="*", Sources=[{"Name": "*", "Action": "deny"}])))
    r1 = Compiler("deny").compile([a, b])
    r2 = Compiler("deny").compile([b, a])
    assert {d: t.version for d, t in r1.tables.items()} == {d: t.version for d, t in r2.tables.items()}
    r3 = Compiler("allow").compile([a, b])
    assert r3.tables["db"].version != r1.tables["db"].version
    # wildcard rules are part of every destination's table
    assert [r.source for r in r1.tables["db"].rules] == ["web", "*"]
    assert [r.precedence for r in r1.tables["db"].rules] == [9, 5]


def test_wildcard_table_always_exists_and_carries_the_default() -> None:
    tables, _ = compile_tables([], "allow")
    assert set(tables) == {WILDCARD}
    assert tables[WILDCARD].default_policy == "allow" and tables[WILDCARD].rules == ()
    assert table_key_candidates("db") == ("weft/policy/compiled/db", "weft/policy/compiled/_wildcard")
    assert destination_of_key("weft/policy/compiled/_wildcard") == WILDCARD
    assert destination_of_key("weft/policy/compiled/db") == "db"
    assert destination_of_key("weft/policy/compiled/") is None
    with pytest.raises(ValueError):
        compile_tables([], "permit")  # type: ignore[arg-type]


def test_tampered_table_is_refused() -> None:
    table = Compiler("deny").compile([Document.kv(KEY, json.dumps(doc()))]).tables["db"]
    data = table.to_json()
    data["DefaultPolicy"] = "allow"
    with pytest.raises(ValueError, match="does not match its content"):
        parse_table(data)
    data = table.to_json()
    data["Rules"][0]["Action"] = "perhaps"
    with pytest.raises(ValueError, match="Action"):
        parse_table(data)


def test_incremental_compile_reuses_unchanged_tables() -> None:
    compiler = Compiler("deny")
    docs = {d: Document.kv(f"weft/intentions/{d}", json.dumps(doc(Name=d))) for d in ("db", "cache", "queue")}
    first = compiler.compile(docs.values())
    docs["db"] = Document.kv("weft/intentions/db", json.dumps(doc(Sources=[{"Name": "web", "Action": "deny"}])))
    second = compiler.compile(docs.values())
    assert second.tables["cache"] is first.tables["cache"] and second.tables["queue"] is first.tables["queue"]
    assert second.tables["db"] != first.tables["db"]
    # a wildcard-destination change touches every table
    docs["*"] = Document.kv("weft/intentions/*", json.dumps(doc(Name="*", Sources=[{"Name": "*", "Action": "deny"}])))
    third = compiler.compile(docs.values())
    assert all(third.tables[d] != second.tables[d] for d in ("db", "cache", "queue", WILDCARD))
    # the result is the same as compiling from scratch
    fresh = Compiler("deny").compile(docs.values())
    assert fresh.tables == third.tables
