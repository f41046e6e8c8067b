"""The policy service against an in-memory fake of the Consul calls it makes (no sockets).

The fake implements blocking KV recurse reads, config-entry lists and `/v1/txn` with `cas`,
`delete-cas` and `check-session`, all or nothing, as Consul documents them.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from policies.compile import Compiler, Document, loads_table
from policies.evaluate import authorize
from policies.model import COMPILED_PREFIX, LEADER_KEY, TCP, CompiledTable, destination_of_key
from policies.server import PolicyService, batches, plan_ops, request_from_proto, stored_version
from policies.v1 import policy_pb2


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes | None
    modify_index: int
    session: str = ""


class TxnFailed(Exception):
    pass


class FakeConsul:
    def __init__(self) -> None:
        self.index = 1
        self.kv: dict[str, Entry] = {}
        self.config: dict[str, tuple[int, dict[str, Any]]] = {}
        self.changed = asyncio.Condition()
        self.txns: list[list[Mapping[str, Any]]] = []
        self.fail_next_txn = False

    async def _bump(self) -> None:
        self.index += 1
        async with self.changed:
            self.changed.notify_all()

    async def put(self, key: str, value: str, session: str = "") -> None:
        self.kv[key] = Entry(key, value.encode(), self.index + 1, session)
        await self._bump()

    async def delete(self, key: str) -> None:
        self.kv.pop(key, None)
        await self._bump()

    async def put_config(self, entry: dict[str, Any]) -> None:
        self.config[entry["Name"]] = (self.index + 1, entry)
        await self._bump()

    def _prefix_index(self, prefix: str) -> int:
        return max([e.modify_index for k, e in self.kv.items() if k.startswith(prefix)], default=1)

    async def _block(self, index: int, wait: float | None, current: Any) -> None:
        if index and current() <= index:
            async with self.changed:
                try:
                    await asyncio.wait_for(self.changed.wait_for(lambda: current() > index), timeout=wait or 1)
                except TimeoutError:
                    pass

    async def kv_get_recurse(self, prefix: str, *, index: int = 0, wait: float | None = None,
                             token: str | None = None) -> tuple[int, Sequence[Entry]]:
        await self._block(index, wait, lambda: self.index)
        return self.index, tuple(sorted((e for k, e in self.kv.items() if k.startswith(prefix)),
                                        key=lambda e: e.key))

    async def config_list(self, kind: str, *, index: int = 0, wait: float | None = None,
                          token: str | None = None) -> tuple[int, Sequence[dict[str, Any]]]:
        await self._block(index, wait, lambda: self.index)
        return self.index, tuple(e for _, e in self.config.values())

    async def txn(self, ops: Sequence[Mapping[str, Any]], *, token: str | None = None) -> Sequence[Any]:
        self.txns.append(list(ops))
        if self.fail_next_txn:
            self.fail_next_txn = False
            raise TxnFailed("injected")
        for op in ops:  # check everything first: all or nothing
            kv = op["KV"]
            cur = self.kv.get(kv["Key"])
            if kv["Verb"] == "check-session" and (cur is None or cur.session != kv["Session"]):
                raise TxnFailed(f"lock not held by {kv['Session']}")
            if kv["Verb"] in ("cas", "delete-cas"):
                have = cur.modify_index if cur is not None else 0
                if have != kv["Index"]:
                    raise TxnFailed(f"cas {kv['Key']}: index {kv['Index']} != {have}")
        self.index += 1
        results = []
        for op in ops:
            kv = op["KV"]
            if kv["Verb"] == "cas":
                self.kv[kv["Key"]] = Entry(kv["Key"], None, self.index)  # Consul answers without the value
                results.append(self.kv[kv["Key"]])
                self.kv[kv["Key"]] = Entry(kv["Key"], base64.b64decode(kv["Value"]), self.index)
            elif kv["Verb"] == "delete-cas":
                del self.kv[kv["Key"]]
        async with self.changed:
            self.changed.notify_all()
        return results


class FakeLock:
    """A lock whose ownership the test controls through the fake's leader key."""

    def __init__(self, consul: FakeConsul, session: str) -> None:
        self.consul = consul
        self.session_id = session
        self.lost = asyncio.Event()
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    def start(self) -> None:
        pass

    async def acquired(self) -> None:
        while True:
            cur = self.consul.kv.get(LEADER_KEY)
            if cur is None or not cur.session:
                await self.consul.put(LEADER_KEY, "x", session=self.session_id)
                self._held = True
                return
            await asyncio.sleep(0.01)

    def lose(self) -> None:
        self._held = False
        self.lost.set()

    async def stop(self) -> None:
        if self._held:
            await self.consul.put(LEADER_KEY, "", session="")
        self._held = False
        self.lost.set()


