"""``/v1/health/*``: service/:name, connect/:name, checks/:service, state/:state, node/:node
(Consul's agent/health_endpoint.go), with blocking queries whose index is that of the data read:
a query on ``health/service/web`` wakes only when an instance of ``web``, one of its checks, or a
node-level check of a node running it changes."""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from typing import Any

from aiohttp import web

from devagent import registry
from devagent import services as sv
from devagent.agent import Agent
from devagent.api_agent_services import compile_filter
from devagent.api_catalog import answer, node_matches, node_meta_filter, peer
from devagent.cachemeta import CacheProbe
from devagent.http import Endpoint, HTTPError, QueryResult, Req, blocking_query
from devagent.state import Row, Store

STATES = ("any", sv.PASSING, sv.WARNING, sv.CRITICAL)


def routes(agent: Agent) -> list[Endpoint]:
    return [
        Endpoint("/v1/health/service/{name:.*}", {"GET": service}),
        Endpoint("/v1/health/connect/{name:.*}", {"GET": connect}),
        Endpoint("/v1/health/ingress/{name:.*}", {"GET": ingress}),
        Endpoint("/v1/health/checks/{name:.*}", {"GET": checks}),
        Endpoint("/v1/health/state/{state:.*}", {"GET": state}),
        Endpoint("/v1/health/node/{node:.*}", {"GET": node}),
    ]


_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")


def passing_param(r: Req) -> bool:
    """Consul's getBoolQueryParam for ``?passing`` (bare means true; Go's ParseBool otherwise)."""
    if not r.has("passing"):
        return False
    raw = r.param("passing")
    if raw == "" or raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise HTTPError(400, "Invalid value for ?passing")


def entry_checks(store: Store, node: str, service_id: str) -> list[dict[str, Any]]:
    """The node's node-level checks and the service's checks, ordered by CheckID (as Consul)."""
    rows = store.by_index("checks", "nodelevel", node) + registry.service_checks(store, node, service_id)
    return [sv.check_out(c) for c in sorted(rows, key=lambda c: c["CheckID"])]


class _Entry:
    """One instance's CheckServiceNode as served, with its compact JSON (built on first use).

    Valid while the instance's rows are: the service row and node row are the same objects
    (rows are immutable; a write puts a new dict), and neither ``("svcchecks", node, id)`` (the
    service or one of its checks changed) nor ``("nodehealth", node)`` (the node or a node-level
    check changed) has moved since; the registry touches those topics on every such write."""

    __slots__ = ("_json", "entry", "node_index", "node_row", "passing", "row", "svc_index")

    def __init__(self, row: Row, node_row: Row, svc_index: int, node_index: int, entry: dict[str, Any]) -> None:
        self.row = row
        self.node_row = node_row
        self.svc_index = svc_index
        self.node_index = node_index
        self.entry = entry
        self.passing = all(c["Status"] == sv.PASSING for c in entry["Checks"])
        self._json: bytes | None = None

    @property
    def json(self) -> bytes:
        if self._json is None:
            self._json = json.dumps(self.entry, separators=(",", ":")).encode()
        return self._json


_ENTRIES: weakref.WeakKeyDictionary[Store, dict[str, _Entry]] = weakref.WeakKeyDictionary()


def _entry(store: Store, cache: dict[str, _Entry], row: Row, node_row: Row) -> _Entry:
    node, sid = row["Node"], row["ID"]
    key = registry.service_key(node, sid)
    svc_index = store.topic_index(("svcchecks", node, sid))
    node_index = store.topic_index(("nodehealth", node))
    in_tx = store.in_tx  # an open transaction's changes are not in the topic indexes yet: bypass the cache
    hit = None if in_tx else cache.get(key)
    if (hit is not None and hit.row is row and hit.node_row is node_row and hit.svc_index == svc_index
            and hit.node_index == node_index):
        return hit
    entry = _Entry(row, node_row, svc_index, node_index,
                   {"Node": sv.node_out(node_row), "Service": sv.node_service_cached(row),
                    "Checks": entry_checks(store, node, sid)})
    if not in_tx:  # uncommitted rows may roll back: never remember them
        cache[key] = entry
    return entry


def _entry_cache(store: Store) -> dict[str, _Entry]:
    cache = _ENTRIES.get(store)
    if cache is None:
        cache = _ENTRIES[store] = {}
    elif len(cache) > 2 * len(store.rows("services")) + 1024:  # entries of deregistered instances
        cache.clear()
    return cache


def health_entries(r: Req, rows: list[Row], topic: Any) -> tuple[QueryResult, bool]:
    """CheckServiceNodes for ``rows`` with ``passing``/``tag``/``node-meta``/``filter`` applied.
    Each entry and its JSON come from a per-instance cache (see ``_Entry``); the result carries
    the entries' JSON as ``parts`` so the body is a join."""
    pred = compile_filter(r)
    meta = node_meta_filter(r)
    tags = r.query.getall("tag", [])
    passing = passing_param(r)
    store = r.agent.store
    authz = r.authz
    nodes = store.rows("nodes")
    cache = _entry_cache(store)
    out = []
    parts = []
    topics: set[Any] = {topic}
    filtered = False
    for row in rows:
        if not authz.service_read(row["Service"]) or not authz.node_read(row["Node"]):
            filtered = True
            continue
        topics.add(("nodehealth", row["Node"]))  # also when the node is missing: its arrival changes the answer
        node_row = nodes.get(row["Node"])
        if node_row is None:
            continue
        if meta and not node_matches(node_row, meta):
            continue
        if tags and not sv.has_tags(row, tags):
            continue
        e = _entry(store, cache, row, node_row)
        if passing and not e.passing:
            continue
        if pred is None or pred(e.entry):
            out.append(e.entry)
            parts.append(e.json)
    return QueryResult(store.topic_index(*topics), out, topics, filtered=filtered, parts=parts), filtered


