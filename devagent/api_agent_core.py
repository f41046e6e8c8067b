"""``/v1/agent/self``, ``/v1/agent/members``, ``/v1/agent/version``: the agent describing itself.

The dev agent is a single server that is its own leader; its one LAN member is itself.
"""

from __future__ import annotations

import asyncio
import platform
from typing import Any

from aiohttp import web

from devagent.agent import CONSUL_VERSION, REVISION, SERF_PROTOCOL, SERVER_PORT, Agent
from devagent.codec import format_duration, lookup
from devagent.http import Endpoint, HTTPError, Req, json_response

SERF_LAN_PORT = 8301
BUILD_DATE = "2025-01-01T00:00:00Z"


def routes(agent: Agent) -> list[Endpoint]:
    return [
        Endpoint("/v1/agent/self", {"GET": self_}),
        Endpoint("/v1/agent/members", {"GET": members}),
        Endpoint("/v1/agent/version", {"GET": version}),
        Endpoint("/v1/agent/reload", {"PUT": reload}),
        Endpoint("/v1/agent/leave", {"PUT": leave}),
        Endpoint("/v1/agent/token/{kind}", {"PUT": set_token}),
    ]


# Consul's token kinds, with the legacy names it still accepts
TOKEN_KINDS = {
    "default": "default", "acl_token": "default",
    "agent": "agent", "acl_agent_token": "agent",
    "agent_recovery": "agent_recovery", "agent_master": "agent_recovery", "acl_agent_master_token": "agent_recovery",
    "replication": "replication", "acl_replication_token": "replication",
    "config_file_service_registration": "config_file_service_registration",
    "dns": "dns",
}


async def set_token(r: Req) -> web.StreamResponse:
    """``PUT /v1/agent/token/<kind>`` ``{"Token": "..."}``: the ``default`` token is used for requests
    that carry none. Kept in memory, as Consul does unless ``enable_token_persistence``."""
    if not r.agent.config.acl_enabled:
        raise HTTPError(401, "ACL support disabled")
    r.authz.check("acl:write")
    kind = TOKEN_KINDS.get(r.match("kind"))
    if kind is None:
        raise HTTPError(404, f"Token \"{r.match('kind')}\" is unknown")
    body = await r.json(required=True)
    token = lookup(body, "Token", "") if isinstance(body, dict) else None
    if not isinstance(token, str):
        raise HTTPError(400, "Request decode failed: Token must be a string")
    r.agent.tokens[kind] = token
    return web.Response(status=200)


async def reload(r: Req) -> web.StreamResponse:
    """The dev agent has no configuration files to re-read: a reload succeeds and changes nothing."""
    r.authz.check("agent:write", r.agent.node_name)
    return web.Response(status=200)


async def leave(r: Req) -> web.StreamResponse:
    """Graceful leave: answer, then shut down (as ``consul leave`` does to an agent)."""
    r.authz.check("agent:write", r.agent.node_name)
    stop = r.agent.request_stop
    if stop is not None:
        asyncio.get_running_loop().call_later(0.2, stop)
    return web.Response(status=200)


def member(agent: Agent) -> dict[str, Any]:
    cfg = agent.config
    return {
        "Name": agent.node_name,
        "Addr": cfg.advertise_addr,
        "Port": SERF_LAN_PORT,
        "Tags": {
            "acls": "1" if cfg.acl_enabled else "0",
            "bootstrap": "1",
            "build": f"{CONSUL_VERSION}:{REVISION}",
            "dc": agent.datacenter,
            "ft_fs": "1",
            "ft_si": "1",
            "grpc_port": "8502",
            "id": agent.node_id,
            "port": str(SERVER_PORT),
            "raft_vsn": "3",
            "role": "consul",
            "segment": "",
            "vsn": "2",
            "vsn_max": "3",
            "vsn_min": "2",
            "wan_join_port": "8302",
        },
        "Status": 1,
        "ProtocolMin": SERF_PROTOCOL[0],
        "ProtocolMax": SERF_PROTOCOL[2],
        "ProtocolCur": SERF_PROTOCOL[1],
        "DelegateMin": 2,
        "DelegateMax": 5,
        "DelegateCur": 4,
    }


async def self_(r: Req) -> web.StreamResponse:
    agent = r.agent
    r.authz.check("agent:read", agent.node_name)
    cfg = agent.config
    node = agent.store.get("nodes", agent.node_name) or {}
    body = {
        "Config": {
            "Datacenter": agent.datacenter,
            "PrimaryDatacenter": agent.datacenter,
            "NodeName": agent.node_name,
            "NodeID": agent.node_id,
            "Partition": "",
            "Revision": REVISION,
            "Server": True,
            "Version": CONSUL_VERSION,
            "BuildDate": BUILD_DATE,
        },
        "DebugConfig": {
            "ACLsEnabled": cfg.acl_enabled,
            "ACLResolverSettings": {"ACLDefaultPolicy": cfg.acl_default_policy if cfg.acl_enabled else "allow"},
            "ClientAddrs": [cfg.client_addr],
            "DataDir": cfg.data_dir or "",
            "Datacenter": agent.datacenter,
            "DevMode": True,
            "HTTPPort": cfg.http_port,
            "LogLevel": cfg.log_level.upper(),
            "NodeName": agent.node_name,
            "ServerMode": True,
            "SessionTTLMin": format_duration(cfg.session_ttl_min_ns),
        },
        "Coord": {"Vec": [0, 0, 0, 0, 0, 0, 0, 0], "Error": 1.5, "Adjustment": 0, "Height": 1e-05},
        "Member": member(agent),
        "Stats": {
            "agent": {"check_monitors": "0", "check_ttls": "0", "checks": "0", "services": "0"},
            "build": {"prerelease": "", "revision": REVISION, "version": CONSUL_VERSION,
                      "version_metadata": ""},
            "consul": {"acl": "enabled" if cfg.acl_enabled else "disabled", "bootstrap": "true",
                       "known_datacenters": "1", "leader": "true",
                       "leader_addr": f"{cfg.advertise_addr}:{SERVER_PORT}", "server": "true"},
            "raft": {"applied_index": str(agent.store.current_index()), "state": "Leader",
                     "last_log_index": str(agent.store.current_index()), "num_peers": "0"},
            "runtime": {"arch": platform.machine(), "os": platform.system().lower(),
                        "version": f"python{platform.python_version()}"},
        },
        "Meta": dict(node.get("Meta") or {}),
        "xDS": {"SupportedProxies": {}, "Port": -1, "Ports": {"Plaintext": -1, "TLS": -1}},
    }
    return json_response(r, body)


async def members(r: Req) -> web.StreamResponse:
    segment = r.param("segment")
    if r.has("wan") and r.param("wan") not in ("", "0", "false"):
        m = member(r.agent)
        wan = {**m, "Name": f"{m['Name']}.{r.agent.datacenter}", "Port": 8302}
        return json_response(r, [wan] if r.authz.node_read(r.agent.node_name) else [])
    if segment not in ("", "_all"):  # the dev agent has only the default segment
        return json_response(r, [])
    m = member(r.agent)
    return json_response(r, [m] if r.authz.node_read(m["Name"]) else [])


async def version(r: Req) -> web.StreamResponse:
    return json_response(r, {
        "SCADA": None,
        "HumanVersion": CONSUL_VERSION,
        "BuildDate": BUILD_DATE,
        "Version": CONSUL_VERSION,
        "Revision": REVISION,
        "FIPS": "",
    })

