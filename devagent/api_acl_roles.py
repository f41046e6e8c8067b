"""``/v1/acl/role*``, ``/v1/acl/auth-method*``, ``/v1/acl/binding-rule*``, ``/v1/acl/login``,
``/v1/acl/logout`` (when ``-acl-enabled``; otherwise 401 ``ACL support disabled``), as Consul's
agent/acl_endpoint.go serves them. Roles count for permissions: a token's roles add their policies
and identities (``Agent.authorizer_for_token``). Login is refused for every CE method type: a single
dev agent cannot verify Kubernetes, JWT or OIDC credentials (see ``aclroles.LOGIN_UNSUPPORTED``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from devagent import acl, aclroles, aclstore
from devagent.agent import Agent
from devagent.api_acl import _enabled
from devagent.codec import DecodeError, decode_struct, expect_str
from devagent.http import (
    Endpoint,
    HTTPError,
    QueryResult,
    Req,
    blocking_query,
    json_response,
    meta_headers,
)
from devagent.state import Row

ROLE_FAILED = "Role decoding failed"
METHOD_FAILED = "AuthMethod decoding failed"
RULE_FAILED = "BindingRule decoding failed"


def setup(agent: Agent) -> None:
    aclroles.install(agent.store)


def routes(agent: Agent) -> list[Endpoint]:
    return [
        Endpoint("/v1/acl/role", {"PUT": _enabled(role_create)}),
        Endpoint("/v1/acl/role/name/{name:.*}", {"GET": _enabled(role_read_by_name)}),
        Endpoint("/v1/acl/role/{id:.*}", {"GET": _enabled(role_read), "PUT": _enabled(role_update),
                                          "DELETE": _enabled(role_delete)}),
        Endpoint("/v1/acl/roles", {"GET": _enabled(role_list)}),
        Endpoint("/v1/acl/auth-method", {"PUT": _enabled(method_create)}),
        Endpoint("/v1/acl/auth-method/{name:.*}", {"GET": _enabled(method_read), "PUT": _enabled(method_update),
                                                   "DELETE": _enabled(method_delete)}),
        Endpoint("/v1/acl/auth-methods", {"GET": _enabled(method_list)}),
        Endpoint("/v1/acl/binding-rule", {"PUT": _enabled(rule_create)}),
        Endpoint("/v1/acl/binding-rule/{id:.*}", {"GET": _enabled(rule_read), "PUT": _enabled(rule_update),
                                                  "DELETE": _enabled(rule_delete)}),
        Endpoint("/v1/acl/binding-rules", {"GET": _enabled(rule_list)}),
        Endpoint("/v1/acl/login", {"POST": _enabled(login)}),
        Endpoint("/v1/acl/logout", {"POST": _enabled(logout)}),
    ]


# ----- shared -----
async def _body(r: Req, spec: dict[str, Any], what: str, failed: str) -> dict[str, Any]:
    body = await r.json(failed=failed)
    try:
        return aclroles.decode(body, spec, what)
    except DecodeError as exc:
        raise HTTPError(400, f"{failed}: {exc}") from None


def _write(r: Req, apply: Callable[[Any], Row], view: Callable[[Row], Row], failed: str) -> web.StreamResponse:
    """Apply a write; a field of the wrong type is a decoding error (400, as Consul's JSON decoder)."""
    r.authz.check("acl:write")
    store = r.agent.store
    with store.write() as tx:
        try:
            row = apply(tx)
        except DecodeError as exc:
            raise HTTPError(400, f"{failed}: {exc}") from None
        except aclstore.ACLError as exc:
            raise HTTPError(500, str(exc)) from None
    return json_response(r, view(row))


async def _read(r: Req, table: str, find: Callable[[], Row | None], view: Callable[[Row], Row],
                what: str) -> web.StreamResponse:
    r.authz.check("acl:read")
    store = r.agent.store
    topics = [table, "acl_policies"]

    def run() -> QueryResult:
        row = find()
        return QueryResult(store.topic_index(*topics), view(row) if row is not None else None, topics)

    res = await blocking_query(r, run)
    headers = meta_headers(r, res.index)
    if res.value is None:
        raise HTTPError(404, f"Requested {what} does not exist: ACL not found", headers)
    return json_response(r, res.value, headers=headers)


async def _list(r: Req, table: str, rows: Callable[[], list[Row]]) -> web.StreamResponse:
    r.authz.check("acl:read")
    store = r.agent.store
    topics = [table, "acl_policies"]

    def run() -> QueryResult:
        return QueryResult(store.topic_index(*topics), rows(), topics)

    res = await blocking_query(r, run)
    return json_response(r, res.value, headers=meta_headers(r, res.index))


def _delete(r: Req, remove: Callable[[Any], None]) -> web.StreamResponse:
    """Consul's deletes answer ``true`` also for an unknown ID (its RPCs return without error)."""
    r.authz.check("acl:write")
    with r.agent.store.write() as tx:
        remove(tx)
    return json_response(r, True)


def _field(req: dict[str, Any], key: str, failed: str) -> str:
    try:
        return expect_str(req.get(key), key)
    except DecodeError as exc:
        raise HTTPError(400, f"{failed}: {exc}") from None


def _required(value: str, what: str) -> str:
    if not value:
        raise HTTPError(400, f"Missing {what}")
    return value


# ----- roles -----
async def role_create(r: Req) -> web.StreamResponse:
    req = await _body(r, aclroles.ROLE_SPEC, "role", ROLE_FAILED)
    if _field(req, "ID", ROLE_FAILED):
        raise HTTPError(400, "Role ID in URL and payload do not match")
    return _write_role(r, req)


def _write_role(r: Req, req: dict[str, Any]) -> web.StreamResponse:
    store = r.agent.store
    return _write(r, lambda tx: aclroles.role_set(store, tx, req), lambda row: aclroles.role_view(store, row),
                  ROLE_FAILED)


async def role_update(r: Req) -> web.StreamResponse:
    rid = r.match("id")
    req = await _body(r, aclroles.ROLE_SPEC, "role", ROLE_FAILED)
    given = _field(req, "ID", ROLE_FAILED)
    if given and given != rid:
        raise HTTPError(400, "Role ID in URL and payload do not match")
    return _write_role(r, {**req, "ID": rid})


async def role_read(r: Req) -> web.StreamResponse:
    rid = _required(r.match("id"), "role ID")
    store = r.agent.store
    return await _read(r, aclroles.ROLES, lambda: store.get(aclroles.ROLES, rid),
                       lambda row: aclroles.role_view(store, row), "role")


async def role_read_by_name(r: Req) -> web.StreamResponse:
    name = _required(r.match("name"), "role Name")
    store = r.agent.store
    return await _read(r, aclroles.ROLES, lambda: aclroles.role_by_name(store, name),
                       lambda row: aclroles.role_view(store, row), "role")


async def role_delete(r: Req) -> web.StreamResponse:
    rid = _required(r.match("id"), "role ID")
    return _delete(r, lambda tx: tx.delete(aclroles.ROLES, rid))


async def role_list(r: Req) -> web.StreamResponse:
    store = r.agent.store
    policy = r.param("policy")

    def rows() -> list[Row]:
        out = sorted(store.rows(aclroles.ROLES).values(), key=lambda row: str(row["Name"]))
        if policy:
            out = [row for row in out if any(p.get("ID") == policy for p in row.get("Policies") or [])]
        return [aclroles.role_view(store, row) for row in out]

    return await _list(r, aclroles.ROLES, rows)


# ----- auth methods -----
async def method_create(r: Req) -> web.StreamResponse:
    req = await _body(r, aclroles.METHOD_SPEC, "auth method", METHOD_FAILED)
    store = r.agent.store
    return _write(r, lambda tx: aclroles.method_set(store, tx, req), lambda row: row, METHOD_FAILED)


async def method_update(r: Req) -> web.StreamResponse:
    name = r.match("name")
    req = await _body(r, aclroles.METHOD_SPEC, "auth method", METHOD_FAILED)
    given = _field(req, "Name", METHOD_FAILED)
    if name:
        if given and given != name:
            raise HTTPError(400, "AuthMethod Name in URL and payload do not match")
        req = {**req, "Name": name}
    store = r.agent.store
    return _write(r, lambda tx: aclroles.method_set(store, tx, req), lambda row: row, METHOD_FAILED)


async def method_read(r: Req) -> web.StreamResponse:
    name = _required(r.match("name"), "auth method name")
    store = r.agent.store
    return await _read(r, aclroles.METHODS, lambda: store.get(aclroles.METHODS, name), lambda row: row,
                       "auth method")


async def method_delete(r: Req) -> web.StreamResponse:
    name = _required(r.match("name"), "auth method name")
    store = r.agent.store
    return _delete(r, lambda tx: aclroles.method_delete(store, tx, name))


async def method_list(r: Req) -> web.StreamResponse:
    store = r.agent.store
    return await _list(r, aclroles.METHODS, lambda: [
        aclroles.method_stub(row) for row in sorted(store.rows(aclroles.METHODS).values(),
                                                    key=lambda row: str(row["Name"]))])


# ----- binding rules -----
async def rule_create(r: Req) -> web.StreamResponse:
    req = await _body(r, aclroles.RULE_SPEC, "binding rule", RULE_FAILED)
    if _field(req, "ID", RULE_FAILED):
        raise HTTPError(400, "BindingRule ID in URL and payload do not match")
    store = r.agent.store
    return _write(r, lambda tx: aclroles.rule_set(store, tx, req), lambda row: row, RULE_FAILED)


async def rule_update(r: Req) -> web.StreamResponse:
    rid = r.match("id")
    req = await _body(r, aclroles.RULE_SPEC, "binding rule", RULE_FAILED)
    given = _field(req, "ID", RULE_FAILED)
    if given and given != rid:
        raise HTTPError(400, "BindingRule ID in URL and payload do not match")
    store = r.agent.store
    return _write(r, lambda tx: aclroles.rule_set(store, tx, {**req, "ID": rid}), lambda row: row, RULE_FAILED)


async def rule_read(r: Req) -> web.StreamResponse:
    rid = _required(r.match("id"), "binding rule ID")
    store = r.agent.store
    return await _read(r, aclroles.RULES, lambda: store.get(aclroles.RULES, rid), lambda row: row,
                       "binding rule")


async def rule_delete(r: Req) -> web.StreamResponse:
    rid = _required(r.match("id"), "binding rule ID")
    return _delete(r, lambda tx: tx.delete(aclroles.RULES, rid))


async def rule_list(r: Req) -> web.StreamResponse:
    store = r.agent.store
    method = r.param("authmethod")

    def rows() -> list[Row]:
        out = (store.by_index(aclroles.RULES, "method", method) if method
               else list(store.rows(aclroles.RULES).values()))
        return sorted(out, key=lambda row: (int(row["CreateIndex"]), str(row["ID"])))

    return await _list(r, aclroles.RULES, rows)


# ----- login / logout -----
async def login(r: Req) -> web.StreamResponse:
    body = await r.json(failed="Failed to decode request body")
    try:
        d = decode_struct(body if body is not None else {}, {"AuthMethod": None, "BearerToken": None,
                                                             "Meta": None, "Namespace": None,
                                                             "Partition": None}, what="body")
        name = expect_str(d.get("AuthMethod"), "AuthMethod")
        expect_str(d.get("BearerToken"), "BearerToken")
    except DecodeError as exc:
        raise HTTPError(400, f"Failed to decode request body: {exc}") from None
    method = r.agent.store.get(aclroles.METHODS, name)
    if method is None:
        raise HTTPError(403, f'ACL not found: auth method "{name}" not found')
    raise HTTPError(500, aclroles.login_refusal(method))


async def logout(r: Req) -> web.StreamResponse:
    if not r.token:
        raise HTTPError(401, "Supplied token does not exist")
    row = r.agent.token_by_secret(r.token)
    if row is None:
        raise acl.ACLNotFound()
    if not row.get("AuthMethod"):
        raise HTTPError(403, "Permission denied")  # only a token made by a login can log out
    with r.agent.store.write() as tx:
        tx.delete("acl_tokens", str(row["AccessorID"]))
    return json_response(r, True)
