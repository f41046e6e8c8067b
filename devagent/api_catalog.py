"""``/v1/catalog/*``: services, service/:name, connect/:name, nodes, node/:node, node-services/:node,
datacenters, register, deregister (Consul's agent/catalog_endpoint.go), with blocking queries,
``tag``/``node-meta``/``filter`` and ACL filtering."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from devagent import registry
from devagent import services as sv
from devagent.agent import Agent
from devagent.api_agent_services import compile_filter
from devagent.cachemeta import CacheProbe
from devagent.codec import DecodeError, decode_struct, expect_bool, expect_str, expect_str_map
from devagent.http import (
    Endpoint,
    HTTPError,
    QueryResult,
    Req,
    blocking_query,
    json_response,
    query_response,
)
from devagent.state import Row, Tx


def setup(agent: Agent) -> None:
    from devagent import api_txn, catalog_txn

    api_txn.register_op("Node", catalog_txn.node_op, catalog_txn.is_write)
    api_txn.register_op("Service", catalog_txn.service_op, catalog_txn.is_write)
    api_txn.register_op("Check", catalog_txn.check_op, catalog_txn.is_write)


def routes(agent: Agent) -> list[Endpoint]:
    return [
        Endpoint("/v1/catalog/register", {"PUT": register}),
        Endpoint("/v1/catalog/deregister", {"PUT": deregister}),
        Endpoint("/v1/catalog/datacenters", {"GET": datacenters}),
        Endpoint("/v1/catalog/nodes", {"GET": nodes}),
        Endpoint("/v1/catalog/services", {"GET": services}),
        Endpoint("/v1/catalog/service/{name:.*}", {"GET": service}),
        Endpoint("/v1/catalog/connect/{name:.*}", {"GET": connect}),
        Endpoint("/v1/catalog/node/{node:.*}", {"GET": node}),
        Endpoint("/v1/catalog/node-services/{node:.*}", {"GET": node_services}),
        Endpoint("/v1/catalog/gateway-services/{name:.*}", {"GET": gateway_services}),
    ]


def answer(r: Req, res: QueryResult, probe: CacheProbe | None = None) -> web.Response:
    """``query_response``: meta headers, the ACL-filtered header, one serialisation per shared result;
    with a ``probe`` (endpoints Consul serves from its agent cache), ``X-Cache``/``Age`` for ``?cached``."""
    resp = query_response(r, res)
    if probe is not None:
        resp.headers.update(probe.headers(res.index))
    return resp


def peer(r: Req) -> str:
    """``?peer=``: the dev agent has no cluster peerings, so a named peer has imported nothing and every
    read scoped to it is empty (Consul's state store answers the same for a peer it does not know)."""
    return r.param("peer")


def node_meta_filter(r: Req) -> dict[str, str]:
    """``?node-meta=key:value`` (repeatable)."""
    out: dict[str, str] = {}
    for raw in r.query.getall("node-meta", []):
        key, _, value = raw.partition(":")
        out[key] = value
    return out


def node_matches(node: Row | None, meta: dict[str, str]) -> bool:
    if not meta:
        return True
    have = (node or {}).get("Meta") or {}
    return all(have.get(k) == v for k, v in meta.items())


# ----- writes -----
REGISTER_SPEC: dict[str, Any] = {
    "ID": None, "Node": None, "Address": None, "Datacenter": None, "TaggedAddresses": None,
    "NodeMeta": None, "Service": None, "Check": None, "Checks": None, "SkipNodeUpdate": None,
    "Token": None, "Locality": None, "PeerName": None, "Partition": None, "Namespace": None,
}
HEALTH_CHECK_SPEC: dict[str, Any] = {
    "Node": None, "CheckID": None, "ID": None, "Name": None, "Status": None, "Notes": None, "Output": None,
    "ServiceID": None, "ServiceName": None, "ServiceTags": None, "Type": None, "Interval": None,
    "Timeout": None, "Definition": None, "Namespace": None, "Partition": None, "ExposedPort": None,
}


def _decode_hc(raw: Any, what: str) -> dict[str, Any]:
    d = decode_struct(raw, HEALTH_CHECK_SPEC, what=what)
    definition = d.get("Definition") or {}
    ct = sv.decode_check_type(definition, f"{what}.Definition")
    cid = d.get("CheckID") if d.get("CheckID") is not None else d.get("ID")
    return {**ct,
            "Node": expect_str(d.get("Node"), f"{what}.Node"),
            "CheckID": expect_str(cid, f"{what}.CheckID"),
            "Name": expect_str(d.get("Name"), f"{what}.Name"),
            "Status": expect_str(d.get("Status"), f"{what}.Status"),
            "Notes": expect_str(d.get("Notes"), f"{what}.Notes"),
            "Output": expect_str(d.get("Output"), f"{what}.Output"),
            "ServiceID": expect_str(d.get("ServiceID"), f"{what}.ServiceID")}


@dataclass
class _Registration:
    """A decoded /v1/catalog/register body."""

    node: str
    address: str
    datacenter: str
    node_id: str
    meta: dict[str, str]
    tagged: dict[str, str]
    skip_node_update: bool
    locality: Any
    service: dict[str, Any] | None
    checks: list[dict[str, Any]]


def _decode_register(body: Any) -> _Registration:
    """The request body as Consul's decoder reads it (raises DecodeError)."""
    d = decode_struct(body, REGISTER_SPEC)
    reg = _Registration(
        node=expect_str(d.get("Node"), "Node"), address=expect_str(d.get("Address"), "Address"),
        datacenter=expect_str(d.get("Datacenter"), "Datacenter"), node_id=expect_str(d.get("ID"), "ID"),
        meta=expect_str_map(d.get("NodeMeta"), "NodeMeta"),
        tagged=expect_str_map(d.get("TaggedAddresses"), "TaggedAddresses"),
        skip_node_update=expect_bool(d.get("SkipNodeUpdate"), "SkipNodeUpdate"),
        locality=sv.decode_locality(d.get("Locality")),
        service=sv.decode_service(d["Service"], what="Service")["service"] if d.get("Service") else None,
        checks=[])
    if d.get("Check"):
        reg.checks.append(_decode_hc(d["Check"], "Check"))
    if d.get("Checks") is not None:
        if not isinstance(d["Checks"], list):
            raise DecodeError("Checks: expected a list")
        reg.checks.extend(_decode_hc(c, f"Checks[{i}]") for i, c in enumerate(d["Checks"]))
    return reg


def _validate_register(r: Req, reg: _Registration, existing: Row | None) -> None:
    """Consul's Catalog.Register checks (its errors answer 500 with the message) and ACLs; normalizes
    the service in place."""
    if reg.datacenter and reg.datacenter != r.agent.datacenter:
        raise HTTPError(500, "No path to datacenter")
    if reg.service is not None and reg.service["Address"] and sv.is_any_address(reg.service["Address"]):
        raise HTTPError(400, "Invalid service address")
    if not reg.node:
        raise HTTPError(500, "Must provide node")
    if not reg.address and not reg.skip_node_update:
        raise HTTPError(500, "Must provide address if SkipNodeUpdate is not set")
    if not (reg.skip_node_update and existing is not None):
        r.authz.check("node:write", reg.node)
    if reg.service is not None:
        if not reg.service["Service"]:
            raise HTTPError(500, "Must provide service name with ID")
        reg.service = sv.normalize_service(reg.service)
        try:
            sv.validate_service(reg.service, for_agent=False)
        except sv.ServiceError as exc:
            raise HTTPError(400, str(exc)) from None
        r.authz.check("service:write", reg.service["Service"])
        if reg.service.get("Kind") == sv.CONNECT_PROXY:
            r.authz.check("service:write", reg.service["Proxy"].get("DestinationServiceName", ""))
    for hc in reg.checks:
        if hc["Status"] and hc["Status"] not in (*sv.STATUSES, sv.MAINT):
            raise HTTPError(400, f"Invalid check status: {hc['Status']!r}")
        if hc["Node"] and hc["Node"] != reg.node:
            raise HTTPError(500, f"Node '{hc['Node']}' for check '{hc['CheckID']}' doesn't match register "
                                 f"request node '{reg.node}'")


def _put_node(tx: Tx, r: Req, reg: _Registration, existing: Row | None) -> None:
    """The node's row, written only when it changes (its unset fields keep their stored values)."""
    want = {
        "ID": reg.node_id or (existing or {}).get("ID", ""),
        "Node": reg.node,
        "Address": reg.address,
        "Datacenter": r.agent.datacenter,
        "TaggedAddresses": reg.tagged or (existing or {}).get("TaggedAddresses") or {},
        "Meta": reg.meta or (existing or {}).get("Meta") or {},
    }
    if reg.locality is not None:
        want["Locality"] = reg.locality
    if existing is None or any(existing.get(k) != v for k, v in want.items()):
        tx.put("nodes", reg.node, {**want, "CreateIndex": existing["CreateIndex"] if existing else tx.index,
                                   "ModifyIndex": tx.index})


def _put_check(tx: Tx, r: Req, node: str, hc: dict[str, Any], registered: Row | None) -> None:
    """One check of the request, on its service (by ServiceID; ACL service:write) or on the node."""
    service = registered
    if hc["ServiceID"]:
        service = tx.get("services", registry.service_key(node, hc["ServiceID"]))
        if service is None:
            raise HTTPError(500, f"Unknown service ID '{hc['ServiceID']}' for check ID '{hc['CheckID']}'")
        r.authz.check("service:write", service["Service"])
    else:
        service = None
        r.authz.check("node:write", node)
    cid = hc["CheckID"] or hc["Name"]
    ct = {k: v for k, v in hc.items() if k not in ("Node", "Output", "ServiceID")}
    chk = sv.health_check_row(node, cid, ct, service, create_index=tx.index, modify_index=tx.index,
                              status=hc["Status"] or sv.CRITICAL, output=hc["Output"])
    old = tx.get("checks", f"{node}/{cid}")
    if old is not None:
        chk["CreateIndex"] = old["CreateIndex"]
    chk.pop("_Type", None)  # catalog checks are not run by this agent (as on a Consul server)
    tx.put("checks", f"{node}/{cid}", chk)


async def register(r: Req) -> web.StreamResponse:
    r.check_dc()
    body = await r.json(required=True)
    try:
        reg = _decode_register(body)
    except DecodeError as exc:
        raise HTTPError(400, f"Request decode failed: {exc}") from None
    store = r.agent.store
    existing = store.get("nodes", reg.node) if reg.node else None
    _validate_register(r, reg, existing)
    with store.write() as tx:
        if not (reg.skip_node_update and existing is not None):
            _put_node(tx, r, reg, existing)
        row = registry.put_service(tx, reg.node, reg.service) if reg.service is not None else None
        for hc in reg.checks:
            _put_check(tx, r, reg.node, hc, row)
    return json_response(r, True)


async def deregister(r: Req) -> web.StreamResponse:
    r.check_dc()
    body = await r.json(required=True)
    try:
        d = decode_struct(body, {"Node": None, "ServiceID": None, "CheckID": None, "Datacenter": None,
                                 "Token": None, "Namespace": None, "Partition": None})
        node_name = expect_str(d.get("Node"), "Node")
        sid = expect_str(d.get("ServiceID"), "ServiceID")
        cid = expect_str(d.get("CheckID"), "CheckID")
        dc = expect_str(d.get("Datacenter"), "Datacenter")
    except DecodeError as exc:
        raise HTTPError(400, f"Request decode failed: {exc}") from None
    if dc and dc != r.agent.datacenter:  # Consul routes by the body's Datacenter, as for register
        raise HTTPError(500, "No path to datacenter")
    if not node_name:
        raise HTTPError(500, "Must provide node")
    store = r.agent.store
    authz = r.authz
    with store.write() as tx:
        if sid:
            row = store.get("services", registry.service_key(node_name, sid))
            if row is not None:
                authz.check("service:write", row["Service"])
                registry.remove_service(tx, node_name, sid)
        if cid:
            chk = store.get("checks", f"{node_name}/{cid}")
            if chk is not None:
                if chk.get("ServiceName"):
                    authz.check("service:write", chk["ServiceName"])
                else:
                    authz.check("node:write", node_name)
                tx.delete("checks", f"{node_name}/{cid}")
        if not sid and not cid:
            authz.check("node:write", node_name)
            registry.remove_node(tx, node_name)
    return json_response(r, True)


# ----- reads -----
async def datacenters(r: Req) -> web.StreamResponse:
    return json_response(r, [r.agent.datacenter])


async def nodes(r: Req) -> web.StreamResponse:
    pred = compile_filter(r)
    meta = node_meta_filter(r)
    store = r.agent.store

    def run() -> QueryResult:
        authz = r.authz
        rows = [] if peer(r) else sorted(store.rows("nodes").values(), key=lambda n: n["Node"])
        visible = [n for n in rows if authz.node_read(n["Node"])]
        out = [sv.node_out(n) for n in visible if node_matches(n, meta)]
        if pred is not None:
            out = [n for n in out if pred(n)]
        return QueryResult(store.topic_index("nodes"), out, ["nodes"], filtered=len(visible) != len(rows))

    res = await blocking_query(r, run, share=True)
    return answer(r, res)


async def services(r: Req) -> web.StreamResponse:
    pred = compile_filter(r)
    meta = node_meta_filter(r)
    store = r.agent.store

    probe = CacheProbe(r)
    peered = bool(peer(r))

    def run() -> QueryResult:
        authz = r.authz
        tags: dict[str, list[str]] = {}
        filtered = False
        for row in [] if peered else store.rows("services").values():
            name = row["Service"]
            if not authz.service_read(name):
                filtered = True
                continue
            node_row = store.get("nodes", row["Node"])
            if not node_matches(node_row, meta):
                continue
            if pred is not None and not pred(sv.service_node(row, node_row or {})):
                continue
            have = tags.setdefault(name, [])
            for t in row.get("Tags") or []:
                if t not in have:
                    have.append(t)
        out = {name: sorted(t) for name, t in sorted(tags.items())}
        return QueryResult(store.topic_index("services"), out, ["services"], filtered=filtered)

    res = await blocking_query(r, run, share=True)
    return answer(r, res, probe)


def _service_nodes(r: Req, rows: list[Row], topic: Any) -> tuple[QueryResult, bool]:
    pred = compile_filter(r)
    meta = node_meta_filter(r)
    tags = r.query.getall("tag", [])
    store = r.agent.store
    authz = r.authz
    out = []
    filtered = False
    for row in rows:
        if not authz.service_read(row["Service"]) or not authz.node_read(row["Node"]):
            filtered = True
            continue
        node_row = store.get("nodes", row["Node"])
        if node_row is None or not node_matches(node_row, meta):
            continue
        if tags and not sv.has_tags(row, tags):
            continue
        entry = sv.service_node(row, node_row)
        if pred is None or pred(entry):
            out.append(entry)
    return QueryResult(store.topic_index(topic), out, [topic], filtered=filtered), filtered


async def _service_nodes_read(r: Req, rows: Callable[[], list[Row]], topic: Any, *,
                              cacheable: bool = False) -> web.StreamResponse:
    """A blocking read of catalog service entries; a bad `filter` answers 400 before the query blocks."""
    name = r.match("name")
    if not name:
        raise HTTPError(400, "Missing service name")
    compile_filter(r)
    probe = CacheProbe(r) if cacheable else None
    peered = bool(peer(r))

    def run() -> QueryResult:
        res, _ = _service_nodes(r, [] if peered else rows(), topic)
        return res

    res = await blocking_query(r, run, share=True)
    return answer(r, res, probe)


async def service(r: Req) -> web.StreamResponse:
    name = r.match("name")
    store = r.agent.store
    return await _service_nodes_read(r, lambda: registry.instances(store, name), ("service", name), cacheable=True)


async def connect(r: Req) -> web.StreamResponse:
    name = r.match("name")
    store = r.agent.store
    return await _service_nodes_read(r, lambda: store.by_index("services", "connect", name), ("connect", name))


async def node(r: Req) -> web.StreamResponse:
    name = r.match("node")
    if not name:
        raise HTTPError(400, "Missing node name")
    pred = compile_filter(r)
    store = r.agent.store

    def run() -> QueryResult:
        authz = r.authz
        node_row = None if peer(r) else store.get("nodes", name)
        idx = store.topic_index(("node", name))
        if node_row is None or not authz.node_read(name):
            return QueryResult(idx, None, [("node", name)], filtered=node_row is not None)
        filtered = False
        svcs: dict[str, Any] = {}
        for row in store.by_index("services", "node", name):
            if not authz.service_read(row["Service"]):
                filtered = True
                continue
            ns = sv.node_service(row)
            if pred is None or pred(ns):
                svcs[row["ID"]] = ns
        return QueryResult(idx, {"Node": sv.node_out(node_row), "Services": svcs}, [("node", name)],
                           filtered=filtered)

    res = await blocking_query(r, run, share=True)
    return answer(r, res)


async def node_services(r: Req) -> web.StreamResponse:
    name = r.match("node")
    if not name:
        raise HTTPError(400, "Missing node name")
    pred = compile_filter(r)
    store = r.agent.store

    def run() -> QueryResult:
        authz = r.authz
        node_row = None if peer(r) else store.get("nodes", name)
        idx = store.topic_index(("node", name))
        if node_row is None or not authz.node_read(name):  # Consul answers the empty NodeServiceList
            return QueryResult(idx, {"Node": None, "Services": None}, [("node", name)],
                               filtered=node_row is not None)
        filtered = False
        svcs = []
        for row in store.by_index("services", "node", name):
            if not authz.service_read(row["Service"]):
                filtered = True
                continue
            ns = sv.node_service(row)
            if pred is None or pred(ns):
                svcs.append(ns)
        return QueryResult(idx, {"Node": sv.node_out(node_row), "Services": svcs}, [("node", name)],
                           filtered=filtered)

    res = await blocking_query(r, run, share=True)
    return answer(r, res)


def typical_service_names(store: Any) -> list[str]:
    """Names of the catalog's typical services (not proxies or gateways), for gateway wildcards."""
    return [name for name in store.index_values("services", "name")
            if any(not row.get("Kind") for row in registry.instances(store, name))]


async def gateway_services(r: Req) -> web.StreamResponse:
    """Services linked to a gateway by its ingress-gateway or terminating-gateway config entry
    (Consul's GatewayServices rows, ``*`` expanded over the catalog; see ``gateways.py``)."""
    from devagent import configentries as ce
    from devagent import gateways

    name = r.match("name")
    if not name:
        raise HTTPError(400, "Missing gateway name")
    r.authz.check("service:read", name)
    store = r.agent.store
    config_topics = [("config", ce.INGRESS_GATEWAY), ("config", ce.TERMINATING_GATEWAY),
                     ("config", ce.SERVICE_DEFAULTS)]

    def destination(svc: str) -> bool:
        sd = store.get("config_entries", ce.key(ce.SERVICE_DEFAULTS, svc))
        return bool(sd and sd.get("Destination"))

    def run() -> QueryResult:
        entry = (store.get("config_entries", ce.key(ce.INGRESS_GATEWAY, name))
                 or store.get("config_entries", ce.key(ce.TERMINATING_GATEWAY, name)))
        wildcard = entry is not None and "*" in json_names(entry)
        topics: list[Any] = [*config_topics, "services"] if wildcard else list(config_topics)
        rows = gateways.gateway_services(name, entry, typical_service_names(store) if wildcard else (), destination)
        authz = r.authz
        visible = [g for g in rows if authz.service_read(g["Service"]["Name"])]
        return QueryResult(store.topic_index(*topics), visible, topics, filtered=len(visible) != len(rows))

    res = await blocking_query(r, run, share=True)
    return answer(r, res)


def json_names(entry: Row) -> set[str]:
    """The service names a gateway entry lists (listeners' services or linked services)."""
    names = {str(s.get("Name")) for s in entry.get("Services") or []}
    names.update(str(s.get("Name")) for lis in entry.get("Listeners") or [] for s in lis.get("Services") or [])
    return names
