"""Consul's session semantics on the state store (pure: no I/O, no timers).

A session belongs to a node and lists health checks (NodeChecks, ServiceChecks). It is invalidated
when destroyed, when its TTL lapses (the endpoint module runs the timers), when one of its checks
turns critical or is deregistered, or when its node is deregistered. Invalidation releases
(``Behavior: release``) or deletes (``delete``) the keys it locked and starts each key's lock-delay.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from devagent import kv
from devagent.codec import (
    HOUR,
    SECOND,
    DecodeError,
    decode_struct,
    expect_str,
    expect_str_list,
    format_duration,
    parse_duration,
)
from devagent.state import Row, Store, Tx

SESSION_TTL_MAX = 24 * HOUR
SESSION_TTL_MULTIPLIER = 2  # Consul lets a session live up to twice its TTL before reaping it
MAX_LOCK_DELAY = 60 * SECOND
DEFAULT_LOCK_DELAY = 15 * SECOND
LOCK_DELAY_MIN_THRESHOLD = 1000  # numeric lock delays below this are seconds, as in Consul

SPEC: dict[str, Any] = {
    "ID": None, "Name": None, "Node": None, "LockDelay": None, "Behavior": None, "TTL": None,
    "Checks": None, "NodeChecks": None, "ServiceChecks": [{"ID": None, "Namespace": None}],
}


class SessionError(Exception):
    """An error Consul's Session.Apply returns (the HTTP layer answers 500 with the message)."""


def lock_delay(value: Any) -> int:
    """Consul's FixupLockDelay: a duration string or a number; values under 1000 are seconds."""
    if isinstance(value, bool) or value is None:
        raise DecodeError(f"LockDelay: invalid value {value!r}")
    if isinstance(value, str):
        ns = parse_duration(value)
    elif isinstance(value, (int, float)):
        ns = int(value)
    else:
        raise DecodeError(f"LockDelay: invalid value {value!r}")
    if ns < LOCK_DELAY_MIN_THRESHOLD:
        ns *= SECOND
    return ns


def build(body: Any, *, default_node: str, session_id: str, ttl_min: int) -> Row:
    """A session row (without indexes) from a create request body; raises DecodeError / SessionError."""
    raw = decode_struct(body, SPEC, what="session") if body is not None else {}
    node = expect_str(raw.get("Node"), "Node") or default_node
    if "NodeChecks" in raw or "Checks" in raw:
        node_checks: list[str] = []
        for c in expect_str_list(raw.get("Checks"), "Checks") + expect_str_list(raw.get("NodeChecks"), "NodeChecks"):
            if c not in node_checks:
                node_checks.append(c)
    else:
        node_checks = ["serfHealth"]
    service_checks = None
    if raw.get("ServiceChecks"):
        service_checks = [{"ID": expect_str(sc.get("ID"), "ServiceChecks.ID"),
                           "Namespace": expect_str(sc.get("Namespace"), "ServiceChecks.Namespace")}
                          for sc in raw["ServiceChecks"]]
    delay = lock_delay(raw["LockDelay"]) if "LockDelay" in raw else DEFAULT_LOCK_DELAY
    behavior = expect_str(raw.get("Behavior"), "Behavior") or "release"
    if behavior not in ("release", "delete"):
        raise SessionError(f"Invalid Behavior setting '{behavior}'")
    ttl = expect_str(raw.get("TTL"), "TTL")
    if ttl:
        try:
            ttl_ns = parse_duration(ttl)
        except DecodeError as exc:
            raise SessionError(f"Session TTL '{ttl}' invalid: {exc}") from None
        if ttl_ns != 0 and (ttl_ns < ttl_min or ttl_ns > SESSION_TTL_MAX):
            raise SessionError(f"Invalid Session TTL '{ttl_ns}', must be between "
                               f"[{format_duration(ttl_min)}={format_duration(SESSION_TTL_MAX)}]")
    return {
        "ID": session_id,
        "Name": expect_str(raw.get("Name"), "Name"),
        "Node": node,
        "LockDelay": delay,
        "Behavior": behavior,
        "TTL": ttl,
        "NodeChecks": node_checks or None,
        "ServiceChecks": service_checks,
    }


def ttl_ns(session: Row) -> int:
    ttl = session.get("TTL") or ""
    return parse_duration(ttl) if ttl else 0


def create(tx: Tx, session: Row) -> Row:
    """Insert a session after Consul's checks (node exists, every check exists and is not critical)."""
    node = session["Node"]
    if tx.get("nodes", node) is None:
        raise SessionError("Missing node registration")
    for check_id in check_ids(session):
        check = tx.get("checks", f"{node}/{check_id}")
        if check is None:
            raise SessionError(f"Missing check '{check_id}' registration")
        if check.get("Status") == "critical":
            raise SessionError(f"Check '{check_id}' is in critical state")
    row = {**session, "CreateIndex": tx.index, "ModifyIndex": tx.index}
    tx.put("sessions", str(session["ID"]), row)
    return row


def check_ids(session: Row) -> list[str]:
    ids = list(session.get("NodeChecks") or [])
    ids += [str(sc["ID"]) for sc in session.get("ServiceChecks") or []]
    return ids


def destroy(store: Store, tx: Tx, session_id: str, delays: dict[str, float],
            now: Callable[[], float] = time.monotonic) -> bool:
    """Invalidate a session: delete it, release or delete its locks, start their lock-delay."""
    session = tx.get("sessions", session_id)
    if session is None:
        return False
    tx.delete("sessions", session_id)
    delay = min(int(session.get("LockDelay") or 0), MAX_LOCK_DELAY)
    started = now()
    for row in store.by_index("kvs", "session", session_id):
        key = str(row["Key"])
        if session.get("Behavior") == "delete":
            kv.kv_delete(tx, key)
        else:
            kv.kv_set(tx, key, row.get("Value"), int(row["Flags"]), session="", lock_index=int(row["LockIndex"]))
        if delay > 0:
            delays[key] = started + delay / SECOND
    return True


def sessions_on_check(store: Store, node: str, check_id: str) -> list[str]:
    """IDs of the sessions of ``node`` that list ``check_id``."""
    return [str(s["ID"]) for s in store.by_index("sessions", "node", node) if check_id in check_ids(s)]


def install_triggers(store: Store, delays: dict[str, float]) -> None:
    """Invalidate sessions inside the transaction that fails or removes what they depend on."""

    def on_check_put(tx: Tx, key: str, old: Row | None, new: Row | None) -> None:
        if new is not None and new.get("Status") == "critical":
            for sid in sessions_on_check(store, str(new["Node"]), str(new["CheckID"])):
                destroy(store, tx, sid, delays)

    def on_check_delete(tx: Tx, key: str, old: Row | None, new: Row | None) -> None:
        if old is not None:
            for sid in sessions_on_check(store, str(old["Node"]), str(old["CheckID"])):
                destroy(store, tx, sid, delays)

    def on_node_delete(tx: Tx, key: str, old: Row | None, new: Row | None) -> None:
        for s in store.by_index("sessions", "node", key):
            destroy(store, tx, str(s["ID"]), delays)

    store.on_put("checks", on_check_put)
    store.on_delete("checks", on_check_delete)
    store.on_delete("nodes", on_node_delete)
