"""Connect: intentions (list, exact, match, check, legacy create/read/update/delete by ID),
``/v1/agent/connect/authorize``, and the CA roots (``/v1/connect/ca/roots``,
``/v1/agent/connect/ca/roots``) served from the trust bundle the Weft CA publishes to KV
``weft/ca/roots``.

Intentions are ONE store with the ``service-intentions`` config entries (Consul 1.9+): every
intention write here rewrites the destination's entry, and ``/v1/config`` writes show up here.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from devagent import configentries as ce
from devagent import intentions as ixns
from devagent import kv
from devagent.agent import Agent
from devagent.api_agent_services import compile_filter
from devagent.api_catalog import answer
from devagent.api_config import check_graph, delete_entry, entries_of, put_entry
from devagent.codec import DecodeError, decode_struct, expect_str, new_uuid, unb64
from devagent.http import (
    Endpoint,
    HTTPError,
    QueryResult,
    Req,
    blocking_query,
    json_response,
)
from devagent.state import Row, Store, Tx

ROOTS_KEY = "weft/ca/roots"
TOPIC = ("config", ce.SERVICE_INTENTIONS)
NOT_FOUND = "Intention not found"


def routes(agent: Agent) -> list[Endpoint]:
    return [
        Endpoint("/v1/connect/intentions", {"GET": list_intentions, "POST": create_legacy}),
        Endpoint("/v1/connect/intentions/exact", {"GET": get_exact, "PUT": put_exact, "DELETE": delete_exact}),
        Endpoint("/v1/connect/intentions/match", {"GET": match}),
        Endpoint("/v1/connect/intentions/check", {"GET": check}),
        Endpoint("/v1/connect/intentions/{id}", {"GET": get_by_id, "PUT": update_legacy, "DELETE": delete_legacy}),
        Endpoint("/v1/connect/ca/roots", {"GET": ca_roots}),
        Endpoint("/v1/agent/connect/ca/roots", {"GET": ca_roots_agent}),
        Endpoint("/v1/agent/connect/authorize", {"POST": authorize}),
    ]


def all_intentions(store: Store) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for entry in entries_of(store, ce.SERVICE_INTENTIONS):
        out.extend(ixns.to_intentions(entry))
    return out


def _readable(r: Req, ixn: dict[str, Any]) -> bool:
    authz = r.authz
    return authz.intention_read(ixn["SourceName"]) or authz.intention_read(ixn["DestinationName"])


def _entry(store: Store, dest: str) -> Row | None:
    return store.get("config_entries", ce.key(ce.SERVICE_INTENTIONS, dest))


def _write(tx: Tx, dest: str, entry: dict[str, Any] | None, *, legacy: bool, datacenter: str) -> None:
    """Validate and store (or delete, when ``entry`` is None) the destination's entry."""
    if entry is None:
        delete_entry(tx, ce.SERVICE_INTENTIONS, dest)
        return
    norm = ixns.normalize_entry(entry, legacy_write=True)
    for src in norm["Sources"]:
        if not src.get("LegacyID"):
            src.pop("LegacyMeta", None)
    plain = {**norm, "Sources": [{k: v for k, v in src.items() if not k.startswith("Legacy")}
                                 for src in norm["Sources"]]}
    try:
        ixns.validate_entry(plain, legacy_write=False)
    except ixns.IntentionError as exc:
        raise HTTPError(400, str(exc)) from None
    try:  # Consul's state store checks an intention write like any config entry (L7 needs HTTP)
        check_graph(tx, ce.SERVICE_INTENTIONS, dest, norm, _entry(tx._store, dest), datacenter)
    except ce.ConfigEntryError as exc:
        raise HTTPError(500, str(exc)) from None
    put_entry(tx, norm)


def _query_names(r: Req) -> tuple[str, str]:
    source = r.param("source")
    if not source:
        raise HTTPError(400, "required query parameter 'source' not set")
    destination = r.param("destination")
    if not destination:
        raise HTTPError(400, "required query parameter 'destination' not set")
    try:
        return ixns.parse_component(source, "source"), ixns.parse_component(destination, "destination")
    except ixns.IntentionError as exc:
        raise HTTPError(400, str(exc)) from None