def doc(name: str, *sources: tuple[str, str]) -> str:
    return json.dumps({"Kind": "service-intentions", "Name": name,
                       "Sources": [{"Name": s, "Action": a} for s, a in sources]})


async def wait_until(pred: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


def compiled(consul: FakeConsul) -> dict[str, CompiledTable]:
    return {destination_of_key(k) or "": loads_table(e.value or b"")
            for k, e in consul.kv.items() if k.startswith(COMPILED_PREFIX)}


@pytest.fixture
async def running() -> Any:
    consul = FakeConsul()
    locks: list[FakeLock] = []

    def factory() -> FakeLock:
        lock = FakeLock(consul, f"session-{len(locks)}")
        locks.append(lock)
        return lock

    service = PolicyService(consul, default_policy="deny", lock_factory=factory, wait=1.0)  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    yield consul, service, locks
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_publishes_tables_and_only_real_changes(running: Any) -> None:
    consul, _, _ = running
    await consul.put("weft/intentions/db", doc("db", ("web", "allow")))
    await wait_until(lambda: "db" in compiled(consul) and "*" in compiled(consul))
    t = compiled(consul)["db"]
    assert authorize(t, "web", TCP).allowed and not authorize(t, "api", TCP).allowed
    writes = len(consul.txns)
    # an unrelated change (a new native entry for another destination) does not rewrite db's table
    await consul.put_config({"Kind": "service-intentions", "Name": "cache", "Sources": [{"Name": "web",
                                                                                        "Action": "allow"}]})
    await wait_until(lambda: "cache" in compiled(consul))
    assert compiled(consul)["db"].version == t.version
    assert all(op["KV"]["Key"] != "weft/policy/compiled/db" for txn in consul.txns[writes:] for op in txn)
    # every txn is guarded by the leader's session
    assert all(txn[0]["KV"]["Verb"] == "check-session" for txn in consul.txns)


async def test_deletes_tables_of_destinations_without_intentions(running: Any) -> None:
    consul, _, _ = running
    await consul.put("weft/intentions/db", doc("db", ("web", "allow")))
    await wait_until(lambda: "db" in compiled(consul))
    await consul.delete("weft/intentions/db")
    await wait_until(lambda: "db" not in compiled(consul))
    assert set(compiled(consul)) == {"*"}


async def test_bad_document_keeps_last_good_table(running: Any) -> None:
    consul, service, _ = running
    await consul.put("weft/intentions/db", doc("db", ("web", "allow")))
    await wait_until(lambda: "db" in compiled(consul))
    good = compiled(consul)["db"]
    await consul.put("weft/intentions/db", '{"Kind": "service-intentions", "Name": "db", "Sources": "web"}')
    await wait_until(lambda: service.result is not None and service.result.errors)
    await asyncio.sleep(0.1)
    assert compiled(consul)["db"] == good
    assert "Sources" in str(service.result.errors[0])


async def test_frozen_destination_table_left_untouched_on_restart() -> None:
    consul = FakeConsul()
    # a table published by an earlier leader, and a document that is now broken
    old = Compiler("deny").compile([Document.kv("weft/intentions/db", doc("db", ("web", "allow")))]).tables
    await consul.put(COMPILED_PREFIX + "db", old["db"].dumps())
    await consul.put("weft/intentions/db", "{broken")
    lock = FakeLock(consul, "s1")
    service = PolicyService(consul, lock_factory=lambda: lock, wait=1.0)  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    await wait_until(lambda: "*" in compiled(consul))
    assert compiled(consul)["db"] == old["db"]
    decision, table = service.check("web", "db", TCP)
    assert decision.allowed and table == old["db"]
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_lost_leadership_stops_writes_and_new_term_reconciles(running: Any) -> None:
    consul, _, locks = running
    await consul.put("weft/intentions/db", doc("db", ("web", "allow")))
    await wait_until(lambda: "db" in compiled(consul))
    # someone else takes the lock: our session no longer holds it
    await consul.put(LEADER_KEY, "other", session="other-session")
    locks[0].lose()
    await consul.put("weft/intentions/db", doc("db", ("web", "deny")))
    await asyncio.sleep(0.2)
    assert authorize(compiled(consul)["db"], "web", TCP).allowed  # not written by the ex-leader
    # the other holder goes away: a new term starts and publishes the current state
    await consul.put(LEADER_KEY, "", session="")
    await wait_until(lambda: len(locks) >= 2 and locks[1].held)
    await wait_until(lambda: not authorize(compiled(consul)["db"], "web", TCP).allowed)


async def test_failed_txn_is_retried(running: Any) -> None:
    consul, _, _ = running
    consul.fail_next_txn = True
    await consul.put("weft/intentions/db", doc("db", ("web", "allow")))
    await wait_until(lambda: "db" in compiled(consul))


def test_plan_ops_writes_changed_deletes_orphans_and_respects_frozen() -> None:
    result = Compiler("deny").compile([Document.kv("weft/intentions/db", doc("db", ("web", "allow"))),
                                       Document.kv("weft/intentions/bad", "{")])
    current = {COMPILED_PREFIX + "_wildcard": (5, result.tables["*"].version),  # unchanged
               COMPILED_PREFIX + "db": (6, "stale"),
               COMPILED_PREFIX + "gone": (7, "x"),  # no intentions any more
               COMPILED_PREFIX + "bad": (8, "y")}  # frozen: left alone
    ops, unchanged = plan_ops(result, current)
    assert unchanged == 1
    assert [(o["KV"]["Verb"], o["KV"]["Key"], o["KV"]["Index"]) for o in ops] == [
        ("cas", COMPILED_PREFIX + "db", 6), ("delete-cas", COMPILED_PREFIX + "gone", 7)]
    assert loads_table(base64.b64decode(ops[0]["KV"]["Value"])) == result.tables["db"]


def test_stored_version_detects_tampering() -> None:
    t = Compiler("deny").compile([Document.kv("weft/intentions/db", doc("db", ("web", "allow")))]).tables["db"]
    assert stored_version(t.dumps().encode()) == t.version
    tampered = t.to_json()
    tampered["DefaultPolicy"] = "allow"
    assert stored_version(json.dumps(tampered).encode()) == ""
    assert stored_version(b"{not json") == "" and stored_version(None) == ""


async def test_external_change_to_a_table_is_repaired_after_a_failed_txn(running: Any) -> None:
    consul, _, _ = running
    await consul.put("weft/intentions/db", doc("db", ("web", "allow")))
    await wait_until(lambda: "db" in compiled(consul))
    good = compiled(consul)["db"]
    # someone overwrites the table behind the leader's back; the next publish's cas fails, the
    # leader re-reads KV and writes the right table again
    bad = CompiledTable(destination="db", default_policy="allow", rules=()).with_version()
    await consul.put(COMPILED_PREFIX + "db", bad.dumps())
    await consul.put("weft/intentions/db", doc("db", ("web", "allow"), ("api", "deny")))
    await wait_until(lambda: len(compiled(consul)["db"].rules) == 2)
    assert compiled(consul)["db"].default_policy == "deny" and compiled(consul)["db"] != good


def test_request_from_proto() -> None:
    assert request_from_proto(policy_pb2.CheckRequest(source="a", destination="b")) is TCP
    g = request_from_proto(policy_pb2.CheckRequest(grpc=policy_pb2.GrpcRequest(
        method="/p.S/M", metadata=[policy_pb2.Header(name="X-A", value="1")])))
    assert g.method == "/p.S/M" and g.metadata == {"x-a": "1"}  # type: ignore[union-attr]
    h = request_from_proto(policy_pb2.CheckRequest(http=policy_pb2.HttpRequest(method="get", path="/x")))
    assert h.method == "GET" and h.path == "/x"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match=r"grpc\.method"):
        request_from_proto(policy_pb2.CheckRequest(grpc=policy_pb2.GrpcRequest(method="Svc.Method")))
    with pytest.raises(ValueError, match=r"http\.path"):
        request_from_proto(policy_pb2.CheckRequest(http=policy_pb2.HttpRequest(method="GET", path="x")))


