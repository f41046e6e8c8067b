"""Pure helpers of `weft intention` (the commands themselves run in tests/integration/policies)."""

from __future__ import annotations

import argparse
import json

import pytest

from policies.compile import Document
from policies.model import TCP, GrpcRequest, HttpRequest
from weft.cmd_intention import IntentionError, list_rows, parse_request, remove_source, upsert_source


def args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = {"grpc_method": "", "http_method": "", "path": "", "header": []}
    base.update(kw)
    return argparse.Namespace(**base)


def test_upsert_replaces_the_same_source_and_keeps_the_rest() -> None:
    doc = upsert_source(None, "db", {"Name": "web", "Action": "allow"})
    assert doc == {"Kind": "service-intentions", "Name": "db", "Sources": [{"Name": "web", "Action": "allow"}]}
    doc = upsert_source(doc, "db", {"Name": "api", "Action": "deny"})
    doc = upsert_source(doc, "db", {"Name": "web", "Action": "deny", "Description": "x"})
    assert doc["Sources"] == [{"Name": "api", "Action": "deny"}, {"Name": "web", "Action": "deny", "Description": "x"}]
    doc, removed = remove_source(doc, "api")
    assert removed and [s["Name"] for s in doc["Sources"]] == ["web"]
    doc, removed = remove_source(doc, "nobody")
    assert not removed


def test_parse_request() -> None:
    assert parse_request(args()) is TCP
    g = parse_request(args(grpc_method="/a.B/C", header=["X-Tenant=t1"]))
    assert isinstance(g, GrpcRequest) and g.metadata == {"x-tenant": "t1"}
    h = parse_request(args(http_method="post", path="/v1?q=1"))
    assert isinstance(h, HttpRequest) and h.method == "POST" and h.path == "/v1?q=1"
    assert isinstance(parse_request(args(path="/x")), HttpRequest)
    for bad, msg in ((args(grpc_method="a.B/C"), "/pkg.Service/Method"), (args(path="x"), "must start"),
                     (args(header=["k=v"]), "needs --grpc-method"),
                     (args(http_method="GET", header=["kv"]), "NAME=VALUE")):
        with pytest.raises(IntentionError, match=msg):
            parse_request(bad)


def test_list_rows_from_both_sources_with_problems() -> None:
    docs = [Document.kv("weft/intentions/db", json.dumps({"Kind": "service-intentions", "Name": "db", "Sources": [
                {"Name": "web", "Action": "allow"}, {"Name": "*", "Action": "deny"}]})),
            Document.kv("weft/intentions/bad", "{"),
            Document.native({"Kind": "service-intentions", "Name": "*",
                             "Sources": [{"Name": "mon", "Action": "allow"}]})]
    rows, problems = list_rows(docs, "db")
    assert [(r["Source"], r["Destination"], r["Precedence"]) for r in rows] == [
        ("web", "db", 9), ("*", "db", 8), ("mon", "*", 6)]
    assert rows[2]["Origin"] == "native service-intentions/* Sources[0]"
    assert any("weft/intentions/bad" in p for p in problems)
    rows, _ = list_rows(docs, None)
    assert len(rows) == 3