async def _body_intention(r: Req) -> dict[str, Any]:
    body = await r.json(required=True)
    try:
        return ixns.decode_intention(body)
    except (DecodeError, ixns.IntentionError) as exc:
        raise HTTPError(400, f"Request decode failed: {exc}") from None


# ----- list, match, check -----
async def list_intentions(r: Req) -> web.StreamResponse:
    pred = compile_filter(r)
    store = r.agent.store

    def run() -> QueryResult:
        rows = all_intentions(store)
        visible = [i for i in rows if _readable(r, i)]
        filtered = len(visible) != len(rows)
        out = sorted(visible, key=lambda i: (-int(i["Precedence"]), i["SourceName"], i["DestinationName"]))
        if pred is not None:
            out = [i for i in out if pred(i)]
        return QueryResult(store.topic_index(TOPIC), out, [TOPIC], filtered=filtered)

    res = await blocking_query(r, run, share=True)
    return answer(r, res)


async def match(r: Req) -> web.StreamResponse:
    by = r.param("by")
    if not by:
        raise HTTPError(400, "required query parameter 'by' not set")
    if by not in ("source", "destination"):
        raise HTTPError(400, f"'by' parameter must be one of 'source' or 'destination', got: {by!r}")
    names = [ixns.parse_component(n, "name") for n in r.query.getall("name", [])]
    if not names:
        raise HTTPError(400, "required query parameter 'name' not set")
    for name in names:
        r.authz.check("intention:read", name)
    store = r.agent.store

    def run() -> QueryResult:
        everything = all_intentions(store)
        out = {name: ixns.match(everything, by, name) for name in names}
        return QueryResult(store.topic_index(TOPIC), out, [TOPIC])

    res = await blocking_query(r, run, share=True)
    return answer(r, res)


def default_allow(r: Req) -> bool:
    """Consul's IntentionDefaultAllow: ACLs off or default policy allow (or a management token)."""
    cfg = r.agent.config
    if not cfg.acl_enabled:
        return True
    return r.authz.management or cfg.acl_default_policy == "allow"


async def check(r: Req) -> web.StreamResponse:
    source, destination = _query_names(r)
    stype = r.param("source-type", "consul")
    if stype != "consul":
        raise HTTPError(400, f"unsupported SourceType: {stype}")
    r.authz.check("service:read", destination)
    ixn = ixns.decide(all_intentions(r.agent.store), source, destination)
    return json_response(r, {"Allowed": ixns.allowed(ixn, default_allow(r))})


# ----- exact -----
def _find(store: Store, source: str, dest: str) -> dict[str, Any] | None:
    entry = _entry(store, dest)
    if entry is None:
        return None
    for src in entry.get("Sources") or []:
        if src["Name"] == source and not src.get("Peer"):
            return ixns.intention_of(entry, src)
    return None


async def get_exact(r: Req) -> web.StreamResponse:
    source, destination = _query_names(r)
    r.authz.check("intention:read", destination)
    store = r.agent.store

    def run() -> QueryResult:
        return QueryResult(store.topic_index(TOPIC), _find(store, source, destination), [TOPIC])

    res = await blocking_query(r, run, share=True)
    if res.value is None:
        raise HTTPError(404, NOT_FOUND)
    return answer(r, res)


