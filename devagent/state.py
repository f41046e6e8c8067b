"""The dev agent's in-memory state store: tables of JSON-shaped rows, one global modify index, watches.

Like Consul's memdb behind Raft, every committed write transaction gets the next value of ONE global
index (always >= 1). The store remembers, per *topic*, the index of the last transaction that
touched it, so that a query can answer with the index of the part of the state it read and a
blocking query wakes only when that part changes.

Topics are hashable, JSON-friendly values: a table name (``"kvs"``), a ``(table, key)`` pair, or
any tuple of strings a module chooses (``("service", "web")``). Every ``put``/``delete`` touches
the table's topic and its ``(table, key)`` topic, and fires any watch on a prefix of the key
(``(table, "prefix", p)``); ``Tx.touch`` touches extra topics. Only table topics and topics touched
with ``Tx.touch`` remember an index (``Store.topic_index``); per-row indexes live in the rows
(``CreateIndex``/``ModifyIndex``), which the writing module sets from ``Tx.index``.

Waking is push, never polling: a watcher registers one asyncio future on a set of topics
(``Store.watch``); a commit resolves the futures of every topic it touched in one pass.

Rows are plain dicts in Consul's JSON shapes. Rows handed out by the store are shared: treat them
as immutable and write a fresh dict with ``Tx.put``. A row must be JSON-serialisable, because the
optional journal (``persist.py``) records every put and delete.

This module does no I/O; persistence plugs in through ``Store.journal`` (a callable receiving each
committed transaction's record).
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

Row = dict[str, Any]
Topic = Hashable
IndexFn = Callable[[Row], Iterable[str]]
Trigger = Callable[["Tx", str, Row | None, Row | None], None]

# Tables every dev agent has. Rows are in the shape Consul's HTTP API returns them.
TABLES = (
    "nodes",  # key: node name; row: catalog Node {ID, Node, Address, Datacenter, TaggedAddresses, Meta, ...}
    "services",  # key: "<node>/<service id>"; row: catalog/agent service shape (owned by the services module)
    "checks",  # key: "<node>/<check id>"; row: HealthCheck {Node, CheckID, Name, Status, ServiceID, ...}
    "config_entries",  # key: "<kind>/<name>"; row: the config entry JSON
    "intentions",  # key: intention ID (legacy API view, owned by the intentions module)
    "kvs",  # key: KV key; row: DirEntry {Key, Value (base64 or None), Flags, Session, LockIndex, Create/ModifyIndex}
    "kv_tombstones",  # key: KV key; row {"Key", "Index"}: deletions, so prefix queries see their index
    "sessions",  # key: session ID; row: Session JSON
    "acl_tokens",  # key: AccessorID; row: token JSON including SecretID
    "acl_policies",  # key: policy ID; row: policy JSON
    "meta",  # internal odds and ends (e.g. ACL bootstrap state); key: name
)


class StoreError(Exception):
    """A write that the store refuses (unknown table, write outside a transaction...)."""


@dataclass
class _Table:
    rows: dict[str, Row] = field(default_factory=dict)
    # index name -> (fn, value -> set of keys)
    indexes: dict[str, tuple[IndexFn, dict[str, set[str]]]] = field(default_factory=dict)

    _sorted: list[str] | None = None  # keys in order, rebuilt lazily after the key set changes
    # (index name, value) -> that value's keys in order, dropped whenever that value's key set changes
    _sorted_index: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def set_row(self, key: str, row: Row) -> None:
        if key not in self.rows:
            self._sorted = None
        self.rows[key] = row

    def del_row(self, key: str) -> None:
        del self.rows[key]
        self._sorted = None

    def sorted_keys(self) -> list[str]:
        if self._sorted is None:
            self._sorted = sorted(self.rows)
        return self._sorted

    def index_keys(self, index: str, value: str) -> list[str]:
        """The keys of the rows found under ``value`` in ``index``, sorted (cached until they change)."""
        cached = self._sorted_index.get((index, value))
        if cached is None:
            cached = self._sorted_index[(index, value)] = sorted(self.indexes[index][1].get(value, ()))
        return cached

    def _index_add(self, key: str, row: Row) -> None:
        for name, (fn, idx) in self.indexes.items():
            for value in fn(row):
                idx.setdefault(value, set()).add(key)
                self._sorted_index.pop((name, value), None)

    def _index_remove(self, key: str, row: Row) -> None:
        for name, (fn, idx) in self.indexes.items():
            for value in fn(row):
                self._sorted_index.pop((name, value), None)
                keys = idx.get(value)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del idx[value]


class Tx:
    """One write transaction. Obtain it with ``with store.write() as tx:``.

    ``tx.index`` is the index this transaction commits at (the current index + 1). If the
    transaction changes nothing (no put, delete or touch), the global index does not move. If the
    ``with`` block raises, every change is rolled back and nothing is journaled or woken.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self.index = store.index + 1
        self._undo: list[tuple[str, str, Row | None]] = []
        self._ops: list[list[Any]] = []
        self._touched: set[Topic] = set()
        self._fired: set[Topic] = set()
        self.after_commit: list[Callable[[], None]] = []

    @property
    def changed(self) -> bool:
        return bool(self._touched or self._ops)

    def get(self, table: str, key: str) -> Row | None:
        return self._store.get(table, key)

    def put(self, table: str, key: str, row: Row) -> None:
        t = self._store._table(table)
        old = t.rows.get(key)
        self._undo.append((table, key, old))
        if old is not None:
            t._index_remove(key, old)
        t.set_row(key, row)
        t._index_add(key, row)
        self._ops.append(["p", table, key, row])
        self._changed_key(table, key)
        for trig in self._store._put_triggers.get(table, ()):
            trig(self, key, old, row)

    def delete(self, table: str, key: str) -> Row | None:
        t = self._store._table(table)
        old = t.rows.get(key)
        if old is None:
            return None
        self._undo.append((table, key, old))
        t._index_remove(key, old)
        t.del_row(key)
        self._ops.append(["d", table, key])
        self._changed_key(table, key)
        for trig in self._store._delete_triggers.get(table, ()):
            trig(self, key, old, None)
        return old

    def touch(self, *topics: Topic) -> None:
        """Record that these topics changed at ``self.index`` (their index is remembered and journaled)."""
        for topic in topics:
            self._touched.add(topic)
            self._fired.add(topic)

    def _changed_key(self, table: str, key: str) -> None:
        self._touched.add(table)
        self._fired.add(table)
        self._fired.add((table, key))
        watched = self._store._prefix_watched.get(table)
        if watched:
            for i in range(len(key) + 1):
                if key[:i] in watched:
                    self._fired.add((table, "prefix", key[:i]))

    def _rollback(self) -> None:
        for table, key, old in reversed(self._undo):
            t = self._store._table(table)
            cur = t.rows.get(key)
            if cur is not None:
                t._index_remove(key, cur)
                t.del_row(key)
            if old is not None:
                t.set_row(key, old)
                t._index_add(key, old)


