"""Prepared queries (``/v1/query``): decoding, Consul's checks, templates, and result filtering (pure).

A query is kept in Consul's PreparedQuery JSON shape. Checks and their words follow Consul's
``parseQuery`` (agent/consul/prepared_query_endpoint.go) and its state store (name clashes, one
catch-all template). Templates are ``name_prefix_match``: the longest template name that prefixes
the requested name wins (an empty name catches every name); an optional ``Regexp`` is matched
against the whole requested name, and the template's strings are rendered with
``${name.full}``, ``${name.prefix}``, ``${name.suffix}``, ``${match(N)}`` and ``${agent.segment}``
(HIL interpolation as Consul's, for these variables only).

``select_nodes`` applies a query's Service block to health entries (CheckServiceNodes):
``OnlyPassing`` (else only critical instances are dropped), ``IgnoreCheckIDs``, ``Tags`` (``!tag``
excludes; case-insensitive, as Consul's), ``NodeMeta``, ``ServiceMeta``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from typing import Any

from devagent.codec import (
    DecodeError,
    decode_struct,
    duration_value,
    expect_bool,
    expect_int,
    expect_str,
    expect_str_list,
    expect_str_map,
    is_uuid,
)

TEMPLATE_TYPE = "name_prefix_match"
FAILOVER_SPEC: dict[str, Any] = {"NearestN": None, "Datacenters": None, "Targets": None}
SERVICE_SPEC: dict[str, Any] = {"Service": None, "Failover": FAILOVER_SPEC, "IgnoreCheckIDs": None,
                                "OnlyPassing": None, "Near": None, "Tags": None, "NodeMeta": None,
                                "ServiceMeta": None, "Peer": None, "SamenessGroup": None, "Connect": None,
                                "Namespace": None, "Partition": None}
QUERY_SPEC: dict[str, Any] = {"ID": None, "Name": None, "Session": None, "Token": None,
                              "Template": {"Type": None, "Regexp": None, "RemoveEmptyTags": None},
                              "Service": SERVICE_SPEC, "DNS": {"TTL": None}, "CreateIndex": None,
                              "ModifyIndex": None}
_VAR = re.compile(r"\$\{\s*(name\.full|name\.prefix|name\.suffix|agent\.segment|match\((\d+)\))\s*\}")
MAX_REGEXP = 1024


class QueryError(ValueError):
    """A query Consul refuses (its RPC error, a 500); the message is Consul's."""


def decode(raw: Any) -> dict[str, Any]:
    """A request body -> a query in Consul's JSON shape (without ID and indexes); DecodeError on types."""
    if not isinstance(raw, Mapping):
        raise DecodeError("expected a JSON object")
    d = decode_struct(raw, QUERY_SPEC, what="query")
    svc = d.get("Service") or {}
    if not isinstance(svc, Mapping):
        raise DecodeError("Service: expected an object")
    failover = svc.get("Failover") or {}
    targets = failover.get("Targets")
    if targets is not None and not isinstance(targets, list):
        raise DecodeError("Service.Failover.Targets: expected a list")
    connect = svc.get("Connect") or {}
    if not isinstance(connect, Mapping):
        raise DecodeError("Service.Connect: expected an object")
    template = d.get("Template") or {}
    dns = d.get("DNS") or {}
    return {
        "Name": expect_str(d.get("Name"), "Name"),
        "Session": expect_str(d.get("Session"), "Session"),
        "Token": expect_str(d.get("Token"), "Token"),
        "Template": {"Type": expect_str(template.get("Type"), "Template.Type"),
                     "Regexp": expect_str(template.get("Regexp"), "Template.Regexp"),
                     "RemoveEmptyTags": expect_bool(template.get("RemoveEmptyTags"), "Template.RemoveEmptyTags")},
        "Service": {
            "Service": expect_str(svc.get("Service"), "Service.Service"),
            "Failover": {"NearestN": expect_int(failover.get("NearestN"), "Service.Failover.NearestN"),
                         "Datacenters": expect_str_list(failover.get("Datacenters"), "Service.Failover.Datacenters"),
                         "Targets": list(targets or [])},
            "IgnoreCheckIDs": expect_str_list(svc.get("IgnoreCheckIDs"), "Service.IgnoreCheckIDs"),
            "OnlyPassing": expect_bool(svc.get("OnlyPassing"), "Service.OnlyPassing"),
            "Near": expect_str(svc.get("Near"), "Service.Near"),
            "Tags": expect_str_list(svc.get("Tags"), "Service.Tags"),
            "NodeMeta": expect_str_map(svc.get("NodeMeta"), "Service.NodeMeta"),
            "ServiceMeta": expect_str_map(svc.get("ServiceMeta"), "Service.ServiceMeta"),
            "Peer": expect_str(svc.get("Peer"), "Service.Peer"),
            "SamenessGroup": expect_str(svc.get("SamenessGroup"), "Service.SamenessGroup"),
            "Connect": {"Enabled": expect_bool(connect.get("Enabled"), "Service.Connect.Enabled")},
        },
        "DNS": {"TTL": expect_str(dns.get("TTL"), "DNS.TTL")},
    }


