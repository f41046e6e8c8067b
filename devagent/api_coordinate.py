"""``/v1/coordinate/*``: network coordinates (Serf's Vivaldi), for the one-node dev cluster.

The agent's own node gets the origin coordinate at start-up, as a freshly joined Consul agent
reports; ``PUT /v1/coordinate/update`` stores a coordinate for any registered node and, as Consul's
state store does, silently drops one for a node the catalog does not hold. ``/datacenters`` names
servers without the ``.<dc>`` suffix of their WAN names, as Consul's ListDatacenters strips it.
"""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web

from devagent.agent import Agent
from devagent.codec import DecodeError, decode_struct, expect_str
from devagent.http import Endpoint, HTTPError, QueryResult, Req, blocking_query, json_response, query_response
from devagent.state import Row, Tx

TABLE = "coordinates"
DIMENSIONALITY = 8  # Serf's default Vivaldi dimensionality, which Consul's agents use
COORD_SCALARS = ("Error", "Adjustment", "Height")
SPEC: dict[str, Any] = {"Node": None, "Segment": None, "Partition": None,
                        "Coord": {"Vec": None, "Error": None, "Adjustment": None, "Height": None}}


def origin() -> dict[str, Any]:
    return {"Vec": [0.0] * 8, "Error": 1.5, "Adjustment": 0.0, "Height": 1e-05}


def setup(agent: Agent) -> None:
    agent.store.define_table(TABLE)

    def on_node_delete(tx: Tx, key: str, old: Row | None, new: Row | None) -> None:
        tx.delete(TABLE, key)  # Consul drops a node's coordinates with the node

    agent.store.on_delete("nodes", on_node_delete)


async def start(agent: Agent) -> None:
    if agent.store.get(TABLE, agent.node_name) is None:
        with agent.store.write() as tx:
            tx.put(TABLE, agent.node_name, {"Node": agent.node_name, "Segment": "", "Coord": origin(),
                                            "CreateIndex": tx.index, "ModifyIndex": tx.index})


def routes(agent: Agent) -> list[Endpoint]:
    return [
        Endpoint("/v1/coordinate/datacenters", {"GET": datacenters}),
        Endpoint("/v1/coordinate/nodes", {"GET": nodes}),
        Endpoint("/v1/coordinate/node/{node:.*}", {"GET": node}),
        Endpoint("/v1/coordinate/update", {"PUT": update}),
    ]


async def datacenters(r: Req) -> web.StreamResponse:
    agent = r.agent
    row = agent.store.get(TABLE, agent.node_name)
    coord = row["Coord"] if row else origin()
    return json_response(r, [{"Datacenter": agent.datacenter, "AreaID": "wan",
                              "Coordinates": [{"Node": agent.node_name, "Coord": coord}]}])


def _visible(r: Req, rows: list[Row]) -> QueryResult:
    authz = r.authz
    shown = [row for row in rows if authz.node_read(str(row["Node"]))]
    return QueryResult(r.agent.store.topic_index(TABLE), shown, [TABLE], filtered=len(shown) != len(rows))


async def nodes(r: Req) -> web.StreamResponse:
    store = r.agent.store
    segment = r.param("segment")

    def run() -> QueryResult:
        rows = [row for _, row in sorted(store.rows(TABLE).items()) if not segment or row["Segment"] == segment]
        return _visible(r, rows)

    return query_response(r, await blocking_query(r, run, share=True))


async def node(r: Req) -> web.StreamResponse:
    name = r.match("node")
    if not name:
        raise HTTPError(400, "Missing node name")
    store = r.agent.store

    def run() -> QueryResult:
        row = store.get(TABLE, name)
        res = _visible(r, [row] if row else [])
        if not res.value:
            res.value = None
        return res

    return query_response(r, await blocking_query(r, run, share=True), not_found_when_none=True)


async def update(r: Req) -> web.StreamResponse:
    r.check_dc()
    body = await r.json(required=True)
    try:
        req = decode_struct(body, SPEC, what="coordinate")
        name = expect_str(req.get("Node"), "Node")
        coord = req.get("Coord")
        if not isinstance(coord, dict) or not isinstance(coord.get("Vec"), list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in coord["Vec"]):
            raise DecodeError("Coord: expected {Vec: [numbers], Error, Adjustment, Height}")
        for field in COORD_SCALARS:
            value = coord.get(field, 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DecodeError(f"Coord.{field}: expected a number")
    except DecodeError as exc:
        raise HTTPError(400, f"Request decode failed: {exc}") from None
    if len(coord["Vec"]) != DIMENSIONALITY:
        raise HTTPError(500, "incompatible coordinate")  # Consul: not IsCompatibleWith the agent's own
    if not all(math.isfinite(float(v)) for v in [*coord["Vec"], *(coord.get(f, 0) for f in COORD_SCALARS)]):
        raise HTTPError(500, "invalid coordinate")
    r.authz.check("node:write", name)
    store = r.agent.store
    if store.get("nodes", name) is None:
        # Consul's state store silently drops updates for nodes it does not know (they fix
        # themselves on the node's next update), so the write still answers 200.
        return web.Response(status=200)
    with store.write() as tx:
        old = store.get(TABLE, name)
        tx.put(TABLE, name, {
            "Node": name,
            "Segment": expect_str(req.get("Segment"), "Segment"),
            "Coord": {"Vec": [float(v) for v in coord["Vec"]], "Error": float(coord.get("Error", 0)),
                      "Adjustment": float(coord.get("Adjustment", 0)), "Height": float(coord.get("Height", 0))},
            "CreateIndex": int(old["CreateIndex"]) if old else tx.index,
            "ModifyIndex": tx.index,
        })
    return web.Response(status=200)
