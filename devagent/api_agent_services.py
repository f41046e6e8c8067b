"""``/v1/agent/service*``, ``/v1/agent/check*``, ``/v1/agent/maintenance``, ``/v1/agent/health/service/*``:
the agent-local services and checks, as Consul's agent/agent_endpoint.go serves them.

Local services are the rows of the ``services`` table on this agent's node; registering through
the agent writes the catalog at once (a dev agent is its own server, so there is no anti-entropy
delay). Reads block on a content hash (``?hash=``, ``X-Consul-ContentHash``).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from consulkit.conventions import aggregate_status
from devagent import bexpr, checks, registry
from devagent import services as sv
from devagent.agent import Agent
from devagent.codec import DecodeError, decode_struct, expect_str
from devagent.http import Endpoint, HTTPError, Req, hash_blocking, json_response

OK_EMPTY = 200


def setup(agent: Agent) -> None:
    registry.install(agent.store)
    checks.manager(agent).install()


async def start(agent: Agent) -> None:
    await checks.manager(agent).start()


def routes(agent: Agent) -> list[Endpoint]:
    return [
        Endpoint("/v1/agent/services", {"GET": list_services}),
        Endpoint("/v1/agent/service/register", {"PUT": register_service}),
        Endpoint("/v1/agent/service/deregister/{id:.+}", {"PUT": deregister_service}),
        Endpoint("/v1/agent/service/maintenance/{id:.*}", {"PUT": service_maintenance}),
        Endpoint("/v1/agent/service/{id:.+}", {"GET": get_service}),
        Endpoint("/v1/agent/maintenance", {"PUT": node_maintenance}),
        Endpoint("/v1/agent/checks", {"GET": list_checks}),
        Endpoint("/v1/agent/check/register", {"PUT": register_check}),
        Endpoint("/v1/agent/check/deregister/{id:.+}", {"PUT": deregister_check}),
        Endpoint("/v1/agent/check/pass/{id:.+}", {"PUT": check_pass}),
        Endpoint("/v1/agent/check/warn/{id:.+}", {"PUT": check_warn}),
        Endpoint("/v1/agent/check/fail/{id:.+}", {"PUT": check_fail}),
        Endpoint("/v1/agent/check/update/{id:.+}", {"PUT": check_update}),
        Endpoint("/v1/agent/health/service/id/{id:.*}", {"GET": health_by_id}),
        Endpoint("/v1/agent/health/service/name/{name:.*}", {"GET": health_by_name}),
    ]


# ----- shared helpers (other endpoint modules use them too) -----
def compile_filter(r: Req) -> bexpr.Predicate | None:
    """The request's ``?filter=`` compiled; an expression that does not parse answers 400."""
    try:
        return bexpr.check(r.param("filter"))
    except bexpr.FilterError as exc:
        raise HTTPError(400, f"Failed to create boolean expression evaluator: {exc}") from None


def filtered_header(r: Req, filtered: bool) -> dict[str, str]:
    """``X-Consul-Results-Filtered-By-ACLs``, only for an authenticated caller (as Consul)."""
    if r.token and filtered:
        return {"X-Consul-Results-Filtered-By-ACLs": "true"}
    return {}


def ok() -> web.Response:
    return web.Response(status=OK_EMPTY)


def _local_services(r: Req) -> list[Any]:
    """The services this agent holds (not the ``consul`` service, which only the catalog has)."""
    return [row for row in r.agent.store.by_index("services", "node", r.agent.node_name)
            if registry.is_agent_local(row)]


def _local_checks(r: Req) -> list[Any]:
    """The checks this agent holds (not ``serfHealth``, which only the catalog has)."""
    return [row for row in r.agent.store.by_index("checks", "node", r.agent.node_name)
            if registry.is_agent_local(row)]


def _local_service(r: Req, sid: str) -> dict[str, Any] | None:
    row = r.agent.store.get("services", registry.service_key(r.agent.node_name, sid))
    return row if row is not None and registry.is_agent_local(row) else None


