"""``/v1/config``: PUT (``?cas``), GET kind/name, GET kind (list), DELETE kind/name (``?cas``), as
Consul's agent/config_endpoint.go. Entries live in the ``config_entries`` table under
``"<Kind>/<Name>"``; every write touches the topic ``("config", kind)`` that reads block on.
service-intentions entries are also the intentions store (see ``api_connect``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from devagent import configcheck as check
from devagent import configentries as ce
from devagent import discoverychain as chain
from devagent import intentions as ixns
from devagent.agent import Agent
from devagent.api_catalog import answer
from devagent.codec import DecodeError, parse_uint
from devagent.http import (
    Endpoint,
    HTTPError,
    QueryResult,
    Req,
    blocking_query,
    json_response,
)
from devagent.state import Row, Store, Tx


def setup(agent: Agent) -> None:
    agent.store.add_index("config_entries", "kind", lambda row: [row["Kind"]])


def routes(agent: Agent) -> list[Endpoint]:
    return [
        Endpoint("/v1/config", {"PUT": apply}),
        Endpoint("/v1/config/{kind}", {"GET": list_kind}),
        Endpoint("/v1/config/{kind}/{name:.+}", {"GET": get, "DELETE": delete}),
    ]


def entries_of(store: Store, kind: str) -> list[Row]:
    return sorted(store.by_index("config_entries", "kind", kind), key=lambda e: e["Name"])


def put_entry(tx: Tx, entry: dict[str, Any]) -> Row:
    """Store an entry with Create/ModifyIndex; keeps intention sources' creation times."""
    key = ce.key(entry["Kind"], entry["Name"])
    old = tx.get("config_entries", key)
    row = dict(entry)
    if entry["Kind"] == ce.SERVICE_INTENTIONS:
        now = ixns.now_rfc3339()
        before = {s["Name"]: s for s in (old or {}).get("Sources") or []}
        sources = []
        for src in row.get("Sources") or []:
            prev = before.get(src["Name"])
            created = (prev or {}).get("_CreatedAt") or src.get("_CreatedAt") or now
            changed = prev is None or _public_source(prev) != _public_source(src)
            updated = (src.get("_UpdatedAt") or now) if changed or prev is None else prev.get("_UpdatedAt", now)
            sources.append({**src, "_CreatedAt": created, "_UpdatedAt": updated})
        row["Sources"] = sources
    row["CreateIndex"] = old["CreateIndex"] if old else tx.index
    row["ModifyIndex"] = tx.index
    tx.put("config_entries", key, row)
    tx.touch(("config", entry["Kind"]))
    return row


def _public_source(src: Row) -> Row:
    return {k: v for k, v in src.items() if not k.startswith("_")}


def delete_entry(tx: Tx, kind: str, name: str) -> bool:
    if tx.delete("config_entries", ce.key(kind, name)) is None:
        return False
    tx.touch(("config", kind))
    return True


def _cas(r: Req) -> int | None:
    """``?cas=``; Consul hands strconv's error back as a 500."""
    text = r.param("cas")
    if not text:
        return None
    try:
        return parse_uint(text, "cas")
    except DecodeError:
        raise HTTPError(500, f'strconv.ParseUint: parsing "{text}": invalid syntax') from None


def check_graph(tx: Tx, kind: str, name: str, new: dict[str, Any] | None, old: Row | None, dc: str) -> None:
    """Consul's checks across entries for the state after this write (raises ConfigEntryError)."""
    if kind in ce.GATEWAY_KINDS and new is not None:
        for other in ce.GATEWAY_KINDS:
            if other != kind and tx.get("config_entries", ce.key(other, name)) is not None:
                raise ce.ConfigEntryError(f'cannot create a "{kind}" config entry with name "{name}", a "{other}" '
                                          "config entry with that name already exists")
    if kind not in chain.GRAPH_KINDS:
        return
    store = tx._store
    proposed = ce.key(kind, name)

    def lookup(k: str, n: str) -> Row | None:
        return new if ce.key(k, n) == proposed else store.get("config_entries", ce.key(k, n))

    rows = [row for k in chain.GRAPH_KINDS for row in entries_of(store, k) if ce.key(k, row["Name"]) != proposed]
    if new is not None:
        rows.append(new)
    chain.check(lookup, rows, written_kind=kind, affected=chain.affected_services(kind, [new, old]),
                datacenter=dc)


