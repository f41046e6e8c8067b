"""``/v1/discovery-chain/:service``: the compiled discovery chain (Consul's agent/discovery_chain_endpoint.go).

GET compiles with the stored config entries; POST takes the overrides (``OverrideProtocol``,
``OverrideConnectTimeout``, ``OverrideMeshGateway.Mode``, snake_case too) as Consul does.
``?compile-dc`` sets the datacenter compiled in. Blocking queries wake on a write of any kind the
chain reads (and of the CA roots, whose trust domain is in the targets' SNI). ACL: service:read.
The compiler itself is ``chaincompile.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from devagent import chaincompile as cc
from devagent import configentries as ce
from devagent.agent import Agent
from devagent.api_ca_config import KEY_CLUSTER_ID, ca_state
from devagent.api_catalog import answer
from devagent.codec import DecodeError, duration_value, lookup
from devagent.http import Endpoint, HTTPError, QueryResult, Req, blocking_query
from devagent.state import Store

CHAIN_KINDS = (ce.SERVICE_DEFAULTS, ce.PROXY_DEFAULTS, *ce.DISCOVERY_CHAIN_KINDS)
ROOTS_KEY = "weft/ca/roots"


def routes(agent: Agent) -> list[Endpoint]:
    return [Endpoint("/v1/discovery-chain/{name:.*}", {"GET": read, "POST": read})]


def trust_domain(agent: Agent) -> str:
    """The CA's trust domain (``<cluster id>.consul``): the roots' TrustDomain, else from the cluster id
    the CA stored, else from the agent's node id (a dev agent without a CA yet)."""
    state = ca_state(agent.store)
    if state["TrustDomain"]:
        return state["TrustDomain"]
    return f"{state['ClusterID'] or agent.node_id}.consul"


def decode_overrides(raw: Any) -> cc.Overrides:
    """The POST body; a wrong type is Consul's 400 ``Request decoding failed: ...``."""
    if raw is None:
        return cc.Overrides()
    if not isinstance(raw, Mapping):
        raise DecodeError("expected a JSON object")
    proto = lookup(raw, "OverrideProtocol")
    if proto is not None and not isinstance(proto, (str, int, float, bool)):
        raise DecodeError(f"OverrideProtocol: invalid type {type(proto).__name__}")
    timeout = lookup(raw, "OverrideConnectTimeout")
    timeout_ns = duration_value(timeout, what="OverrideConnectTimeout") if timeout is not None else 0
    gw = lookup(raw, "OverrideMeshGateway")
    mode = ""
    if gw is not None:
        if not isinstance(gw, Mapping):
            raise DecodeError("OverrideMeshGateway: expected an object")
        mode_raw = lookup(gw, "Mode")
        mode = "" if mode_raw is None else str(mode_raw)
    protocol = "" if proto is None else str(proto).lower() if isinstance(proto, bool) else str(proto)
    return cc.Overrides(protocol=protocol, connect_timeout_ns=timeout_ns, mesh_gateway_mode=mode)


def chain_index(store: Store) -> int:
    return store.topic_index(*[("config", k) for k in CHAIN_KINDS], ("kvs", ROOTS_KEY), ("kvs", KEY_CLUSTER_ID))


async def read(r: Req) -> web.StreamResponse:
    r.check_dc()
    name = r.match("name")
    if not name:
        raise HTTPError(400, "Missing chain name")
    dc = r.param("compile-dc") or r.agent.datacenter
    overrides = cc.Overrides()
    if r.method == "POST":
        try:
            overrides = decode_overrides(await r.json(failed="Request decoding failed"))
        except DecodeError as exc:
            raise HTTPError(400, f"Request decoding failed: {exc}") from None
        if overrides.mesh_gateway_mode not in cc.MESH_GATEWAY_MODES:
            raise HTTPError(400, "Invalid OverrideMeshGateway.Mode parameter")
    r.authz.check("service:read", name)
    store = r.agent.store
    agent = r.agent
    topics = [("config", k) for k in CHAIN_KINDS] + [("kvs", ROOTS_KEY), ("kvs", KEY_CLUSTER_ID)]

    def run() -> QueryResult:
        def entry(kind: str, entry_name: str) -> dict[str, Any] | None:
            return store.get("config_entries", ce.key(kind, entry_name))

        try:
            compiled = cc.compile_chain(entry, name, datacenter=dc, trust_domain=trust_domain(agent),
                                        overrides=overrides)
        except ce.ConfigEntryError as exc:
            raise HTTPError(500, str(exc)) from None
        return QueryResult(chain_index(store), {"Chain": compiled.chain}, topics)

    # a POST's overrides are in its body, which the shared-result key does not see
    res = await blocking_query(r, run, share=r.method == "GET")
    return answer(r, res)
