"""``/v1/operator/raft/*``, ``/v1/operator/autopilot/*`` and ``/v1/operator/usage``: the
single-server cluster the dev agent is, as Consul's operator endpoints describe it (``operator:read``
to read, ``operator:write`` to change). Removing the only raft peer or transferring leadership with no
other server fails with raft's own words; the autopilot configuration is stored (with ``?cas``)."""

from __future__ import annotations

from aiohttp import web

from devagent import operator
from devagent.agent import CONSUL_VERSION, Agent
from devagent.api_status import server_addr
from devagent.codec import DecodeError, parse_uint
from devagent.http import Endpoint, HTTPError, Req, json_response

AUTOPILOT_TABLE = "autopilot"
AUTOPILOT_KEY = "config"


def setup(agent: Agent) -> None:
    agent.store.define_table(AUTOPILOT_TABLE)


async def start(agent: Agent) -> None:
    # a Consul leader writes the default autopilot configuration when it first takes office
    if agent.store.get(AUTOPILOT_TABLE, AUTOPILOT_KEY) is None:
        with agent.store.write() as tx:
            tx.put(AUTOPILOT_TABLE, AUTOPILOT_KEY,
                   {**operator.AUTOPILOT_DEFAULTS, "CreateIndex": tx.index, "ModifyIndex": tx.index})


def routes(agent: Agent) -> list[Endpoint]:
    return [
        Endpoint("/v1/operator/raft/configuration", {"GET": raft_configuration}),
        Endpoint("/v1/operator/autopilot/health", {"GET": autopilot_health}),
        Endpoint("/v1/operator/autopilot/configuration", {"GET": autopilot_get, "PUT": autopilot_put}),
        Endpoint("/v1/operator/raft/peer", {"DELETE": raft_remove_peer}),
        Endpoint("/v1/operator/raft/transfer-leader", {"POST": raft_transfer_leader}),
        Endpoint("/v1/operator/usage", {"GET": usage}),
    ]


async def raft_configuration(r: Req) -> web.StreamResponse:
    r.check_dc()
    r.authz.check("operator:read")
    agent = r.agent
    index = agent.store.current_index()
    return json_response(r, {
        "Servers": [{
            "ID": agent.node_id,
            "Node": agent.node_name,
            "Address": server_addr(agent),
            "Leader": True,
            "ProtocolVersion": "3",
            "Voter": True,
            "LastIndex": index,
        }],
        # raft's GetConfiguration answers only the latest configuration, not the log index it was
        # committed at, so Consul's reply always carries Index 0
        "Index": 0,
    })


async def autopilot_health(r: Req) -> web.StreamResponse:
    r.check_dc()
    r.authz.check("operator:read")
    agent = r.agent
    index = agent.store.current_index()
    return json_response(r, {
        "Healthy": True,
        "FailureTolerance": 0,
        "Servers": [{
            "ID": agent.node_id,
            "Name": agent.node_name,
            "Address": server_addr(agent),
            "SerfStatus": "alive",
            "Version": CONSUL_VERSION,
            "Leader": True,
            "LastContact": "0s",
            "LastTerm": 2,
            "LastIndex": index,
            "Healthy": True,
            "Voter": True,
            "StableSince": agent.started_at,
        }],
    })


async def raft_remove_peer(r: Req) -> web.StreamResponse:
    r.check_dc()
    has_id, has_addr = r.has("id"), r.has("address")
    if not has_id and not has_addr:
        raise HTTPError(400, "Must specify either ?id with the server's ID or ?address with IP:port of peer to remove")
    if has_id and has_addr:
        raise HTTPError(400, "Must specify only one of ?id or ?address")
    r.authz.check("operator:write")
    agent = r.agent
    raise HTTPError(500, operator.remove_peer_error(
        server_id=agent.node_id, server_addr=server_addr(agent),
        by_id=r.param("id") if has_id else None, by_address=r.param("address") if has_addr else None))


async def raft_transfer_leader(r: Req) -> web.StreamResponse:
    r.authz.check("operator:write")
    raise HTTPError(500, operator.transfer_leader_error(server_id=r.agent.node_id, target=r.param("id")))


def _autopilot_row(agent: Agent) -> dict[str, object]:
    row = agent.store.get(AUTOPILOT_TABLE, AUTOPILOT_KEY)
    if row is None:  # start() writes it; a restored snapshot without one falls back to the defaults
        return {**operator.AUTOPILOT_DEFAULTS, "CreateIndex": 0, "ModifyIndex": 0}
    return dict(row)


async def autopilot_get(r: Req) -> web.StreamResponse:
    r.check_dc()
    r.authz.check("operator:read")
    return json_response(r, operator.autopilot_view(_autopilot_row(r.agent)))


async def autopilot_put(r: Req) -> web.StreamResponse:
    r.check_dc()
    body = await r.json(required=True, failed="Error parsing autopilot config")
    try:
        conf = operator.decode_autopilot(body)
    except DecodeError as exc:
        raise HTTPError(400, f"Error parsing autopilot config: {exc}") from None
    cas: int | None = None
    if r.has("cas"):
        try:
            cas = parse_uint(r.param("cas"), "cas")
        except DecodeError as exc:
            raise HTTPError(400, f"Error parsing cas value: {exc}") from None
    r.authz.check("operator:write")
    agent = r.agent
    with agent.store.write() as tx:
        old = _autopilot_row(agent)
        if cas is not None and cas != old["ModifyIndex"]:
            return json_response(r, False)
        tx.put(AUTOPILOT_TABLE, AUTOPILOT_KEY,
               {**conf, "CreateIndex": old["CreateIndex"] or tx.index, "ModifyIndex": tx.index})
    return json_response(r, True)


async def usage(r: Req) -> web.StreamResponse:
    r.check_dc()
    consistency = r.consistency()
    r.authz.check("operator:read")
    store = r.agent.store
    body = {
        "Usage": {r.agent.datacenter: operator.service_usage(store.rows("services").values(),
                                                               len(store.rows("nodes")))},
        # structs.Usage embeds QueryMeta, so the body carries it too
        "Index": store.topic_index("services"),
        "LastContact": 0,
        "KnownLeader": True,
        "ConsistencyLevel": consistency,
        "NotModified": False,
        "Backend": 0,
        "ResultsFilteredByACLs": False,
    }
    return json_response(r, body)