async def apply(r: Req) -> web.StreamResponse:
    r.check_dc()
    body = await r.json(required=True, failed="Request decoding failed")
    try:
        entry = check.normalize_and_validate(ce.decode(body))
    except DecodeError as exc:
        raise HTTPError(400, f"Request decoding failed: {exc}") from None
    except ce.ConfigEntryError as exc:
        raise HTTPError(500, str(exc)) from None
    kind, name = entry["Kind"], entry["Name"]
    ce.check_write(r.authz, kind, name, chain.related_services(entry))
    cas = _cas(r)
    with r.agent.store.write() as tx:
        old = tx.get("config_entries", ce.key(kind, name))
        if cas is not None and (old is None if cas != 0 else old is not None):
            return json_response(r, False)
        if cas and old is not None and old["ModifyIndex"] != cas:
            return json_response(r, False)
        try:
            check_graph(tx, kind, name, entry, old, r.agent.datacenter)
        except ce.ConfigEntryError as exc:
            raise HTTPError(500, str(exc)) from None
        put_entry(tx, entry)
    return json_response(r, True)


def _kind(r: Req) -> str:
    """The kind in the path; an unknown one is the error Consul's RPC returns (a 500)."""
    kind = r.match("kind")
    if kind not in ce.KINDS:
        raise HTTPError(500, f"invalid config entry kind: {kind}")
    return kind


async def get(r: Req) -> web.StreamResponse:
    kind = _kind(r)
    name = ce.FIXED_NAMES.get(kind) or r.match("name")
    ce.check_read(r.authz, kind, name)
    store = r.agent.store
    topic = ("config", kind)

    def run() -> QueryResult:
        row = store.get("config_entries", ce.key(kind, name))
        return QueryResult(store.topic_index(topic), ce.public_entry(row) if row else None, [topic])

    res = await blocking_query(r, run, share=True)
    if res.value is None:
        raise HTTPError(404, f'Config entry not found for "{kind}" / "{r.match("name")}"')
    return answer(r, res)


async def list_kind(r: Req) -> web.StreamResponse:
    kind = _kind(r)
    store = r.agent.store
    topic = ("config", kind)

    def run() -> QueryResult:
        authz = r.authz
        rows = entries_of(store, kind)
        visible = [e for e in rows if ce.can_read(authz, kind, e["Name"])]
        return QueryResult(store.topic_index(topic), [ce.public_entry(e) for e in visible], [topic],
                           filtered=len(visible) != len(rows))

    res = await blocking_query(r, run, share=True)
    return answer(r, res)


async def delete(r: Req) -> web.StreamResponse:
    r.check_dc()
    kind = r.match("kind")
    if kind not in ce.KINDS:  # Consul's MakeConfigEntry refuses it before any RPC: a 400
        raise HTTPError(400, f"invalid config entry kind: {kind}")
    name = ce.FIXED_NAMES.get(kind) or r.match("name")
    ce.check_write(r.authz, kind, name)
    cas = _cas(r)
    with r.agent.store.write() as tx:
        old = tx.get("config_entries", ce.key(kind, name))
        if cas is not None and (old is None or old["ModifyIndex"] != cas):
            return json_response(r, False)
        if old is not None:
            try:
                check_graph(tx, kind, name, None, old, r.agent.datacenter)
            except ce.ConfigEntryError as exc:
                raise HTTPError(500, str(exc)) from None
        delete_entry(tx, kind, name)
    return json_response(r, True if cas is not None else {})
