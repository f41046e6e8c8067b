"""``PUT /v1/txn``: Consul transactions, all or nothing.

KV verbs: set, cas, lock, unlock, get, get-or-empty, get-tree, check-index, check-session,
check-not-exists, delete, delete-tree, delete-cas. Session verb: delete. Other op types (Node,
Service, Check) are served by whichever module registers a handler with ``register_op``.
Success answers 200 ``{"Results": [...], "Errors": null}``; any failed op answers 409
``{"Results": null, "Errors": [{"OpIndex", "What"}]}`` and nothing is applied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from devagent import acl, kv, sessions
from devagent.agent import Agent
from devagent.codec import DecodeError, b64, decode_struct, expect_int, expect_str, unb64
from devagent.http import MAX_BODY, Endpoint, HTTPError, Req, json_response
from devagent.state import Row, Tx

MAX_TXN_OPS = 64
KV_SPEC: dict[str, Any] = {"Verb": None, "Key": None, "Value": None, "Flags": None, "Index": None,
                           "Session": None, "Namespace": None, "Partition": None}
SESSION_SPEC: dict[str, Any] = {"Verb": None, "Session": {"ID": None, "Node": None}}
READ_VERBS = frozenset({"get", "get-or-empty", "get-tree", "check-index", "check-session", "check-not-exists"})

# op type -> handler(tx, op body (raw dict), request) -> (results, is_write); raise TxnOpError to fail the op
OpHandler = Callable[[Tx, dict[str, Any], Req], list[dict[str, Any]]]
_OP_HANDLERS: dict[str, tuple[OpHandler, Callable[[dict[str, Any]], bool]]] = {}


class TxnOpError(Exception):
    """One operation failed: its message becomes the op's ``What``."""


def register_op(op_type: str, handler: OpHandler, is_write: Callable[[dict[str, Any]], bool]) -> None:
    """Let another module serve an op type (``"Node"``, ``"Service"``, ``"Check"``) in transactions."""
    _OP_HANDLERS[op_type] = (handler, is_write)


def routes(agent: Agent) -> list[Endpoint]:
    return [Endpoint("/v1/txn", {"PUT": txn})]


def _decode(raw: Any) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(raw, list):
        raise DecodeError("expected an array of operations")
    ops: list[tuple[str, dict[str, Any]]] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise DecodeError(f"operation {i}: expected an object")
        kinds = [(k, v) for k, v in item.items() if v is not None]
        if len(kinds) != 1:
            ops.append(("", {}))  # "no operation specified" at apply time, as Consul
            continue
        name, body = kinds[0]
        canon: str = {"kv": "KV", "session": "Session", "node": "Node", "service": "Service", "check": "Check",
                      "intention": "Intention"}.get(str(name).lower(), str(name))
        if canon == "KV":
            op = decode_struct(body, KV_SPEC, what=f"operation {i} KV")
            value = op.get("Value")
            if value is not None and not isinstance(value, str):
                raise DecodeError(f"operation {i}: unexpected value type")
            try:
                data = unb64(value) if value is not None else None
            except DecodeError as exc:
                raise DecodeError(f"failed to decode value: {exc}") from None
            op["Value"] = data
            op["Verb"] = expect_str(op.get("Verb"), "Verb")
            op["Key"] = expect_str(op.get("Key"), "Key")
            op["Flags"] = expect_int(op.get("Flags"), "Flags")
            op["Index"] = expect_int(op.get("Index"), "Index")
            op["Session"] = expect_str(op.get("Session"), "Session")
            ops.append(("KV", op))
        elif canon == "Session":
            ops.append(("Session", decode_struct(body, SESSION_SPEC, what=f"operation {i} Session")))
        else:
            ops.append((canon, body if isinstance(body, dict) else {}))
    return ops


def _is_write(kind: str, op: dict[str, Any]) -> bool:
    if kind == "KV":
        return op["Verb"] not in READ_VERBS
    if kind == "Session":
        return True
    handler = _OP_HANDLERS.get(kind)
    return handler[1](op) if handler else True


async def txn(r: Req) -> web.StreamResponse:
    r.check_dc()
    length = r.raw.content_length
    too_large = f"Request body too large, max size: {MAX_BODY} bytes"
    if length is not None and length > MAX_BODY:
        raise HTTPError(413, too_large)
    data = await r.body(MAX_BODY, too_large=too_large)
    import json

    try:
        ops = _decode(json.loads(data) if data.strip() else None)
    except (json.JSONDecodeError, UnicodeDecodeError, DecodeError) as exc:
        raise HTTPError(400, f"Failed to parse body: {exc}") from None
    if len(ops) > MAX_TXN_OPS:
        raise HTTPError(413, f"Transaction contains too many operations ({len(ops)} > {MAX_TXN_OPS})")
    for kind, op in ops:
        if kind == "KV" and op["Value"] is not None and len(op["Value"]) > MAX_BODY:
            raise HTTPError(413, f'Value for key "{op["Key"]}" is too large ({len(op["Value"])} > {MAX_BODY} bytes)')
    writes = sum(1 for kind, op in ops if _is_write(kind, op))
    headers = {"X-Consul-KnownLeader": "true", "X-Consul-LastContact": "0"} if writes == 0 else {}
    if writes == 0:
        r.consistency()
    authz = r.authz
    agent = r.agent
    errors: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    try:
        with agent.store.write() as tx:
            for i, (kind, op) in enumerate(ops):
                try:
                    results += _apply(agent, tx, kind, op, authz, r)
                except (TxnOpError, kv.KVError, acl.PermissionDenied, sessions.SessionError, DecodeError) as exc:
                    errors.append({"OpIndex": i, "What": str(exc)})
            if errors:
                raise _Abort()
    except _Abort:
        return json_response(r, {"Results": None, "Errors": errors}, status=409, headers=headers)
    visible = [res for res in results if "KV" not in res or authz.key_read(str(res["KV"]["Key"]))]
    return json_response(r, {"Results": visible, "Errors": None}, headers=headers)