async def put_exact(r: Req) -> web.StreamResponse:
    source, destination = _query_names(r)
    ixn = await _body_intention(r)
    ixn["SourceName"], ixn["DestinationName"] = source, destination
    r.authz.check("intention:write", destination)
    store = r.agent.store
    with store.write() as tx:
        old = _entry(store, destination)
        prev = next((s for s in (old or {}).get("Sources") or [] if s["Name"] == source), None)
        src = ixns.source_from_intention(ixn)
        if prev is not None and prev.get("LegacyID"):
            src = ixns.source_from_intention(ixn, legacy_id=prev["LegacyID"],
                                             created=prev.get("LegacyCreateTime", ""), updated=ixns.now_rfc3339())
        entry = ixns.upsert_source(old, destination, src, now=ixns.now_rfc3339())
        if ixn.get("Meta") and not (prev or {}).get("LegacyID"):
            entry["Meta"] = {**(entry.get("Meta") or {}), **ixn["Meta"]}
        _write(tx, destination, entry, legacy=False, datacenter=r.agent.datacenter)
    return json_response(r, True)


async def delete_exact(r: Req) -> web.StreamResponse:
    source, destination = _query_names(r)
    r.authz.check("intention:write", destination)
    store = r.agent.store
    with store.write() as tx:
        old = _entry(store, destination)
        if old is not None:
            _write(tx, destination, ixns.remove_source(old, source), legacy=False, datacenter=r.agent.datacenter)
    return json_response(r, True)


# ----- legacy by ID -----
def _by_id(store: Store, ixn_id: str) -> tuple[Row, dict[str, Any]] | None:
    for entry in entries_of(store, ce.SERVICE_INTENTIONS):
        for src in entry.get("Sources") or []:
            if src.get("LegacyID") == ixn_id:
                return entry, src
    return None


async def create_legacy(r: Req) -> web.StreamResponse:
    ixn = await _body_intention(r)
    if ixn["ID"]:
        raise HTTPError(400, "ID must be empty")
    if not ixn["SourceName"] or not ixn["DestinationName"]:
        raise HTTPError(400, "Intention SourceName and DestinationName are required")
    r.authz.check("intention:write", ixn["DestinationName"])
    store = r.agent.store
    new_id = new_uuid()
    now = ixns.now_rfc3339()
    with store.write() as tx:
        old = _entry(store, ixn["DestinationName"])
        if old is not None:
            for src in old.get("Sources") or []:
                if src["Name"] == ixn["SourceName"] and not src.get("Peer"):
                    dup = ixns.intention_of(old, src)
                    raise HTTPError(500, f"duplicate intention found: {ixns.intention_string(dup)}")
        src = ixns.source_from_intention(ixn, legacy_id=new_id, created=now, updated=now)
        entry = ixns.upsert_source(old, ixn["DestinationName"], src, now=now)
        _write(tx, ixn["DestinationName"], entry, legacy=True, datacenter=r.agent.datacenter)
    return json_response(r, {"ID": new_id})


async def get_by_id(r: Req) -> web.StreamResponse:
    ixn_id = r.match("id")
    store = r.agent.store

    def run() -> QueryResult:
        found = _by_id(store, ixn_id)
        value = ixns.intention_of(*found) if found else None
        return QueryResult(store.topic_index(TOPIC), value, [TOPIC])

    res = await blocking_query(r, run, share=True)
    if res.value is None:
        raise HTTPError(404, NOT_FOUND)
    if not _readable(r, res.value):
        r.authz.check("intention:read", res.value["DestinationName"])
    return answer(r, res)


async def update_legacy(r: Req) -> web.StreamResponse:
    ixn_id = r.match("id")
    ixn = await _body_intention(r)
    store = r.agent.store
    found = _by_id(store, ixn_id)
    if found is None:
        raise HTTPError(500, f"Cannot modify non-existent intention: '{ixn_id}'")
    old_entry, old_src = found
    if not ixn["SourceName"] or not ixn["DestinationName"]:
        raise HTTPError(400, "Intention SourceName and DestinationName are required")
    r.authz.check("intention:write", old_entry["Name"])
    r.authz.check("intention:write", ixn["DestinationName"])
    now = ixns.now_rfc3339()
    with store.write() as tx:
        src = ixns.source_from_intention(ixn, legacy_id=ixn_id, created=old_src.get("LegacyCreateTime", now),
                                         updated=now)
        if old_entry["Name"] != ixn["DestinationName"] or old_src["Name"] != ixn["SourceName"]:
            _write(tx, old_entry["Name"], ixns.remove_source(old_entry, old_src["Name"]), legacy=True,
                   datacenter=r.agent.datacenter)
        current = _entry(store, ixn["DestinationName"])
        _write(tx, ixn["DestinationName"], ixns.upsert_source(current, ixn["DestinationName"], src, now=now),
               legacy=True, datacenter=r.agent.datacenter)
    return web.Response(status=200)


