"""Table-driven precedence, L7 and audit cases, written from Consul's intention documentation.

Each case: intentions by destination (as KV documents, unless marked native), the default policy,
then (source, destination, request) -> expected allowed / audited / deciding origin.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from policies.compile import Compiler, Document, loads_table
from policies.evaluate import authorize
from policies.model import (
    TCP,
    WILDCARD,
    CompiledTable,
    GrpcRequest,
    HttpRequest,
    Request,
)


def entry(name: str, *sources: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"Kind": "service-intentions", "Name": name, "Sources": list(sources), **extra}


def l4(name: str, action: str, **extra: Any) -> dict[str, Any]:
    return {"Name": name, "Action": action, **extra}


def l7(name: str, *perms: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"Name": name, "Permissions": list(perms), **extra}


def perm(action: str, **http: Any) -> dict[str, Any]:
    return {"Action": action, "HTTP": http}


def build(kv: list[dict[str, Any]], native: list[dict[str, Any]] | None = None,
          default: str = "deny") -> dict[str, CompiledTable]:
    docs = [Document.kv(f"weft/intentions/{e['Name']}", json.dumps(e)) for e in kv]
    docs += [Document.native(e) for e in native or []]
    result = Compiler(default).compile(docs)  # type: ignore[arg-type]
    assert not result.errors, result.errors
    return result.tables


def table_for(tables: dict[str, CompiledTable], dest: str) -> CompiledTable:
    """What a sidecar of `dest` enforces: its own table, else the wildcard table."""
    return tables.get(dest) or tables[WILDCARD]


GET = HttpRequest.of("GET", "/")


def http(method: str, path: str, **headers: str) -> HttpRequest:
    return HttpRequest.of(method, path, {k.replace("_", "-"): v for k, v in headers.items()})


# (id, kv entries, native entries, default policy, [(src, dst, request, allowed, origin-substring or None)])
CASES: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]], str,
                  list[tuple[str, str, Request, bool, str | None]]]] = [
    ("default deny, no intentions", [], [], "deny", [
        ("web", "db", TCP, False, None),
    ]),
    ("default allow, no intentions", [], [], "allow", [
        ("web", "db", TCP, True, None),
        ("web", "db", GET, True, None),
    ]),
    ("exact allow only", [entry("db", l4("web", "allow"))], [], "deny", [
        ("web", "db", TCP, True, "web -> db"),
        ("api", "db", TCP, False, None),
        ("web", "cache", TCP, False, None),
    ]),
    ("9 beats 8: exact allow over wildcard-source deny",
     [entry("db", l4("web", "allow"), l4("*", "deny"))], [], "allow", [
        ("web", "db", TCP, True, "web -> db"),
        ("api", "db", TCP, False, "* -> db"),
    ]),
    ("9 beats 8: exact deny over wildcard-source allow",
     [entry("db", l4("web", "deny"), l4("*", "allow"))], [], "deny", [
        ("web", "db", TCP, False, "web -> db"),
        ("api", "db", TCP, True, "* -> db"),
    ]),
    ("8 beats 6: * -> db allow over web -> * deny",
     [entry("db", l4("*", "allow")), entry("*", l4("web", "deny"))], [], "deny", [
         ("web", "db", TCP, True, "* -> db"),
         ("web", "cache", TCP, False, "web -> *"),
         ("api", "cache", TCP, False, None),
     ]),
    ("6 beats 5: web -> * allow over * -> * deny", [entry("*", l4("web", "allow"), l4("*", "deny"))], [], "allow", [
        ("web", "db", TCP, True, "web -> *"),
        ("api", "db", TCP, False, "* -> *"),
    ]),
    ("* -> * allow opens everything under default deny", [entry("*", l4("*", "allow"))], [], "deny", [
        ("web", "db", TCP, True, "* -> *"),
        ("x", "y", GET, True, "* -> *"),
    ]),
    ("exact deny under default allow", [entry("db", l4("web", "deny"))], [], "allow", [
        ("web", "db", TCP, False, "web -> db"),
        ("api", "db", TCP, True, None),
    ]),
    ("only the highest precedence decides (lower allow is not consulted)",
     [entry("db", l4("web", "deny"), l4("*", "allow")), entry("*", l4("web", "allow"), l4("*", "allow"))],
     [], "allow", [
         ("web", "db", TCP, False, "web -> db"),
         ("web", "other", TCP, True, "web -> *"),
     ]),
    ("L7: deny admin then allow everything under /",
     [entry("api", l7("web", perm("deny", PathPrefix="/admin"), perm("allow", PathPrefix="/")))], [], "deny", [
         ("web", "api", http("GET", "/admin/users"), False, "Permissions[0]"),
         ("web", "api", http("GET", "/v1/items"), True, "Permissions[1]"),
     ]),
    ("L7: first match is final (allow before a more specific deny)",
     [entry("api", l7("web", perm("allow", PathPrefix="/api"), perm("deny", PathExact="/api/secret")))], [], "deny", [
         ("web", "api", http("GET", "/api/secret"), True, "Permissions[0]"),
     ]),
    ("L7: no matching permission -> default policy, NOT the lower * -> api allow",
     [entry("api", l7("web", perm("allow", PathPrefix="/v1", Methods=["GET"])), l4("*", "allow"))], [], "deny", [
         ("web", "api", http("GET", "/v1/x"), True, "Permissions[0]"),
         ("web", "api", http("POST", "/v1/x"), False, "no permission"),
         ("web", "api", http("GET", "/v2"), False, "no permission"),
         ("other", "api", http("POST", "/v2"), True, "* -> api"),
     ]),
    ("L7: no matching permission under default allow -> allowed",
     [entry("api", l7("web", perm("deny", PathPrefix="/admin")), l4("*", "deny"))], [], "allow", [
         ("web", "api", http("GET", "/admin"), False, "Permissions[0]"),
         ("web", "api", http("GET", "/public"), True, "no permission"),
         ("other", "api", http("GET", "/public"), False, "* -> api"),
     ]),
    ("L7: methods (case-insensitive in the document)",
     [entry("api", l7("web", perm("allow", PathPrefix="/v2", Methods=["get", "HEAD"])))], [], "deny", [
         ("web", "api", http("GET", "/v2/w"), True, None),
         ("web", "api", http("head", "/v2/w"), True, None),
         ("web", "api", http("DELETE", "/v2/w"), False, None),
     ]),
    ("L7: PathExact ignores the query string; PathPrefix is a plain string prefix",
     [entry("api", l7("web", perm("allow", PathExact="/health"), perm("allow", PathPrefix="/v1")))], [], "deny", [
         ("web", "api", http("GET", "/health?verbose=1"), True, "Permissions[0]"),
         ("web", "api", http("GET", "/health/x"), False, None),
         ("web", "api", http("GET", "/v10"), True, "Permissions[1]"),
     ]),
    ("L7: PathRegex must match the whole path",
     [entry("api", l7("web", perm("allow", PathRegex="/v[0-9]+/.*")))], [], "deny", [
         ("web", "api", http("GET", "/v2/items"), True, None),
         ("web", "api", http("GET", "/x/v2/items"), False, None),
         ("web", "api", http("GET", "/v2"), False, None),
     ]),
    ("L7: header Exact / Prefix / Suffix / Regex / Present, names case-insensitive",
     [entry("api", l7("web",
                      perm("allow", Header=[{"Name": "X-Exact", "Exact": "yes"}]),
                      perm("allow", Header=[{"Name": "x-prefix", "Prefix": "pre"}]),
                      perm("allow", Header=[{"Name": "x-suffix", "Suffix": "fix"}]),
                      perm("allow", Header=[{"Name": "x-regex", "Regex": "[a-c]+"}]),
                      perm("allow", Header=[{"Name": "X-Present", "Present": True}])))], [], "deny", [
         ("web", "api", http("GET", "/", x_exact="yes"), True, "Permissions[0]"),
         ("web", "api", http("GET", "/", x_exact="yess"), False, None),
         ("web", "api", http("GET", "/", x_prefix="prefix"), True, "Permissions[1]"),
         ("web", "api", http("GET", "/", x_suffix="suffix"), True, "Permissions[2]"),
         ("web", "api", http("GET", "/", x_regex="abc"), True, "Permissions[3]"),
         ("web", "api", http("GET", "/", x_regex="abcd"), False, None),
         ("web", "api", HttpRequest.of("GET", "/", {"X-PRESENT": ""}), True, "Permissions[4]"),
         ("web", "api", http("GET", "/"), False, "no permission"),
     ]),
    ("L7: Invert; a missing header matches only an inverted Present",
     [entry("api", l7("web",
                      perm("deny", Header=[{"Name": "x-debug", "Present": True, "Invert": True}]),
                      perm("allow", Header=[{"Name": "x-env", "Exact": "prod", "Invert": True}])))], [], "deny", [
         ("web", "api", http("GET", "/"), False, "Permissions[0]"),
         ("web", "api", http("GET", "/", x_debug="1", x_env="dev"), True, "Permissions[1]"),
         ("web", "api", http("GET", "/", x_debug="1", x_env="prod"), False, "no permission"),
         ("web", "api", http("GET", "/", x_debug="1"), False, "no permission"),
     ]),
    ("L7: all conditions of one permission must hold",
     [entry("api", l7("web", perm("allow", PathPrefix="/v1", Methods=["POST"],
                                  Header=[{"Name": "x-team", "Exact": "a"}])))], [], "deny", [
         ("web", "api", http("POST", "/v1/x", x_team="a"), True, None),
         ("web", "api", http("POST", "/v1/x", x_team="b"), False, None),
         ("web", "api", http("GET", "/v1/x", x_team="a"), False, None),
     ]),
    ("gRPC is an HTTP POST of /pkg.Svc/Method; metadata are headers",
     [entry("api", l7("web", perm("deny", PathExact="/shop.Orders/Delete"),
                      perm("allow", PathPrefix="/shop.Orders/", Header=[{"Name": "x-tenant", "Present": True}]),
                      perm("allow", PathPrefix="/grpc.health.v1.Health/", Methods=["GET"])))], [], "deny", [
         ("web", "api", GrpcRequest("/shop.Orders/Delete", {"x-tenant": "t"}), False, "Permissions[0]"),
         ("web", "api", GrpcRequest("/shop.Orders/Get", {"x-tenant": "t"}), True, "Permissions[1]"),
         ("web", "api", GrpcRequest("/shop.Orders/Get"), False, "no permission"),
         ("web", "api", GrpcRequest("/grpc.health.v1.Health/Check"), False, "no permission"),
     ]),
    ("gRPC requests carry content-type application/grpc, as on the wire",
     [entry("api", l7("web", perm("allow", Header=[{"Name": "Content-Type", "Prefix": "application/grpc"}])))],
     [], "deny", [
         ("web", "api", GrpcRequest("/a.B/C"), True, "Permissions[0]"),
         ("web", "api", GrpcRequest("/a.B/C", {"content-type": "application/grpc+proto"}), True, None),
         ("web", "api", http("POST", "/a.B/C"), False, "no permission"),
     ]),
    ("a TCP connection decided by an L7 rule is denied (per request instead)",
     [entry("api", l7("web", perm("allow", PathPrefix="/")), l4("*", "allow"))], [], "deny", [
         ("web", "api", TCP, False, "has L7 permissions"),
         ("other", "api", TCP, True, "* -> api"),
     ]),
    ("SPIFFE IDs: service of the default namespace; other namespaces match no intention",
     [entry("db", l4("web", "allow"), l4("*", "allow"))], [], "deny", [
         ("spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web", "db", TCP, True,
          "web -> db"),
         ("spiffe://c1.consul/ns/default/dc/dc2/svc/api", "db", TCP, True, "* -> db"),
         ("spiffe://c1.consul/ns/team-a/dc/dc1/svc/web", "db", TCP, False, "outside namespace"),
         ("spiffe://c1.consul/not-a-service", "db", TCP, False, "not a service SPIFFE ID"),
     ]),
    ("both sources, same pair, different actions: deny wins",
     [entry("db", l4("web", "allow"))], [entry("db", l4("web", "deny"))], "allow", [
         ("web", "db", TCP, False, "native service-intentions/db"),
     ]),
    ("both sources, L4 allow (native) and L7 (KV): allowed only where both allow",
     [entry("db", l7("web", perm("allow", PathPrefix="/v1")))], [entry("db", l4("web", "allow"))], "deny", [
         ("web", "db", http("GET", "/v1/x"), True, None),
         ("web", "db", http("GET", "/v2/x"), False, "no permission"),
     ]),
    ("both sources, different destinations: merged",
     [entry("db", l4("web", "allow"))], [entry("cache", l4("web", "allow")), entry("*", l4("*", "deny"))], "allow", [
         ("web", "db", TCP, True, "KV weft/intentions/db"),
         ("web", "cache", TCP, True, "native service-intentions/cache"),
         ("web", "queue", TCP, False, "native service-intentions/*"),
     ]),
]


@pytest.mark.parametrize(("name", "kv", "native", "default", "checks"), CASES, ids=[c[0] for c in CASES])
def test_consul_semantics(name: str, kv: list[dict[str, Any]], native: list[dict[str, Any]], default: str,
                          checks: list[tuple[str, str, Request, bool, str | None]]) -> None:
    tables = build(kv, native, default)
    for src, dst, request, allowed, origin in checks:
        decision = authorize(table_for(tables, dst), src, request)
        assert decision.allowed is allowed, (src, dst, request, decision.reason)
        assert not decision.audited
        if origin is None and decision.rule is None:
            assert "default policy" in decision.reason
        if origin is not None:
            assert origin in decision.reason or origin in decision.rule_label, (origin, decision.reason)


def test_decision_names_rule_and_origin() -> None:
    tables = build([entry("db", l4("web", "deny"))], [entry("db", l4("api", "allow", LegacyID="abc-123"))])
    d = authorize(tables["db"], "web", TCP)
    assert d.rule is not None and d.rule.origin.ref == "weft/intentions/db" and d.rule.origin.kind == "kv"
    assert d.reason == "intention web -> db (KV weft/intentions/db Sources[0]) denies"
    d = authorize(tables["db"], "api", TCP)
    assert d.rule is not None and d.rule.origin.kind == "native" and "native intention abc-123" in d.reason
    d = authorize(tables["db"], "x", TCP)
    assert d.rule is None and d.rule_label == "default-policy" and "default policy deny" in d.reason


# ----------------------------------------------------------------------------------------------
# Audit mode
# ----------------------------------------------------------------------------------------------


def test_audit_mode_per_source_allows_and_flags_would_be_denials() -> None:
    tables = build([entry("db", l4("web", "deny", Mode="audit"), l4("api", "deny"), l4("ok", "allow", Mode="audit"))])
    d = authorize(tables["db"], "web", TCP)
    assert d.allowed and d.audited and "would deny" in d.reason and d.rule is not None
    d = authorize(tables["db"], "api", TCP)
    assert not d.allowed and not d.audited
    d = authorize(tables["db"], "ok", TCP)
    assert d.allowed and not d.audited
    d = authorize(tables["db"], "nobody", TCP)  # default policy: the destination is enforcing
    assert not d.allowed and not d.audited


def test_audit_mode_per_destination_covers_the_default_policy_and_l7() -> None:
    tables = build([entry("api", l7("web", perm("deny", PathPrefix="/admin"), perm("allow", PathPrefix="/v1")),
                          l4("cron", "deny", Mode="enforce"), Mode="audit")])
    t = tables["api"]
    assert t.default_mode == "audit"
    d = authorize(t, "web", http("GET", "/admin"))
    assert d.allowed and d.audited and d.permission == 0
    d = authorize(t, "web", http("GET", "/v1"))
    assert d.allowed and not d.audited
    d = authorize(t, "web", http("GET", "/other"))  # no permission matched: default deny, audited
    assert d.allowed and d.audited and "no permission" in d.reason
    d = authorize(t, "stranger", TCP)  # no intention: default deny, audited
    assert d.allowed and d.audited and d.rule is None
    d = authorize(t, "cron", TCP)  # the source's own Mode overrides the destination's
    assert not d.allowed and not d.audited


def test_audit_enforced_definition_wins_over_audited_one_for_same_pair() -> None:
    tables = build([entry("db", l4("web", "deny", Mode="audit"))], [entry("db", l4("web", "deny"))])
    d = authorize(tables["db"], "web", TCP)
    assert not d.allowed and not d.audited
    tables = build([entry("db", l4("web", "deny", Mode="audit"))], [entry("db", l4("web", "allow"))])
    d = authorize(tables["db"], "web", TCP)
    assert d.allowed and d.audited


def test_native_entry_mode_through_meta() -> None:
    tables = build([], [entry("db", l4("web", "deny"), Meta={"weft-mode": "audit"})])
    d = authorize(tables["db"], "web", TCP)
    assert d.allowed and d.audited


def test_per_request_flag_and_table_reuse_after_json_roundtrip() -> None:
    tables = build([entry("api", l7("web", perm("allow", PathPrefix="/")), l4("cron", "allow"))])
    t = loads_table(tables["api"].dumps())
    assert t == tables["api"]
    assert authorize(t, "web", TCP).per_request
    assert not authorize(t, "cron", TCP).per_request
    assert authorize(t, "web", http("PUT", "/x")).allowed


def test_unknown_request_type_is_an_error() -> None:
    tables = build([entry("api", l7("web", perm("allow", PathPrefix="/")))])
    with pytest.raises(TypeError):
        authorize(tables["api"], "web", "GET /")  # type: ignore[arg-type]