async def test_large_publish_is_split_into_guarded_transactions(running: Any) -> None:
    consul, _, _ = running
    for i in range(150):
        consul.kv[f"weft/intentions/d{i}"] = Entry(f"weft/intentions/d{i}", doc(f"d{i}", ("web", "allow")).encode(),
                                                   consul.index + 1)
    await consul._bump()
    await wait_until(lambda: len(compiled(consul)) == 151)
    big = [t for t in consul.txns if len(t) > 10]
    assert big and all(len(t) <= 64 and t[0]["KV"]["Verb"] == "check-session" for t in consul.txns)
    assert sum(len(t) - 1 for t in consul.txns) >= 151


def test_batches_respect_operation_count_and_request_size() -> None:
    small = [{"KV": {"Verb": "cas", "Key": f"k{i}", "Value": "AAAA", "Index": 0}} for i in range(130)]
    assert [len(b) for b in batches(small)] == [63, 63, 4]
    big_value = "A" * (200 * 1024 * 4 // 3)  # 200 KiB once decoded
    big = [{"KV": {"Verb": "cas", "Key": f"b{i}", "Value": big_value, "Index": 0}} for i in range(3)]
    assert [len(b) for b in batches(big)] == [1, 1, 1]
    deletes = [{"KV": {"Verb": "delete-cas", "Key": f"d{i}", "Index": 1}} for i in range(10)]
    assert [len(b) for b in batches(big[:1] + deletes)] == [11]


def test_a_table_too_large_to_publish_is_skipped_and_reported() -> None:
    sources = tuple((f"svc-{i}-{'x' * 40}", "allow") for i in range(5000))
    result = Compiler("deny").compile([Document.kv("weft/intentions/huge", doc("huge", *sources)),
                                       Document.kv("weft/intentions/db", doc("db", ("web", "allow")))])
    assert len(result.tables["huge"].dumps()) > 384 * 1024
    # nothing in KV yet for it: a fail-closed placeholder (never the wildcard table, which may allow more)
    ops, _ = plan_ops(result, {})
    assert [o["KV"]["Key"] for o in ops] == [COMPILED_PREFIX + "_wildcard", COMPILED_PREFIX + "db",
                                             COMPILED_PREFIX + "huge"]
    placeholder = loads_table(base64.b64decode(ops[2]["KV"]["Value"]))
    assert placeholder.default_policy == "deny" and not placeholder.rules and "exceeds" in placeholder.warnings[0]
    assert not authorize(placeholder, "svc-1", TCP).allowed
    # a table already in KV stays in force
    ops, _ = plan_ops(result, {COMPILED_PREFIX + "huge": (3, "old")})
    assert COMPILED_PREFIX + "huge" not in [o["KV"]["Key"] for o in ops]