async def service(r: Req) -> web.StreamResponse:
    name = r.match("name")
    if not name:
        raise HTTPError(400, "Missing service name")
    compile_filter(r)
    passing_param(r)
    store = r.agent.store
    probe = CacheProbe(r)
    peered = bool(peer(r))

    def run() -> QueryResult:
        res, _ = health_entries(r, [] if peered else registry.instances(store, name), ("service", name))
        return res

    res = await blocking_query(r, run, share=True, reuse=True)  # every read is under the result's topics
    return answer(r, res, probe)


async def connect(r: Req) -> web.StreamResponse:
    name = r.match("name")
    if not name:
        raise HTTPError(400, "Missing service name")
    compile_filter(r)
    passing_param(r)
    store = r.agent.store

    probe = CacheProbe(r)
    peered = bool(peer(r))

    def run() -> QueryResult:
        rows = [] if peered else store.by_index("services", "connect", name)
        res, _ = health_entries(r, rows, ("connect", name))
        return res

    res = await blocking_query(r, run, share=True, reuse=True)
    return answer(r, res, probe)


async def ingress(r: Req) -> web.StreamResponse:
    """The ingress gateways exposing the service (named in, or matched by ``*`` in, an
    ingress-gateway config entry), as health entries of the gateways' instances, as Consul's
    ``/v1/health/ingress/:service``."""
    from devagent import configentries as ce
    from devagent import gateways
    from devagent.api_catalog import typical_service_names

    name = r.match("name")
    if not name:
        raise HTTPError(400, "Missing service name")
    compile_filter(r)
    passing_param(r)
    store = r.agent.store
    topic = ("config", ce.INGRESS_GATEWAY)
    probe = CacheProbe(r)

    def run() -> QueryResult:
        entries = store.by_index("config_entries", "kind", ce.INGRESS_GATEWAY)
        wildcard = any("*" == s.get("Name") for e in entries for lis in e.get("Listeners") or []
                       for s in lis.get("Services") or [])
        names = gateways.ingress_gateways_for(name, entries, typical_service_names(store) if wildcard else ())
        rows = [row for gw in names for row in registry.instances(store, gw) if row.get("Kind") == "ingress-gateway"]
        res, _ = health_entries(r, rows, topic)
        extra: list[Any] = [("service", gw) for gw in names] + (["services"] if wildcard else [])
        res.topics = {*res.topics, *extra}
        res.index = store.topic_index(*res.topics)
        return res

    res = await blocking_query(r, run, share=True)
    return answer(r, res, probe)


def _checks_answer(r: Req, rows: list[Row], idx: int, topics: list[Any]) -> tuple[QueryResult, bool]:
    pred = compile_filter(r)
    meta = node_meta_filter(r)
    authz = r.authz
    store = r.agent.store
    out = []
    filtered = False
    for c in sorted(rows, key=lambda c: (c["Node"], c["CheckID"])):
        if c.get("ServiceName"):
            ok = authz.service_read(c["ServiceName"]) and authz.node_read(c["Node"])
        else:
            ok = authz.node_read(c["Node"])
        if not ok:
            filtered = True
            continue
        if meta and not node_matches(store.get("nodes", c["Node"]), meta):
            continue
        chk = sv.check_out(c)
        if pred is None or pred(chk):
            out.append(chk)
    return QueryResult(idx, out, topics, filtered=filtered), filtered


async def _checks_read(r: Req, rows: Callable[[], list[Row]], topic: Any) -> web.StreamResponse:
    """A blocking read of health checks: `rows` picks them, `topic` is what the answer depends on.
    A bad `filter` answers 400 before the query blocks."""
    compile_filter(r)
    store = r.agent.store
    peered = bool(peer(r))

    def run() -> QueryResult:
        res, _ = _checks_answer(r, [] if peered else rows(), store.topic_index(topic), [topic])
        return res

    res = await blocking_query(r, run, share=True)
    return answer(r, res)


async def checks(r: Req) -> web.StreamResponse:
    name = r.match("name")
    if not name:
        raise HTTPError(400, "Missing service name")
    store = r.agent.store
    return await _checks_read(r, lambda: [c for row in registry.instances(store, name)
                                          for c in registry.service_checks(store, row["Node"], row["ID"])],
                              ("service", name))


async def state(r: Req) -> web.StreamResponse:
    want = r.match("state")
    if not want:
        raise HTTPError(400, "Missing check state")
    if want not in STATES:
        raise HTTPError(400, f"Invalid check state: {want!r}".replace("'", '"'))
    store = r.agent.store
    return await _checks_read(
        r, lambda: [c for c in store.rows("checks").values() if want == "any" or c["Status"] == want], "checks")


async def node(r: Req) -> web.StreamResponse:
    name = r.match("node")
    if not name:
        raise HTTPError(400, "Missing node name")
    store = r.agent.store
    return await _checks_read(r, lambda: store.by_index("checks", "node", name), ("node", name))