def validate(query: Mapping[str, Any]) -> None:
    """Consul's parseQuery: raises QueryError with its words."""
    template = query["Template"]
    if template["Type"]:
        if template["Type"] != TEMPLATE_TYPE:
            raise QueryError(f"Bad Template.Type '{template['Type']}'")
        if len(template["Regexp"]) > MAX_REGEXP:
            raise QueryError(f"Bad Regexp: longer than {MAX_REGEXP} characters")
        try:
            re.compile(template["Regexp"])
        except re.error as exc:
            raise QueryError(f"Bad Regexp: {exc}") from None
    svc = query["Service"]
    if not svc["Service"]:
        raise QueryError("Must provide a Service name to query")
    if svc["Failover"]["NearestN"] < 0:
        raise QueryError(f"Bad NearestN '{svc['Failover']['NearestN']}', must be >= 0")
    if svc["Peer"] and (svc["Failover"]["NearestN"] or svc["Failover"]["Datacenters"]):
        raise QueryError("Failover cannot be set for a query with a peer")
    ttl = query["DNS"]["TTL"]
    if ttl:
        try:
            ns = duration_value(ttl, what="TTL")
        except DecodeError as exc:
            raise QueryError(f"Bad DNS TTL '{ttl}': {exc}") from None
        if ns < 0:
            raise QueryError(f"DNS TTL '{ttl}', must be >=0")


def check_clash(query: Mapping[str, Any], others: Iterable[Mapping[str, Any]]) -> None:
    """The state store's rules: a name may not be another query's ID or name; one catch-all template."""
    name = query["Name"]
    for other in others:
        if other["ID"] == query["ID"]:
            continue
        if name and other["ID"] == name:
            raise QueryError(f"name '{name}' aliases an existing query ID")
        if name and other["Name"] == name:
            raise QueryError(f"name '{name}' aliases an existing query name")
        if (not name and query["Template"]["Type"] and not other["Name"] and other["Template"]["Type"]):
            raise QueryError("a query template with an empty name already exists")
    if name and is_uuid(name):
        raise QueryError(f"name '{name}' aliases an existing query ID")


def lookup(id_or_name: str, queries: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """By ID, else by exact name (a template's too), else the template with the longest name that
    prefixes it (Consul's PreparedQueryResolve)."""
    qs = list(queries)
    for q in qs:
        if q["ID"] == id_or_name:
            return q
    for q in qs:
        if q["Name"] and q["Name"] == id_or_name:
            return q
    best: Mapping[str, Any] | None = None
    for q in qs:
        if q["Template"]["Type"] == TEMPLATE_TYPE and id_or_name.startswith(q["Name"]):
            if best is None or len(q["Name"]) > len(best["Name"]):
                best = q
    return best


def render(query: Mapping[str, Any], name: str, segment: str = "") -> dict[str, Any]:
    """The query with its template interpolated for ``name`` (a non-template is returned unchanged)."""
    if not query["Template"]["Type"]:
        return dict(copy.deepcopy(query))
    matches: list[str] = []
    regexp = query["Template"]["Regexp"]
    if regexp:
        m = re.search(regexp, name)
        if m is not None:
            matches = [m.group(0), *[g or "" for g in m.groups()]]
    prefix = query["Name"]
    values = {"name.full": name, "name.prefix": prefix, "name.suffix": name[len(prefix):],
              "agent.segment": segment}

    def sub(text: str) -> str:
        def one(m: re.Match[str]) -> str:
            if m.group(2) is not None:
                i = int(m.group(2))
                return matches[i] if i < len(matches) else ""
            return str(values[m.group(1)])
        return _VAR.sub(one, text)

    out: dict[str, Any] = dict(_interpolate(copy.deepcopy(query), sub))
    out["Template"] = dict(query["Template"])  # the template itself is not rendered
    out["Name"] = query["Name"]
    if query["Template"]["RemoveEmptyTags"]:
        out["Service"]["Tags"] = [t for t in out["Service"]["Tags"] if t]
    return out


def _interpolate(value: Any, sub: Any) -> Any:
    if isinstance(value, str):
        return sub(value)
    if isinstance(value, dict):
        return {k: _interpolate(v, sub) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, sub) for v in value]
    return value


def select_nodes(query: Mapping[str, Any], entries: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Health entries the query's Service block keeps (Consul's filtering in PreparedQuery.Execute)."""
    svc = query["Service"]
    ignore = set(svc["IgnoreCheckIDs"])
    want = [t.lower() for t in svc["Tags"] if t and not t.startswith("!")]
    exclude = [t[1:].lower() for t in svc["Tags"] if t.startswith("!")]
    out = []
    for entry in entries:
        statuses = [c["Status"] for c in entry.get("Checks") or [] if c["CheckID"] not in ignore]
        if "critical" in statuses or (svc["OnlyPassing"] and any(s != "passing" for s in statuses)):
            continue
        tags = {t.lower() for t in entry["Service"].get("Tags") or []}
        if any(t not in tags for t in want) or any(t in tags for t in exclude):
            continue
        node_meta = entry["Node"].get("Meta") or {}
        if any(node_meta.get(k) != v for k, v in svc["NodeMeta"].items()):
            continue
        svc_meta = entry["Service"].get("Meta") or {}
        if any(svc_meta.get(k) != v for k, v in svc["ServiceMeta"].items()):
            continue
        out.append(entry)
    return out


REDACTED = "<hidden>"


def public(query: Mapping[str, Any], *, show_token: bool) -> dict[str, Any]:
    out: dict[str, Any] = dict(copy.deepcopy(query))
    if not show_token and out.get("Token"):
        out["Token"] = REDACTED
    return out
