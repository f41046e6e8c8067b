"""``/v1/status/leader`` and ``/v1/status/peers``: a single-server cluster whose leader is this agent."""

from __future__ import annotations

from aiohttp import web

from devagent.agent import Agent
from devagent.http import Endpoint, Req, json_response

SERVER_RPC_PORT = 8300  # what a Consul server advertises for RPC; the dev agent has no RPC port


def server_addr(agent: Agent) -> str:
    return f"{agent.config.advertise_addr}:{SERVER_RPC_PORT}"


def routes(agent: Agent) -> list[Endpoint]:
    return [
        Endpoint("/v1/status/leader", {"GET": leader}),
        Endpoint("/v1/status/peers", {"GET": peers}),
    ]


async def leader(r: Req) -> web.StreamResponse:
    r.check_dc()
    return json_response(r, server_addr(r.agent))


async def peers(r: Req) -> web.StreamResponse:
    r.check_dc()
    return json_response(r, [server_addr(r.agent)])