def _bad_request(exc: Exception) -> HTTPError:
    return HTTPError(400, f"Request decode failed: {exc}")


# ----- services -----
async def list_services(r: Req) -> web.StreamResponse:
    pred = compile_filter(r)
    authz = r.authz
    dc = r.agent.datacenter
    seen = {"total": 0, "visible": 0}

    def run() -> tuple[Any, list[Any]]:
        rows = _local_services(r)
        visible = [row for row in rows if authz.service_read(row["Service"])]
        seen["total"], seen["visible"] = len(rows), len(visible)
        out: dict[str, Any] = {}
        for row in visible:
            svc = sv.agent_service(row, dc)
            if pred is None or pred(svc):
                out[row["ID"]] = svc
        return out, ["services"]

    value, digest = await hash_blocking(r, run)
    headers = {"X-Consul-ContentHash": digest, **filtered_header(r, seen["visible"] != seen["total"])}
    return json_response(r, value, headers=headers)


async def get_service(r: Req) -> web.StreamResponse:
    sid = r.match("id")
    agent = r.agent
    key = registry.service_key(agent.node_name, sid)
    _ = r.authz  # an unknown token is refused before anything else

    def run() -> tuple[Any, list[Any]]:
        row = agent.store.get("services", key)
        if row is None or not registry.is_agent_local(row):
            return None, [("services", key)]
        return sv.agent_service(row, agent.datacenter), [("services", key)]

    value, digest = await hash_blocking(r, run)
    if value is None:
        raise HTTPError(404, f"unknown service ID: {sid}")
    r.authz.check("service:read", value["Service"])
    value = {**value, "ContentHash": digest}
    return json_response(r, value, headers={"X-Consul-ContentHash": digest})


def _replace_checks(r: Req) -> bool:
    if not r.has("replace-existing-checks"):
        return False
    return r.param("replace-existing-checks") in ("", "true")


def _vet_service_write(r: Req, svc: dict[str, Any]) -> None:
    authz = r.authz
    authz.check("service:write", svc["Service"])
    existing = r.agent.store.get("services", registry.service_key(r.agent.node_name, svc["ID"]))
    if existing is not None:
        authz.check("service:write", existing["Service"])
    if svc.get("Kind") == sv.CONNECT_PROXY:
        authz.check("service:write", (svc.get("Proxy") or {}).get("DestinationServiceName", ""))


async def register_service(r: Req) -> web.StreamResponse:
    body = await r.json(required=True)
    try:
        dec = sv.decode_service(body)
    except DecodeError as exc:
        raise _bad_request(exc) from None
    svc = dec["service"]
    if not svc["Service"]:
        raise HTTPError(400, "Missing service name")
    if sv.is_any_address(svc["Address"]):
        raise HTTPError(400, "Invalid service address")
    _ = r.authz
    svc = sv.normalize_service(svc)
    try:
        sv.validate_weights(dec["service"].get("Weights"))
        sv.validate_meta(svc["Meta"])
        sv.validate_service(svc)
    except sv.ServiceError as exc:
        raise HTTPError(400, str(exc)) from None
    cts = dec["checks"]
    for ct in cts:
        try:
            sv.validate_check_type(ct)
        except sv.ServiceError as exc:
            raise HTTPError(400, f"Invalid check: {exc}") from None
        if ct["Status"] and ct["Status"] not in sv.STATUSES:
            raise HTTPError(400, "Status for checks must 'passing', 'warning', 'critical'")
    _vet_service_write(r, svc)
    sidecar: dict[str, Any] | None = None
    sidecar_cts: list[dict[str, Any]] = []
    if dec["sidecar"] is not None:
        if (svc.get("Connect") or {}).get("Native"):
            raise HTTPError(400, "Validation failed: " + sv._multierror(
                ["A SidecarService cannot be specified for a Connect Native service"]))
        try:
            sidecar, sidecar_cts = sv.expand_sidecar(svc, dec["sidecar"],
                                                     registry.used_ports(r.agent.store, r.agent.node_name))
        except DecodeError as exc:
            raise _bad_request(exc) from None
        except sv.NoSidecarPort as exc:
            raise HTTPError(500, str(exc)) from None
        except sv.ServiceError as exc:
            text = str(exc)
            if text.startswith(("Invalid SidecarService", "Invalid Service Meta")):
                raise HTTPError(400, text) from None
            raise HTTPError(400, f"Invalid check in sidecar_service: {exc}") from None
        try:
            sv.validate_service(sidecar)
        except sv.ServiceError as exc:
            raise HTTPError(400, "Failed " + str(exc)) from None
        for ct in sidecar_cts:
            if ct["Status"] and ct["Status"] not in sv.STATUSES:
                raise HTTPError(400, "Status for checks must 'passing', 'warning', 'critical'")
        _vet_service_write(r, sidecar)
    if any(ct.get("ScriptArgs") for ct in [*cts, *sidecar_cts]):
        _vet_script(r)
    node = r.agent.node_name
    replace = _replace_checks(r)
    svc = sv.default_tagged_addresses(svc)
    if sidecar is not None:
        sidecar = sv.default_tagged_addresses(sidecar)
    with r.agent.store.write() as tx:
        registry.add_service_with_checks(tx, node, svc, cts, replace_existing_checks=replace)
        if sidecar is not None:
            registry.add_service_with_checks(tx, node, sidecar, sidecar_cts, sidecar=True,
                                             replace_existing_checks=replace)
    return ok()


