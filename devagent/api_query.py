"""``/v1/query``: prepared queries, as Consul's agent/prepared_query_endpoint.go serves them.

Create (POST ``/v1/query`` -> ``{"ID"}``), list (GET ``/v1/query``), read, update, delete
(``/v1/query/:uuid``), execute (``/v1/query/:id-or-name/execute``, ``?limit``) and explain
(``/v1/query/:id-or-name/explain``). Queries live in the ``prepared_queries`` table (kept by
``-data-dir`` and snapshots); a query bound to a session goes when the session does, as in Consul.

Within one datacenter: ``Failover`` is stored and answered with ``Failovers: 0`` (there is no other
datacenter to try), ``Near`` and ``?near`` are accepted and do not sort (the dev agent keeps no
network coordinates); results are shuffled as Consul shuffles them, then cut to ``?limit``.
ACLs: ``query:write`` on a query's name to create or change it, ``query:read`` to see it
(unnamed queries are visible to management tokens only); a query's own ``Token`` is shown to
tokens with ``acl:write`` and ``<hidden>`` to others; execution filters instances with the query's
token when it has one, else the caller's.
"""

from __future__ import annotations

import random
from typing import Any

from aiohttp import web

from devagent import acl, registry
from devagent import preparedqueries as pq
from devagent import services as sv
from devagent.agent import Agent
from devagent.api_catalog import answer
from devagent.api_health import entry_checks
from devagent.codec import DecodeError, new_uuid
from devagent.http import Endpoint, HTTPError, QueryResult, Req, blocking_query, json_response, meta_headers
from devagent.state import Row, Store, Tx

TABLE = "prepared_queries"
NOT_FOUND = "Query not found"


def setup(agent: Agent) -> None:
    agent.store.define_table(TABLE)

    def on_session_delete(tx: Tx, key: str, old: Row | None, new: Row | None) -> None:
        for q in list(tx._store.rows(TABLE).values()):
            if q.get("Session") == key:
                tx.delete(TABLE, q["ID"])

    agent.store.on_delete("sessions", on_session_delete)


def routes(agent: Agent) -> list[Endpoint]:
    return [
        Endpoint("/v1/query", {"GET": list_queries, "POST": create}),
        Endpoint("/v1/query/{id}", {"GET": get, "PUT": update, "DELETE": delete}),
        Endpoint("/v1/query/{id}/execute", {"GET": execute}),
        Endpoint("/v1/query/{id}/explain", {"GET": explain}),
    ]


def _queries(store: Store) -> list[Row]:
    return sorted(store.rows(TABLE).values(), key=lambda q: q["ID"])


def _readable(authz: acl.Authorizer, q: Row) -> bool:
    if authz.management:
        return True
    return bool(q["Name"]) and authz.allowed("query", acl.READ, q["Name"])


def _public(authz: acl.Authorizer, q: Row) -> dict[str, Any]:
    return pq.public(q, show_token=authz.acl_write())


async def _body(r: Req) -> dict[str, Any]:
    raw = await r.json(required=True)
    try:
        return pq.decode(raw)
    except DecodeError as exc:
        raise HTTPError(400, f"Request decode failed: {exc}") from None


def _store(r: Req, query: dict[str, Any], old: Row | None) -> str:
    """Validate and write (create when ``old`` is None); returns the ID. Errors are Consul's RPC ones (500)."""
    authz = r.authz
    if old is not None and old["Name"]:
        authz.check("query:write", old["Name"])
    if query["Name"]:
        authz.check("query:write", query["Name"])
    try:
        pq.validate(query)
    except pq.QueryError as exc:
        raise HTTPError(500, str(exc)) from None
    store = r.agent.store
    with store.write() as tx:
        if query["Session"] and tx.get("sessions", query["Session"]) is None:
            raise HTTPError(500, f'invalid session "{query["Session"]}"')
        query["ID"] = old["ID"] if old is not None else _fresh_id(store)
        try:
            pq.check_clash(query, store.rows(TABLE).values())
        except pq.QueryError as exc:
            raise HTTPError(500, str(exc)) from None
        tx.put(TABLE, query["ID"], {**query, "CreateIndex": old["CreateIndex"] if old else tx.index,
                                    "ModifyIndex": tx.index})
    return str(query["ID"])


def _fresh_id(store: Store) -> str:
    while True:
        qid = new_uuid()
        if store.get(TABLE, qid) is None:
            return qid