class Store:
    """The state store. Single-threaded: use it from the event loop thread only."""

    def __init__(self) -> None:
        self.index = 0  # the global modify index; reads report at least 1
        self._tables: dict[str, _Table] = {name: _Table() for name in TABLES}
        self._topic_index: dict[Topic, int] = {}
        self._watchers: dict[Topic, set[asyncio.Future[None]]] = {}
        self._prefix_watched: dict[str, dict[str, int]] = {}  # table -> prefix -> watch count
        self._put_triggers: dict[str, list[Trigger]] = {}
        self._delete_triggers: dict[str, list[Trigger]] = {}
        self._in_tx = False
        self.closing = False
        self._memo: dict[Any, Any] = {}
        self._memo_index = -1
        self.journal: Callable[[dict[str, Any]], None] | None = None

    # ----- schema -----
    def define_table(self, name: str) -> None:
        """Add a table (call before the state is loaded from a data dir)."""
        self._tables.setdefault(name, _Table())

    def add_index(self, table: str, name: str, fn: IndexFn) -> None:
        """Maintain a secondary index: ``fn(row)`` yields the values the row is found under."""
        t = self._table(table)
        idx: dict[str, set[str]] = {}
        t.indexes[name] = (fn, idx)
        t._sorted_index.clear()
        for key, row in t.rows.items():
            for value in fn(row):
                idx.setdefault(value, set()).add(key)

    def on_put(self, table: str, trigger: Trigger) -> None:
        """Run ``trigger(tx, key, old, new)`` inside every transaction that puts a row in ``table``."""
        self._put_triggers.setdefault(table, []).append(trigger)

    def on_delete(self, table: str, trigger: Trigger) -> None:
        """Run ``trigger(tx, key, old, None)`` inside every transaction that deletes a row of ``table``."""
        self._delete_triggers.setdefault(table, []).append(trigger)

    def _table(self, name: str) -> _Table:
        try:
            return self._tables[name]
        except KeyError:
            raise StoreError(f"unknown table {name!r}") from None

    # ----- reads -----
    def get(self, table: str, key: str) -> Row | None:
        return self._table(table).rows.get(key)

    def rows(self, table: str) -> dict[str, Row]:
        """The live mapping key -> row (do not mutate)."""
        return self._table(table).rows

    def by_index(self, table: str, index: str, value: str) -> list[Row]:
        t = self._table(table)
        if index not in t.indexes:
            raise KeyError(index)
        rows = t.rows
        return [rows[k] for k in t.index_keys(index, value)]

    def index_values(self, table: str, index: str) -> Iterator[str]:
        return iter(self._table(table).indexes[index][1])

    def scan_prefix(self, table: str, prefix: str) -> list[tuple[str, Row]]:
        """Rows whose key starts with ``prefix``, sorted by key (a binary search, not a full scan)."""
        t = self._table(table)
        keys = t.sorted_keys()
        out = []
        for i in range(bisect.bisect_left(keys, prefix), len(keys)):
            key = keys[i]
            if not key.startswith(prefix):
                break
            out.append((key, t.rows[key]))
        return out

    def topic_index(self, *topics: Topic) -> int:
        """The highest index at which any of the topics changed (0 if none ever did)."""
        get = self._topic_index.get
        if len(topics) == 1:
            return get(topics[0], 0)
        return max([get(t, 0) for t in topics], default=0)

    @property
    def in_tx(self) -> bool:
        """A write transaction is open (its changes are not committed yet and may roll back)."""
        return self._in_tx

    def current_index(self) -> int:
        return max(self.index, 1)

    # ----- writes -----
    def write(self) -> _WriteContext:
        return _WriteContext(self)

    def _commit(self, tx: Tx) -> None:
        if not tx.changed:
            for fn in tx.after_commit:
                fn()
            return
        if self.journal is not None:  # durable before visible: a refused write raises and is rolled back
            self.journal({
                "i": tx.index,
                "ops": tx._ops,
                "t": [_topic_json(t) for t in tx._touched],
            })
        self.index = tx.index
        for topic in tx._touched:
            self._topic_index[topic] = tx.index
        self._fire(tx._fired)
        for fn in tx.after_commit:
            fn()

    # ----- watches -----
    def watch(self, topics: Iterable[Topic]) -> asyncio.Future[None]:
        """A future resolved by the next commit touching any of the topics. Call ``unwatch`` after."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.closing:
            fut.set_result(None)
            return fut
        for topic in topics:
            self._watchers.setdefault(topic, set()).add(fut)
            if isinstance(topic, tuple) and len(topic) == 3 and topic[1] == "prefix":
                counts = self._prefix_watched.setdefault(str(topic[0]), {})
                counts[str(topic[2])] = counts.get(str(topic[2]), 0) + 1
        return fut

    def unwatch(self, fut: asyncio.Future[None], topics: Iterable[Topic]) -> None:
        for topic in topics:
            waiters = self._watchers.get(topic)
            if waiters is not None:
                waiters.discard(fut)
                if not waiters:
                    del self._watchers[topic]
            if isinstance(topic, tuple) and len(topic) == 3 and topic[1] == "prefix":
                counts = self._prefix_watched.get(str(topic[0]), {})
                p = str(topic[2])
                if p in counts:
                    counts[p] -= 1
                    if counts[p] <= 0:
                        del counts[p]

    def _fire(self, topics: Iterable[Topic]) -> None:
        for topic in topics:
            waiters = self._watchers.pop(topic, None)
            if waiters:
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(None)

    def memo(self) -> dict[Any, Any]:
        """A scratch dict valid for the current index only (emptied whenever the index moves)."""
        if self._memo_index != self.index:
            self._memo = {}
            self._memo_index = self.index
        return self._memo

    def close_watches(self) -> None:
        """Shutting down: wake every watcher now and make later waits return at once."""
        self.closing = True
        waiters = self._watchers
        self._watchers = {}
        for futs in waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(None)

    def notify(self, *topics: Topic) -> None:
        """Wake the watchers of these topics without a write (for state kept outside the store)."""
        self._fire(topics)

    def watcher_count(self) -> int:
        return sum(len(w) for w in self._watchers.values())

    # ----- persistence support -----
    def dump(self) -> dict[str, Any]:
        """The whole state as one JSON-serialisable document (for snapshots)."""
        return {
            "index": self.index,
            "tables": {name: t.rows for name, t in self._tables.items()},
            "topics": [[_topic_json(t), i] for t, i in self._topic_index.items()],
        }

    def load(self, doc: dict[str, Any]) -> None:
        """Replace the state with a snapshot made by ``dump`` (no watches fire)."""
        self.index = int(doc.get("index", 0))
        for name, rows in doc.get("tables", {}).items():
            self.define_table(name)
            t = self._tables[name]
            for _fn, idx in t.indexes.values():
                idx.clear()
            t._sorted_index.clear()
            t.rows = dict(rows)
            t._sorted = None
            for key, row in t.rows.items():
                t._index_add(key, row)
        self._topic_index = {_topic_from_json(t): int(i) for t, i in doc.get("topics", [])}

    def replay(self, record: dict[str, Any]) -> None:
        """Re-apply one journal record written by ``_commit`` (no triggers, no watches)."""
        for op in record["ops"]:
            if op[0] == "p":
                _, table, key, row = op
                self.define_table(table)
                t = self._tables[table]
                old = t.rows.get(key)
                if old is not None:
                    t._index_remove(key, old)
                t.set_row(key, row)
                t._index_add(key, row)
            elif op[0] == "d":
                _, table, key = op
                dt = self._tables.get(table)
                if dt is not None and key in dt.rows:
                    dt._index_remove(key, dt.rows[key])
                    dt.del_row(key)
        idx = int(record["i"])
        for topic in record.get("t", []):
            self._topic_index[_topic_from_json(topic)] = idx
        self.index = max(self.index, idx)


class _WriteContext:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._tx: Tx | None = None

    def __enter__(self) -> Tx:
        if self._store._in_tx:
            raise StoreError("nested write transaction")
        self._store._in_tx = True
        self._tx = Tx(self._store)
        return self._tx

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self._tx is not None
        self._store._in_tx = False
        if exc_type is not None:
            self._tx._rollback()
            return
        try:
            self._store._commit(self._tx)
        except BaseException:
            # the journal refused the write: the change was not acknowledged, so undo it
            self._tx._rollback()
            raise


def _topic_json(topic: Topic) -> Any:
    if isinstance(topic, tuple):
        return [_topic_json(t) for t in topic]
    return topic


def _topic_from_json(value: Any) -> Topic:
    if isinstance(value, list):
        return tuple(_topic_from_json(v) for v in value)
    return value  # type: ignore[no-any-return]