async def delete_legacy(r: Req) -> web.StreamResponse:
    ixn_id = r.match("id")
    store = r.agent.store
    found = _by_id(store, ixn_id)
    if found is None:
        raise HTTPError(500, f"Cannot delete non-existent intention: '{ixn_id}'")
    entry, src = found
    r.authz.check("intention:write", entry["Name"])
    with store.write() as tx:
        _write(tx, entry["Name"], ixns.remove_source(entry, src["Name"]), legacy=True, datacenter=r.agent.datacenter)
    return json_response(r, True)


# ----- authorize -----
async def authorize(r: Req) -> web.StreamResponse:
    body = await r.json(required=True)
    try:
        d = decode_struct(body, {"Target": None, "ClientCertURI": None, "ClientCertSerial": None,
                                 "Namespace": None, "Partition": None})
        target = expect_str(d.get("Target"), "Target")
        uri = expect_str(d.get("ClientCertURI"), "ClientCertURI")
    except DecodeError as exc:
        raise HTTPError(400, f"Request decode failed: {exc}") from None
    if not target:
        raise HTTPError(400, "Target service must be specified")
    if not uri.startswith("spiffe://") or len(uri) <= len("spiffe://"):
        raise HTTPError(400, "ClientCertURI not a valid Connect identifier")
    parsed = ixns.spiffe_service(uri)
    if parsed is None:
        raise HTTPError(400, "ClientCertURI not a valid Service identifier")
    _, source = parsed
    r.authz.check("service:write", target)
    ixn = ixns.decide(all_intentions(r.agent.store), source, target)
    if ixn is not None:
        if ixn.get("Permissions"):
            authorized, reason = False, f"Matched L7 intention: {ixns.intention_string(ixn)}"
        else:
            authorized = ixn.get("Action") == ixns.ALLOW
            reason = f"Matched L4 intention: {ixns.intention_string(ixn)}"
    else:
        authorized, reason = default_allow(r), "Default behavior configured by ACLs"
    return json_response(r, {"Authorized": authorized, "Reason": reason})


# ----- CA roots -----
EMPTY_ROOTS: dict[str, Any] = {"ActiveRootID": "", "TrustDomain": "", "Roots": []}


def roots_from_kv(row: Row | None) -> dict[str, Any]:
    """The IndexedCARoots document stored at ``weft/ca/roots`` (the empty answer when absent or bad)."""
    if row is None or not row.get("Value"):
        return dict(EMPTY_ROOTS)
    try:
        doc = json.loads(unb64(row["Value"]))
    except (ValueError, DecodeError):
        return dict(EMPTY_ROOTS)
    if not isinstance(doc, dict) or not isinstance(doc.get("Roots", []), list):
        return dict(EMPTY_ROOTS)
    out = {"ActiveRootID": doc.get("ActiveRootID", ""), "TrustDomain": doc.get("TrustDomain", ""),
           "Roots": doc.get("Roots") or []}
    return out


async def _roots(r: Req) -> web.StreamResponse:
    store = r.agent.store
    topic = ("kvs", ROOTS_KEY)

    def run() -> QueryResult:
        row = store.get("kvs", ROOTS_KEY)
        idx = int(row["ModifyIndex"]) if row else kv.table_index(store)
        return QueryResult(idx, roots_from_kv(row), [topic])

    res = await blocking_query(r, run, share=True)
    return answer(r, res)


async def ca_roots(r: Req) -> web.StreamResponse:
    return await _roots(r)


async def ca_roots_agent(r: Req) -> web.StreamResponse:
    return await _roots(r)