async def create(r: Req) -> web.StreamResponse:
    r.check_dc()
    query = await _body(r)
    return json_response(r, {"ID": _store(r, query, None)})


async def update(r: Req) -> web.StreamResponse:
    r.check_dc()
    qid = r.match("id")
    query = await _body(r)
    old = r.agent.store.get(TABLE, qid)
    if old is None:
        raise HTTPError(500, f"Cannot modify non-existent prepared query: '{qid}'")
    _store(r, query, old)
    return web.Response(status=200)


async def delete(r: Req) -> web.StreamResponse:
    r.check_dc()
    qid = r.match("id")
    store = r.agent.store
    old = store.get(TABLE, qid)
    if old is None:
        raise HTTPError(500, f"Cannot delete non-existent prepared query: '{qid}'")
    if old["Name"]:
        r.authz.check("query:write", old["Name"])
    elif not r.authz.management:
        raise acl.PermissionDenied(r.authz.accessor_id, "query:write", None)
    with store.write() as tx:
        tx.delete(TABLE, qid)
    return web.Response(status=200)


async def list_queries(r: Req) -> web.StreamResponse:
    store = r.agent.store

    def run() -> QueryResult:
        authz = r.authz
        rows = _queries(store)
        visible = [_public(authz, q) for q in rows if _readable(authz, q)]
        return QueryResult(store.topic_index(TABLE), visible, [TABLE], filtered=len(visible) != len(rows))

    res = await blocking_query(r, run, share=True)
    return answer(r, res)


async def get(r: Req) -> web.StreamResponse:
    qid = r.match("id")
    store = r.agent.store

    def run() -> QueryResult:
        q = store.get(TABLE, qid)
        return QueryResult(store.topic_index(TABLE), q, [TABLE])

    res = await blocking_query(r, run)
    if res.value is None:
        raise HTTPError(404, NOT_FOUND)
    if not _readable(r.authz, res.value):
        raise acl.PermissionDenied(r.authz.accessor_id, "query:read", res.value["Name"] or None)
    res.value = [_public(r.authz, res.value)]
    return answer(r, res)


def _resolve(r: Req) -> tuple[Row, dict[str, Any]]:
    """(the stored query, the query rendered for the requested name) or a 404 "Query not found"."""
    r.check_dc()
    wanted = r.match("id")
    q = pq.lookup(wanted, r.agent.store.rows(TABLE).values())
    if q is None:
        raise HTTPError(404, NOT_FOUND)
    return dict(q), pq.render(q, wanted)


async def explain(r: Req) -> web.StreamResponse:
    stored, rendered = _resolve(r)
    if not _readable(r.authz, stored):
        raise acl.PermissionDenied(r.authz.accessor_id, "query:read", stored["Name"] or None)
    index = r.agent.store.topic_index(TABLE)
    return json_response(r, {"Query": _public(r.authz, rendered)}, headers=meta_headers(r, index))


def _limit(r: Req) -> int:
    text = r.param("limit")
    if not text:
        return 0
    try:
        return max(int(text), 0)
    except ValueError:
        raise HTTPError(500, f'strconv.Atoi: parsing "{text}": invalid syntax') from None


async def execute(r: Req) -> web.StreamResponse:
    _, query = _resolve(r)
    limit = _limit(r)
    store = r.agent.store
    authz = r.agent.authorizer(query["Token"]) if query["Token"] else r.authz
    name = query["Service"]["Service"]
    rows = (store.by_index("services", "connect", name) if query["Service"]["Connect"]["Enabled"]
            else registry.instances(store, name))
    nodes = store.rows("nodes")
    entries = []
    for row in rows:
        node_row = nodes.get(row["Node"])
        if node_row is None or not authz.service_read(row["Service"]) or not authz.node_read(row["Node"]):
            continue
        entries.append({"Node": sv.node_out(node_row), "Service": sv.node_service(row),
                        "Checks": entry_checks(store, row["Node"], row["ID"])})
    selected = pq.select_nodes(query, entries)
    random.shuffle(selected)
    if limit:
        selected = selected[:limit]
    body = {"Service": name, "Nodes": selected, "DNS": {"TTL": query["DNS"]["TTL"]},
            "Datacenter": r.agent.datacenter, "Failovers": 0}
    index = store.topic_index("services", "checks", "nodes", TABLE)
    return json_response(r, body, headers=meta_headers(r, index))
