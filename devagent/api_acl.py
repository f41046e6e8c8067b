"""``/v1/acl/*`` (when ``-acl-enabled``): bootstrap, tokens (with Policies, ServiceIdentities and
NodeIdentities), token/self, policies. With ACLs off every one answers 401 ``ACL support disabled``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from devagent import acl, aclstore
from devagent.agent import Agent
from devagent.codec import DecodeError, lookup
from devagent.http import (
    ACLDisabled,
    Endpoint,
    HTTPError,
    QueryResult,
    Req,
    blocking_query,
    json_response,
    meta_headers,
)

Handler = Callable[[Req], Awaitable[web.StreamResponse]]


async def start(agent: Agent) -> None:
    if agent.config.acl_enabled:
        aclstore.ensure_builtins(agent.store, agent.config.acl_initial_management)


def _enabled(fn: Handler) -> Handler:
    async def wrapped(r: Req) -> web.StreamResponse:
        if not r.agent.config.acl_enabled:
            raise ACLDisabled()
        r.check_dc()
        return await fn(r)

    wrapped.__name__ = fn.__name__
    return wrapped


def routes(agent: Agent) -> list[Endpoint]:
    return [
        Endpoint("/v1/acl/bootstrap", {"PUT": _enabled(bootstrap)}),
        Endpoint("/v1/acl/token", {"PUT": _enabled(token_create)}),
        Endpoint("/v1/acl/token/self", {"GET": _enabled(token_self)}),
        Endpoint("/v1/acl/token/{id}/clone", {"PUT": _enabled(token_clone)}),
        Endpoint("/v1/acl/token/{id:.*}", {"GET": _enabled(token_read), "PUT": _enabled(token_update),
                                           "DELETE": _enabled(token_delete)}),
        Endpoint("/v1/acl/tokens", {"GET": _enabled(token_list)}),
        Endpoint("/v1/acl/policy", {"PUT": _enabled(policy_create)}),
        Endpoint("/v1/acl/policy/name/{name:.*}", {"GET": _enabled(policy_read_by_name)}),
        Endpoint("/v1/acl/policy/{id:.*}", {"GET": _enabled(policy_read), "PUT": _enabled(policy_update),
                                            "DELETE": _enabled(policy_delete)}),
        Endpoint("/v1/acl/policies", {"GET": _enabled(policy_list)}),
    ]


async def bootstrap(r: Req) -> web.StreamResponse:
    body = await r.json(failed="Request decoding failed")
    if body is not None and not isinstance(body, dict):
        raise HTTPError(400, "Request decoding failed: expected an object")
    secret = lookup(body or {}, "BootstrapSecret") or ""
    if not isinstance(secret, str):
        raise HTTPError(400, "Request decoding failed: BootstrapSecret must be a string")
    with r.agent.store.write() as tx:
        try:
            row = aclstore.bootstrap(tx, secret)
        except aclstore.BootstrapNotAllowed as exc:
            raise HTTPError(403, str(exc)) from None
        except aclstore.ACLError as exc:
            raise HTTPError(500, str(exc)) from None
    view = aclstore.token_view(r.agent.store, row, show_secret=True)
    return json_response(r, {"ID": row["SecretID"], **view})


async def _token_body(r: Req) -> dict[str, Any]:
    body = await r.json(failed="Token decoding failed")
    try:
        return aclstore.decode_token(body)
    except DecodeError as exc:
        raise HTTPError(400, f"Token decoding failed: {exc}") from None


def _write_token(r: Req, req: dict[str, Any], *, create: bool, accessor: str) -> web.StreamResponse:
    r.authz.check("acl:write")
    store = r.agent.store
    with store.write() as tx:
        try:
            row = aclstore.token_set(store, tx, req, create=create, accessor_in_url=accessor, caller_secret=r.token,
                                     datacenter=r.agent.datacenter)
        except DecodeError as exc:
            raise HTTPError(400, str(exc)) from None
        except aclstore.ACLError as exc:
            raise HTTPError(500, str(exc)) from None
    return json_response(r, aclstore.token_view(store, row, show_secret=True))


async def token_create(r: Req) -> web.StreamResponse:
    return _write_token(r, await _token_body(r), create=True, accessor="")


async def token_update(r: Req) -> web.StreamResponse:
    accessor = r.match("id")
    req = await _token_body(r)
    if not accessor:
        return _write_token(r, req, create=True, accessor="")
    return _write_token(r, req, create=False, accessor=accessor)


async def token_clone(r: Req) -> web.StreamResponse:
    accessor = r.match("id")
    req = await _token_body(r)
    store = r.agent.store
    source = store.get("acl_tokens", accessor)
    r.authz.check("acl:write")
    if source is None:
        raise HTTPError(500, "Cannot find token to clone")
    clone = {
        "Description": req.get("Description") or source.get("Description", ""),
        "Policies": source.get("Policies"),
        "Roles": source.get("Roles"),
        "ServiceIdentities": source.get("ServiceIdentities"),
        "NodeIdentities": source.get("NodeIdentities"),
        "Local": source.get("Local", False),
    }
    return _write_token(r, clone, create=True, accessor="")


async def token_read(r: Req) -> web.StreamResponse:
    accessor = r.match("id")
    if not accessor:
        raise HTTPError(400, "Missing token AccessorID")
    r.authz.check("acl:read")
    store = r.agent.store
    show = r.authz.acl_write()

    def run() -> QueryResult:
        row = store.get("acl_tokens", accessor)
        view = aclstore.token_view(store, row, show_secret=show) if row and not aclstore.expired(row) else None
        return QueryResult(store.topic_index("acl_tokens", "acl_policies"), view, ["acl_tokens", "acl_policies"])

    res = await blocking_query(r, run)
    headers = meta_headers(r, res.index)
    if res.value is None:
        raise HTTPError(404, "Requested token does not exist: ACL not found", headers)
    return json_response(r, res.value, headers=headers)


async def token_self(r: Req) -> web.StreamResponse:
    store = r.agent.store
    row = r.agent.token_by_secret(r.token) if r.token else None
    headers = meta_headers(r, store.topic_index("acl_tokens"))
    if row is None:
        if r.token:
            raise acl.ACLNotFound()
        raise HTTPError(404, "Supplied token does not exist", headers)
    return json_response(r, aclstore.token_view(store, row, show_secret=True), headers=headers)


async def token_delete(r: Req) -> web.StreamResponse:
    accessor = r.match("id")
    if not accessor:
        raise HTTPError(400, "Missing token AccessorID")
    r.authz.check("acl:write")
    store = r.agent.store
    with store.write() as tx:
        try:
            aclstore.token_delete(store, tx, accessor, r.token)
        except aclstore.NotFound:
            raise HTTPError(404, "Cannot find token to delete") from None
        except aclstore.ACLError as exc:
            raise HTTPError(500, str(exc)) from None
    return json_response(r, True)


async def token_list(r: Req) -> web.StreamResponse:
    r.authz.check("acl:read")
    store = r.agent.store
    show = r.authz.acl_write()
    policy, service, role = r.param("policy"), r.param("servicename"), r.param("role")

    def run() -> QueryResult:
        rows = sorted((t for t in store.rows("acl_tokens").values() if not aclstore.expired(t)),
                      key=lambda t: (str(t["CreateTime"]), str(t["AccessorID"])))
        if policy:
            rows = [t for t in rows if any(p.get("ID") == policy for p in t.get("Policies") or [])]
        if service:
            rows = [t for t in rows if any(s.get("ServiceName") == service for s in t.get("ServiceIdentities") or [])]
        if role:
            rows = [t for t in rows if any(x.get("ID") == role for x in t.get("Roles") or [])]
        value = [aclstore.token_stub(store, t, show_secret=show) for t in rows]
        return QueryResult(store.topic_index("acl_tokens", "acl_policies"), value, ["acl_tokens", "acl_policies"])

    res = await blocking_query(r, run)
    return json_response(r, res.value, headers=meta_headers(r, res.index))


# ----- policies -----
async def _policy_body(r: Req) -> dict[str, Any]:
    body = await r.json(failed="Policy decoding failed")
    try:
        return aclstore.decode_policy(body)
    except DecodeError as exc:
        raise HTTPError(400, f"Policy decoding failed: {exc}") from None


def _write_policy(r: Req, req: dict[str, Any], *, create: bool, pid: str) -> web.StreamResponse:
    r.authz.check("acl:write")
    store = r.agent.store
    with store.write() as tx:
        try:
            row = aclstore.policy_set(store, tx, req, create=create, id_in_url=pid)
        except DecodeError as exc:
            raise HTTPError(400, str(exc)) from None
        except aclstore.ACLError as exc:
            raise HTTPError(500, str(exc)) from None
    return json_response(r, row)


async def policy_create(r: Req) -> web.StreamResponse:
    return _write_policy(r, await _policy_body(r), create=True, pid="")


async def policy_update(r: Req) -> web.StreamResponse:
    pid = r.match("id")
    req = await _policy_body(r)
    if not pid:
        return _write_policy(r, req, create=True, pid="")
    return _write_policy(r, req, create=False, pid=pid)


async def _policy_read(r: Req, pid: str, name: str) -> web.StreamResponse:
    r.authz.check("acl:read")
    store = r.agent.store

    def run() -> QueryResult:
        if pid:
            row = store.get("acl_policies", pid)
        else:
            found = store.by_index("acl_policies", "name", name)
            row = found[0] if found else None
        return QueryResult(store.topic_index("acl_policies"), row, ["acl_policies"])

    res = await blocking_query(r, run)
    headers = meta_headers(r, res.index)
    if res.value is None:
        raise HTTPError(404, "Requested policy does not exist: ACL not found", headers)
    return json_response(r, res.value, headers=headers)


async def policy_read(r: Req) -> web.StreamResponse:
    pid = r.match("id")
    if not pid:
        raise HTTPError(400, "Missing policy ID")
    return await _policy_read(r, pid, "")


async def policy_read_by_name(r: Req) -> web.StreamResponse:
    name = r.match("name")
    if not name:
        raise HTTPError(400, "Missing policy Name")
    return await _policy_read(r, "", name)


async def policy_delete(r: Req) -> web.StreamResponse:
    pid = r.match("id")
    if not pid:
        raise HTTPError(400, "Missing policy ID")
    r.authz.check("acl:write")
    store = r.agent.store
    with store.write() as tx:
        try:
            aclstore.policy_delete(store, tx, pid)
        except aclstore.NotFound:
            raise HTTPError(404, "Cannot find policy to delete") from None
        except aclstore.ACLError as exc:
            raise HTTPError(500, str(exc)) from None
    return json_response(r, True)


async def policy_list(r: Req) -> web.StreamResponse:
    r.authz.check("acl:read")
    store = r.agent.store

    def run() -> QueryResult:
        rows = sorted(store.rows("acl_policies").values(), key=lambda p: str(p["Name"]))
        return QueryResult(store.topic_index("acl_policies"), [aclstore.policy_stub(p) for p in rows],
                           ["acl_policies"])

    res = await blocking_query(r, run)
    return json_response(r, res.value, headers=meta_headers(r, res.index))