def _vet_service_update(r: Req, sid: str) -> dict[str, Any]:
    row = _local_service(r, sid)
    if row is None:
        raise HTTPError(404, f'Unknown service ID "{sid}". Ensure that the service ID is passed, '
                             "not the service name.")
    r.authz.check("service:write", row["Service"])
    return row


async def deregister_service(r: Req) -> web.StreamResponse:
    sid = r.match("id")
    _vet_service_update(r, sid)
    node = r.agent.node_name
    store = r.agent.store
    with store.write() as tx:
        registry.remove_service(tx, node, sid)
        sidecar = store.get("services", registry.service_key(node, sid + sv.SIDECAR_SUFFIX))
        if sidecar is not None and sidecar.get("_Sidecar"):
            registry.remove_service(tx, node, sidecar["ID"])
    return ok()


def _enable_param(r: Req) -> bool:
    if not r.has("enable"):
        raise HTTPError(400, "Missing value for enable")
    raw = r.param("enable")
    if raw in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if raw in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise HTTPError(400, f'Invalid value for enable: "{raw}"')


async def service_maintenance(r: Req) -> web.StreamResponse:
    sid = r.match("id")
    if not sid:
        raise HTTPError(400, "Missing service ID")
    enable = _enable_param(r)
    row = _vet_service_update(r, sid)
    node = r.agent.node_name
    cid = sv.SERVICE_MAINT_PREFIX + sid
    with r.agent.store.write() as tx:
        if enable:
            if tx.get("checks", f"{node}/{cid}") is None:
                reason = r.param("reason") or sv.DEFAULT_SERVICE_MAINT_REASON
                chk = sv.health_check_row(node, cid, {"Name": "Service Maintenance Mode", "Notes": reason}, row,
                                          create_index=tx.index, modify_index=tx.index, status=sv.CRITICAL)
                chk["Type"] = "maintenance"
                chk.pop("_Type", None)
                tx.put("checks", f"{node}/{cid}", chk)
        else:
            tx.delete("checks", f"{node}/{cid}")
    return ok()


async def node_maintenance(r: Req) -> web.StreamResponse:
    enable = _enable_param(r)
    node = r.agent.node_name
    r.authz.check("node:write", node)
    key = f"{node}/{sv.NODE_MAINT_CHECK}"
    with r.agent.store.write() as tx:
        if enable:
            if tx.get("checks", key) is None:
                reason = r.param("reason") or sv.DEFAULT_NODE_MAINT_REASON
                chk = sv.health_check_row(node, sv.NODE_MAINT_CHECK, {"Name": "Node Maintenance Mode",
                                                                       "Notes": reason}, None,
                                          create_index=tx.index, modify_index=tx.index, status=sv.CRITICAL)
                chk["Type"] = "maintenance"
                chk.pop("_Type", None)
                tx.put("checks", key, chk)
        else:
            tx.delete("checks", key)
    return ok()