class _Abort(Exception):
    pass


def _result(row: Row, *, with_value: bool) -> dict[str, Any]:
    return {"KV": row if with_value else {**row, "Value": None}}


def _apply(agent: Agent, tx: Tx, kind: str, op: dict[str, Any], authz: acl.Authorizer, r: Req
           ) -> list[dict[str, Any]]:
    if kind == "KV":
        return _apply_kv(agent, tx, op, authz)
    if kind == "Session":
        verb = expect_str(op.get("Verb"), "Verb")
        if verb != "delete":
            raise TxnOpError(f'unknown Session verb "{verb}"')
        sid = expect_str((op.get("Session") or {}).get("ID"), "Session.ID")
        existing = tx.get("sessions", sid)
        if existing is not None:
            authz.check("session:write", str(existing["Node"]))
        sessions.destroy(agent.store, tx, sid, agent.lock_delays)
        return []
    if kind == "":
        raise TxnOpError("no operation specified")
    handler = _OP_HANDLERS.get(kind)
    if handler is None:
        raise TxnOpError(f"{kind} operations are not supported by the dev agent")
    return handler[0](tx, op, r)


def _apply_kv(agent: Agent, tx: Tx, op: dict[str, Any], authz: acl.Authorizer) -> list[dict[str, Any]]:
    verb, key = op["Verb"], op["Key"]
    value = b64(op["Value"]) if op["Value"] else None
    flags, index, session = op["Flags"], op["Index"], op["Session"]
    # Consul's kvsPreApply: key required (except delete-tree), ACL check per verb, lock-delay
    if key == "" and verb != "delete-tree":
        raise TxnOpError("Must provide key")
    if verb == "delete-tree":
        authz.check_key_write_prefix(key)
    elif verb in ("check-session", "check-index"):
        authz.check("key:read", key)
    elif verb not in ("get", "get-tree", "get-or-empty", "check-not-exists"):
        authz.check("key:write", key)
    if verb == "lock" and kv.lock_delay_active(agent.lock_delays, key):
        raise TxnOpError(f'failed to lock key "{key}" due to lock delay')
    store = agent.store
    if verb == "set":
        return [_result(kv.kv_set(tx, key, value, flags), with_value=False)]
    if verb == "cas":
        if not kv.kv_cas(tx, key, value, flags, index):
            raise TxnOpError(f'failed to set key "{key}", index is stale')
        return [_result(_must(tx, key), with_value=False)]
    if verb == "lock":
        if not kv.kv_lock(tx, key, value, flags, session):
            raise TxnOpError(f'failed to lock key "{key}", lock is already held')
        return [_result(_must(tx, key), with_value=False)]
    if verb == "unlock":
        if not kv.kv_unlock(tx, key, value, flags, session):
            raise TxnOpError(f'failed to unlock key "{key}", lock isn\'t held, or is held by another session')
        return [_result(_must(tx, key), with_value=False)]
    if verb == "get":
        row = tx.get("kvs", key)
        if row is None:
            raise TxnOpError(f'key "{key}" doesn\'t exist')
        return [_result(row, with_value=True)]
    if verb == "get-or-empty":
        row = tx.get("kvs", key)
        if row is None:
            row = kv.entry(key, None, flags, 0, 0, 0, session)
        return [_result(row, with_value=True)]
    if verb == "get-tree":
        return [_result(row, with_value=True) for _, row in store.scan_prefix("kvs", key)]
    if verb == "check-index":
        row = tx.get("kvs", key)
        if row is None:
            raise TxnOpError(f'failed to check index, key "{key}" doesn\'t exist')
        if int(row["ModifyIndex"]) != index:
            raise TxnOpError(
                f'failed index check for key "{key}", current modify index {row["ModifyIndex"]} != {index}')
        return [_result(row, with_value=False)]
    if verb == "check-session":
        row = tx.get("kvs", key)
        if row is None:
            raise TxnOpError(f'failed to check session, key "{key}" doesn\'t exist')
        if row.get("Session", "") != session:
            raise TxnOpError(f'failed session check for key "{key}", current session "{row.get("Session", "")}" '
                             f'!= "{session}"')
        return [_result(row, with_value=False)]
    if verb == "check-not-exists":
        if tx.get("kvs", key) is not None:
            raise TxnOpError(f'key "{key}" exists')
        return []
    if verb == "delete":
        kv.kv_delete(tx, key)
        return []
    if verb == "delete-tree":
        kv.kv_delete_tree(store, tx, key)
        return []
    if verb == "delete-cas":
        if not kv.kv_delete_cas(tx, key, index):
            raise TxnOpError(f'failed to delete key "{key}", index is stale')
        return []
    raise TxnOpError(f'unknown KV verb "{verb}"')


def _must(tx: Tx, key: str) -> Row:
    row = tx.get("kvs", key)
    assert row is not None
    return row
