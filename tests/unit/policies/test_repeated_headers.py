"""A header sent more than once is matched on every value, the same for gRPC and HTTP requests."""

from __future__ import annotations

import json
from typing import Any

import pytest

from policies.compile import Compiler, Document
from policies.evaluate import authorize
from policies.model import CompiledTable, GrpcRequest, HttpRequest, RepeatedHeader, header_map


def table(*headers: dict[str, Any]) -> CompiledTable:
    perms = [{"Action": "allow", "HTTP": {"PathPrefix": "/", "Header": [h]}} for h in headers]
    entry = {"Kind": "service-intentions", "Name": "api", "Sources": [{"Name": "web", "Permissions": perms}]}
    result = Compiler("deny").compile([Document.kv("weft/intentions/api", json.dumps(entry))])
    assert not result.errors, result.errors
    return result.tables["api"]


def allowed(tab: CompiledTable, pairs: list[tuple[str, str]]) -> tuple[bool, bool]:
    """(gRPC decision, HTTP decision) for the same header pairs."""
    grpc_ok = authorize(tab, "web", GrpcRequest("/pkg.S/M", header_map(pairs))).allowed
    http_ok = authorize(tab, "web", HttpRequest.of("GET", "/x", header_map(pairs))).allowed
    return grpc_ok, http_ok


def test_header_map_keeps_every_value_in_order() -> None:
    got = header_map([("X-Role", "a"), ("x-other", "1"), ("x-role", "b"), ("X-ROLE", "c")])
    assert got["x-other"] == "1"
    value = got["x-role"]
    assert isinstance(value, RepeatedHeader) and value.values == ("a", "b", "c") and value == "a,b,c"
    assert header_map([("a", "1")]) == {"a": "1"}


@pytest.mark.parametrize("match,pairs,expect", [
    ({"Name": "x-role", "Exact": "reader"}, [("x-role", "reader")], True),
    ({"Name": "x-role", "Exact": "reader"}, [("x-role", "reader"), ("x-role", "admin")], False),
    ({"Name": "x-role", "Exact": "reader"}, [("x-role", "admin"), ("x-role", "reader")], False),
    ({"Name": "x-role", "Exact": "reader"}, [("x-role", "reader"), ("x-role", "reader")], True),
    ({"Name": "x-role", "Prefix": "re"}, [("x-role", "reader"), ("x-role", "rewriter")], True),
    ({"Name": "x-role", "Regex": "[a-z]+"}, [("x-role", "ok"), ("x-role", "NOT")], False),
    # inverted: no value may match
    ({"Name": "x-role", "Exact": "admin", "Invert": True}, [("x-role", "reader"), ("x-role", "admin")], False),
    ({"Name": "x-role", "Exact": "admin", "Invert": True}, [("x-role", "reader"), ("x-role", "guest")], True),
    # present: any copy makes it present; present + invert: none may be there
    ({"Name": "x-role", "Present": True}, [("x-role", "a"), ("x-role", "b")], True),
    ({"Name": "x-role", "Present": True, "Invert": True}, [("x-role", "a"), ("x-role", "b")], False),
])
def test_every_value_must_satisfy_the_rule(match: dict[str, Any], pairs: list[tuple[str, str]], expect: bool) -> None:
    assert allowed(table(match), pairs) == (expect, expect)