# ----- checks -----
def _check_visible(r: Req, row: dict[str, Any]) -> bool:
    if row.get("ServiceName"):
        return r.authz.service_read(row["ServiceName"])
    return r.authz.node_read(r.agent.node_name)


async def list_checks(r: Req) -> web.StreamResponse:
    pred = compile_filter(r)
    _ = r.authz
    seen = {"total": 0, "visible": 0}

    def run() -> tuple[Any, list[Any]]:
        rows = _local_checks(r)
        visible = [row for row in rows if _check_visible(r, row)]
        seen["total"], seen["visible"] = len(rows), len(visible)
        out: dict[str, Any] = {}
        for row in visible:
            chk = sv.check_out(row)
            if pred is None or pred(chk):
                out[row["CheckID"]] = chk
        return out, ["checks"]

    value, digest = await hash_blocking(r, run)
    headers = {"X-Consul-ContentHash": digest, **filtered_header(r, seen["visible"] != seen["total"])}
    return json_response(r, value, headers=headers)


async def register_check(r: Req) -> web.StreamResponse:
    body = await r.json(required=True)
    try:
        ct = sv.decode_check_type(body, "body")
    except DecodeError as exc:
        raise _bad_request(exc) from None
    if not ct["Name"]:
        raise HTTPError(400, "Missing check name")
    if ct["Status"] and ct["Status"] not in sv.STATUSES:
        raise HTTPError(400, "Bad check status")
    _ = r.authz
    try:
        sv.validate_check_type(ct)
    except sv.ServiceError as exc:
        raise HTTPError(400, f"Invalid check: {exc}") from None
    node = r.agent.node_name
    store = r.agent.store
    service = None
    if ct["ServiceID"]:
        service = _local_service(r, ct["ServiceID"])
        if service is None:
            raise HTTPError(404, f'ServiceID "{ct["ServiceID"]}" does not exist')
        r.authz.check("service:write", service["Service"])
    else:
        r.authz.check("node:write", node)
    cid = ct["CheckID"] or ct["Name"]
    existing = store.get("checks", f"{node}/{cid}")
    if existing is not None:
        if existing.get("ServiceName"):
            r.authz.check("service:write", existing["ServiceName"])
        else:
            r.authz.check("node:write", node)
    if ct.get("ScriptArgs"):
        _vet_script(r)
    with store.write() as tx:
        registry.put_check(tx, node, cid, {**ct, "CheckID": cid}, service)
    return ok()


def _vet_script(r: Req) -> None:
    """A script check through the HTTP API is a "remote" registration in Consul's terms: allowed only
    with ``enable_script_checks`` (``enable_local_script_checks`` covers configuration files only)."""
    if not r.agent.config.enable_script_checks:
        raise HTTPError(500, sv.SCRIPTS_DISABLED_REMOTE)


def _vet_check_update(r: Req, cid: str) -> dict[str, Any]:
    row = r.agent.store.get("checks", f"{r.agent.node_name}/{cid}")
    if row is None or not registry.is_agent_local(row):
        raise HTTPError(404, f'Unknown check ID "{cid}". Ensure that the check ID is passed, not the check name.')
    if row.get("ServiceName"):
        r.authz.check("service:write", row["ServiceName"])
    else:
        r.authz.check("node:write", r.agent.node_name)
    return row


async def deregister_check(r: Req) -> web.StreamResponse:
    cid = r.match("id")
    _vet_check_update(r, cid)
    with r.agent.store.write() as tx:
        tx.delete("checks", f"{r.agent.node_name}/{cid}")
    return ok()


