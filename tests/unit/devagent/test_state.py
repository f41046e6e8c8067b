"""The state store: global index, topic indexes, watches, rollback, journal replay."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from devagent import kv
from devagent.state import Store


def test_global_index_moves_only_on_change() -> None:
    s = Store()
    assert s.current_index() == 1
    with s.write() as tx:
        tx.put("kvs", "a", kv.entry("a", None, 0, tx.index, tx.index))
    assert s.index == 1
    with s.write():
        pass
    assert s.index == 1
    with s.write() as tx:
        tx.put("kvs", "b", kv.entry("b", None, 0, tx.index, tx.index))
    assert s.index == 2
    assert s.topic_index("kvs") == 2
    assert s.topic_index("nodes") == 0


def test_rollback_on_exception() -> None:
    s = Store()
    with s.write() as tx:
        tx.put("kvs", "a", kv.entry("a", "MQ==", 0, tx.index, tx.index))
    with pytest.raises(RuntimeError), s.write() as tx:
        tx.put("kvs", "a", kv.entry("a", "Mg==", 0, 1, tx.index))
        tx.put("kvs", "b", kv.entry("b", None, 0, tx.index, tx.index))
        raise RuntimeError("boom")
    assert s.get("kvs", "a")["Value"] == "MQ=="  # type: ignore[index]
    assert s.get("kvs", "b") is None
    assert s.index == 1


def test_watch_fires_for_key_table_and_prefix_only() -> None:
    async def main() -> None:
        s = Store()
        key_w = s.watch([("kvs", "a/b")])
        other_w = s.watch([("kvs", "zzz")])
        prefix_w = s.watch([("kvs", "prefix", "a/")])
        miss_prefix = s.watch([("kvs", "prefix", "b/")])
        table_w = s.watch(["kvs"])
        with s.write() as tx:
            tx.put("kvs", "a/b", kv.entry("a/b", None, 0, tx.index, tx.index))
        assert key_w.done() and prefix_w.done() and table_w.done()
        assert not other_w.done() and not miss_prefix.done()
        s.unwatch(other_w, [("kvs", "zzz")])
        s.unwatch(miss_prefix, [("kvs", "prefix", "b/")])
        assert s.watcher_count() == 0

    asyncio.run(main())


def test_thousand_watchers_woken_by_one_write() -> None:
    async def main() -> None:
        s = Store()
        futs = [s.watch([("kvs", "k")]) for _ in range(1000)]
        with s.write() as tx:
            tx.put("kvs", "k", kv.entry("k", None, 0, tx.index, tx.index))
        assert all(f.done() for f in futs)

    asyncio.run(main())


def test_journal_replay_and_snapshot_round_trip() -> None:
    records: list[dict[str, Any]] = []
    s = Store()
    s.journal = records.append
    s.add_index("kvs", "session", lambda r: [r["Session"]] if r.get("Session") else [])
    with s.write() as tx:
        tx.put("kvs", "a", kv.entry("a", None, 0, tx.index, tx.index, 1, "sess"))
        tx.touch(("service", "web"))
    with s.write() as tx:
        kv.kv_delete(tx, "a")
        tx.put("kvs", "b", kv.entry("b", None, 0, tx.index, tx.index))
    t = Store()
    t.add_index("kvs", "session", lambda r: [r["Session"]] if r.get("Session") else [])
    for rec in records:
        t.replay(rec)
    assert t.dump() == s.dump()
    assert t.topic_index(("service", "web")) == 1
    assert t.by_index("kvs", "session", "sess") == []
    u = Store()
    u.load(s.dump())
    assert u.dump() == s.dump()


def test_failed_journal_write_is_not_visible() -> None:
    s = Store()

    def refuse(_: dict[str, Any]) -> None:
        raise OSError("disk full")

    s.journal = refuse
    with pytest.raises(OSError), s.write() as tx:
        tx.put("kvs", "a", kv.entry("a", None, 0, tx.index, tx.index))
    assert s.get("kvs", "a") is None and s.index == 0


def test_scan_prefix_follows_inserts_deletes_and_rollback() -> None:
    s = Store()
    with s.write() as tx:
        for k in ("b/2", "a/1", "b/1", "c", "b/10"):
            tx.put("kvs", k, kv.entry(k, None, 0, tx.index, tx.index))
    assert [k for k, _ in s.scan_prefix("kvs", "b/")] == ["b/1", "b/10", "b/2"]
    with s.write() as tx:
        tx.delete("kvs", "b/10")
        tx.put("kvs", "b/0", kv.entry("b/0", None, 0, tx.index, tx.index))
    assert [k for k, _ in s.scan_prefix("kvs", "b/")] == ["b/0", "b/1", "b/2"]
    with pytest.raises(RuntimeError), s.write() as tx:
        tx.put("kvs", "b/5", kv.entry("b/5", None, 0, tx.index, tx.index))
        raise RuntimeError("abort")
    assert [k for k, _ in s.scan_prefix("kvs", "")] == ["a/1", "b/0", "b/1", "b/2", "c"]


@pytest.mark.parametrize(("key", "ok"), [
    ("weft/ca/roots", True), ("con..fig", True), ("weft/intentions/*", True), ("a b", True), ("foo:bar", True),
    ("a/../b", False), ("..", False), ("a/..", False), ("..%2fetc", False), ("a%2E%2E%2Fb", False),
    (" lead", False), ("trail ", False),
])
def test_kv_key_validation(key: str, ok: bool) -> None:
    assert (kv.key_problem(key) is None) is ok


def test_timed_out_and_woken_waits_leave_no_watchers_behind() -> None:
    from devagent.http import wait_for_change

    async def main() -> None:
        s = Store()
        await asyncio.gather(*(wait_for_change(s, [("kvs", "k"), ("kvs", "prefix", "")], 0.05) for _ in range(100)))
        assert s.watcher_count() == 0 and not s._prefix_watched.get("kvs")
        waits = [asyncio.ensure_future(wait_for_change(s, [("kvs", "k"), "nodes"], 30)) for _ in range(100)]
        await asyncio.sleep(0)
        with s.write() as tx:
            tx.put("kvs", "k", kv.entry("k", None, 0, tx.index, tx.index))
        await asyncio.wait_for(asyncio.gather(*waits), 5)
        assert s.watcher_count() == 0

    asyncio.run(main())


def test_by_index_order_follows_puts_deletes_and_rollbacks() -> None:
    s = Store()
    s.add_index("kvs", "flags", lambda row: [str(row["Flags"])])
    with s.write() as tx:
        for key in ("c", "a", "b"):
            tx.put("kvs", key, kv.entry(key, None, 1, tx.index, tx.index))
    assert [r["Key"] for r in s.by_index("kvs", "flags", "1")] == ["a", "b", "c"]
    with s.write() as tx:
        tx.put("kvs", "b", kv.entry("b", None, 2, tx.index, tx.index))
        tx.delete("kvs", "a")
        tx.put("kvs", "0", kv.entry("0", None, 1, tx.index, tx.index))
    assert [r["Key"] for r in s.by_index("kvs", "flags", "1")] == ["0", "c"]
    assert [r["Key"] for r in s.by_index("kvs", "flags", "2")] == ["b"]
    with pytest.raises(RuntimeError), s.write() as tx:
        tx.delete("kvs", "c")
        assert [r["Key"] for r in s.by_index("kvs", "flags", "1")] == ["0"]
        raise RuntimeError("abort")
    assert [r["Key"] for r in s.by_index("kvs", "flags", "1")] == ["0", "c"]
    s.load(s.dump())
    assert [r["Key"] for r in s.by_index("kvs", "flags", "1")] == ["0", "c"]
