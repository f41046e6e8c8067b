"""``/v1/operator/raft/configuration`` and ``/v1/operator/autopilot/health``: the single-server
cluster the dev agent is, as Consul's operator endpoints describe it (``operator:read``)."""

from __future__ import annotations

from aiohttp import web

from devagent.agent import CONSUL_VERSION, Agent
from devagent.api_status import server_addr
from devagent.http import Endpoint, Req, json_response


def routes(agent: Agent) -> list[Endpoint]:
    return [
        Endpoint("/v1/operator/raft/configuration", {"GET": raft_configuration}),
        Endpoint("/v1/operator/autopilot/health", {"GET": autopilot_health}),
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
        "Index": index,
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
