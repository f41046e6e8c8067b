"""Consul's KV semantics on the state store (pure: no I/O). Used by the KV and txn endpoints.

Rows of table ``kvs`` are DirEntries as Consul's API returns them (Value base64 or None; Session
only when held). Deletions leave a tombstone in ``kv_tombstones`` so a prefix query's index moves
when a key under it disappears, as Consul's graveyard does.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from devagent.state import Row, Store, Topic, Tx

_ENCODED_TRAVERSAL = re.compile(r"(?i)(%2e%2e(%2f|%5c|/))|(\.\.%2f)|(\.\.%5c)|(%252e%252e%252f)")


def key_problem(key: str) -> str | None:
    """Consul 1.22's KV key validation (on by default): no path traversal, plain or URL-encoded, and no
    leading or trailing spaces. Returns what is wrong, or None."""
    if key != key.strip(" "):
        return "key must not have leading or trailing spaces"
    if any(part == ".." for part in re.split(r"[/\\]", key)):
        return "key contains path traversal sequence"
    if _ENCODED_TRAVERSAL.search(key):
        return "key contains encoded path traversal sequence"
    return None


class KVError(Exception):
    """An operation Consul rejects with an error (e.g. an invalid session for acquire)."""


def entry(key: str, value: str | None, flags: int, create: int, modify: int, lock_index: int = 0,
          session: str = "") -> Row:
    row: Row = {"LockIndex": lock_index, "Key": key, "Flags": flags, "Value": value}
    if session:
        row["Session"] = session
    row["CreateIndex"] = create
    row["ModifyIndex"] = modify
    return row


def table_index(store: Store) -> int:
    return store.topic_index("kvs", "kv_tombstones")


# ----- reads: (index, answer, topics to watch) -----
def get(store: Store, key: str) -> tuple[int, Row | None, list[Topic]]:
    row = store.get("kvs", key)
    if row is None:
        return table_index(store), None, ["kvs"]
    return int(row["ModifyIndex"]), row, [("kvs", key)]


def _prefix_index(store: Store, prefix: str, rows: list[Row]) -> int:
    if prefix == "":
        return table_index(store)
    idx = max((int(r["ModifyIndex"]) for r in rows), default=0)
    for _, tomb in store.scan_prefix("kv_tombstones", prefix):
        idx = max(idx, int(tomb["Index"]))
    return idx or table_index(store)


def list_prefix(store: Store, prefix: str) -> tuple[int, list[Row], list[Topic]]:
    rows = [r for _, r in store.scan_prefix("kvs", prefix)]
    return _prefix_index(store, prefix, rows), rows, [("kvs", "prefix", prefix)]


def list_keys(store: Store, prefix: str, sep: str) -> tuple[int, list[str], list[Topic]]:
    rows = [r for _, r in store.scan_prefix("kvs", prefix)]
    keys: list[str] = []
    last = None
    for r in rows:
        k = str(r["Key"])
        if sep:
            pos = k.find(sep, len(prefix))
            if pos >= 0:
                k = k[: pos + len(sep)]
                if k == last:
                    continue
                last = k
        keys.append(k)
    return _prefix_index(store, prefix, rows), keys, [("kvs", "prefix", prefix)]


# ----- writes (inside a transaction) -----
def kv_set(tx: Tx, key: str, value: str | None, flags: int, *, session: str | None = None,
           lock_index: int | None = None) -> Row:
    existing = tx.get("kvs", key)
    create = int(existing["CreateIndex"]) if existing else tx.index
    if session is None:
        session = str(existing.get("Session", "")) if existing else ""
    if lock_index is None:
        lock_index = int(existing["LockIndex"]) if existing else 0
    if (existing is not None and existing.get("Value") == value and existing["Flags"] == flags
            and existing.get("Session", "") == session and existing["LockIndex"] == lock_index):
        return existing  # Consul skips writing an unchanged entry: its ModifyIndex stays, nobody wakes
    row = entry(key, value, flags, create, tx.index, lock_index, session)
    tx.put("kvs", key, row)
    return row


def kv_cas(tx: Tx, key: str, value: str | None, flags: int, cas: int) -> bool:
    existing = tx.get("kvs", key)
    if cas == 0 and existing is not None:
        return False
    if cas != 0 and (existing is None or int(existing["ModifyIndex"]) != cas):
        return False
    kv_set(tx, key, value, flags)
    return True


def lock_delay_active(delays: dict[str, float], key: str, now: Callable[[], float] = time.monotonic) -> bool:
    expires = delays.get(key)
    if expires is None:
        return False
    if expires <= now():
        del delays[key]
        return False
    return True


def kv_lock(tx: Tx, key: str, value: str | None, flags: int, session: str) -> bool:
    if not session:
        raise KVError("missing session")
    if tx.get("sessions", session) is None:
        raise KVError(f'invalid session "{session}"')
    existing = tx.get("kvs", key)
    if existing is not None:
        holder = existing.get("Session", "")
        if holder == session:
            lock_index = int(existing["LockIndex"])
        elif holder:
            return False
        else:
            lock_index = int(existing["LockIndex"]) + 1
    else:
        lock_index = 1
    kv_set(tx, key, value, flags, session=session, lock_index=lock_index)
    return True


def kv_unlock(tx: Tx, key: str, value: str | None, flags: int, session: str) -> bool:
    if not session:
        raise KVError("missing session")
    existing = tx.get("kvs", key)
    if existing is None or existing.get("Session", "") != session:
        return False
    kv_set(tx, key, value, flags, session="", lock_index=int(existing["LockIndex"]))
    return True


def kv_delete(tx: Tx, key: str) -> None:
    if tx.get("kvs", key) is None:
        return
    tx.put("kv_tombstones", key, {"Key": key, "Index": tx.index})
    tx.delete("kvs", key)


def kv_delete_cas(tx: Tx, key: str, cas: int) -> bool:
    existing = tx.get("kvs", key)
    if existing is None:
        return True  # Consul: a delete-cas of a missing key succeeds, whatever the index
    if int(existing["ModifyIndex"]) != cas:
        return False
    kv_delete(tx, key)
    return True


def kv_delete_tree(store: Store, tx: Tx, prefix: str) -> None:
    for key, _ in store.scan_prefix("kvs", prefix):
        kv_delete(tx, key)