def _ttl_update(r: Req, cid: str, status: str, output: str) -> web.StreamResponse:
    row = _vet_check_update(r, cid)
    if row.get("Type") != "ttl":
        raise HTTPError(500, f'CheckID "{cid}" does not have associated TTL')
    checks.manager(r.agent).ttl_update(f"{r.agent.node_name}/{cid}", status, output)
    return ok()


async def check_pass(r: Req) -> web.StreamResponse:
    return _ttl_update(r, r.match("id"), sv.PASSING, r.param("note"))


async def check_warn(r: Req) -> web.StreamResponse:
    return _ttl_update(r, r.match("id"), sv.WARNING, r.param("note"))


async def check_fail(r: Req) -> web.StreamResponse:
    return _ttl_update(r, r.match("id"), sv.CRITICAL, r.param("note"))


async def check_update(r: Req) -> web.StreamResponse:
    body = await r.json(required=True)
    try:
        upd = decode_struct(body, {"Status": None, "Output": None}, what="body")
        status = expect_str(upd.get("Status"), "Status")
        output = expect_str(upd.get("Output"), "Output")
    except DecodeError as exc:
        raise _bad_request(exc) from None
    if status not in sv.STATUSES:
        raise HTTPError(400, f"Invalid check status: '{status}'")
    return _ttl_update(r, r.match("id"), status, output)


# ----- agent health by service -----
_CODES = {sv.PASSING: 200, sv.WARNING: 429}


def _service_health(r: Req, row: dict[str, Any]) -> tuple[int, str, list[dict[str, Any]]]:
    rows = registry.service_checks(r.agent.store, r.agent.node_name, row["ID"])
    out = [{k: c.get(k, "") for k in ("Node", "CheckID", "Name", "Status", "Notes", "Output", "ServiceID",
                                       "ServiceName")} | {"ServiceTags": list(c.get("ServiceTags") or []),
                                                          "Type": c.get("Type", ""),
                                                          "Interval": c.get("Interval", ""),
                                                          "Timeout": c.get("Timeout", ""),
                                                          "ExposedPort": 0,
                                                          "Definition": c.get("Definition") or {},
                                                          "CreateIndex": c.get("CreateIndex", 0),
                                                          "ModifyIndex": c.get("ModifyIndex", 0)}
           for c in rows]
    status = aggregate_status(c["Status"] for c in rows)
    return _CODES.get(status, 503), status, out


def _text_wanted(r: Req) -> bool:
    if r.raw.headers.get("Accept", "").startswith("text/plain"):
        return True
    fmt = r.param("format")
    return fmt == "text" if fmt else False


async def health_by_id(r: Req) -> web.StreamResponse:
    sid = r.match("id")
    if not sid:
        raise HTTPError(400, "Missing serviceID")
    _ = r.authz
    row = _local_service(r, sid)
    if row is None:
        reason = f"ServiceId {sid} not found"
        if _text_wanted(r):
            return web.Response(status=404, text=reason, content_type="text/plain")
        return json_response(r, {"AggregatedStatus": sv.CRITICAL, "Service": None, "Checks": None}, status=404)
    r.authz.check("service:read", row["Service"])
    code, status, chks = _service_health(r, row)
    if _text_wanted(r):
        return web.Response(status=code, text=status, content_type="text/plain")
    return json_response(r, {"AggregatedStatus": status, "Service": sv.agent_service(row, r.agent.datacenter),
                             "Checks": chks}, status=code)


async def health_by_name(r: Req) -> web.StreamResponse:
    name = r.match("name")
    if not name:
        raise HTTPError(400, "Missing service Name")
    r.authz.check("service:read", name)
    code, status = 404, f"ServiceName {name} Not Found"
    result = []
    for row in _local_services(r):
        if row["Service"] != name:
            continue
        scode, sstatus, chks = _service_health(r, row)
        result.append({"AggregatedStatus": sstatus, "Service": sv.agent_service(row, r.agent.datacenter),
                       "Checks": chks})
        if code == 404 or code < scode:
            code, status = scode, sstatus
    if _text_wanted(r):
        return web.Response(status=code, text=status, content_type="text/plain")
    return json_response(r, result, status=code)
