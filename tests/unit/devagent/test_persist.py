"""The -data-dir journal: replay, torn tails, compaction (files only, no sockets)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from devagent import kv, persist
from devagent.agent import Agent, AgentConfig


def _attach(path: Path) -> tuple[Agent, persist.Journal]:
    async def main() -> tuple[Agent, persist.Journal]:
        agent = Agent(AgentConfig(node_name="n1"))
        journal = persist.attach(agent, str(path))
        for task in list(agent._tasks):  # the periodic compaction is not under test here
            task.cancel()
        return agent, journal

    return asyncio.run(main())


def _put(agent: Agent, key: str, value: str) -> None:
    with agent.store.write() as tx:
        kv.kv_set(tx, key, value, 0)


def test_journal_replays_and_drops_torn_tail(tmp_path: Path) -> None:
    agent, journal = _attach(tmp_path)
    node_id = agent.node_id
    _put(agent, "a", "MQ==")
    _put(agent, "b", "Mg==")
    index = agent.store.index
    journal._fh.close()  # type: ignore[union-attr]  # a crash: no compaction
    with open(tmp_path / "journal.jsonl", "ab") as fh:
        fh.write(b'{"i": 99, "ops": [["p", "kvs", "c"')
    again, _ = _attach(tmp_path)
    assert again.node_id == node_id
    assert again.store.get("kvs", "b")["Value"] == "Mg=="  # type: ignore[index]
    assert again.store.get("kvs", "c") is None
    assert again.store.index == index
    assert (tmp_path / "journal.jsonl").read_bytes().endswith(b"}\n")


def test_compaction_writes_snapshot_and_empties_journal(tmp_path: Path) -> None:
    agent, journal = _attach(tmp_path)
    _put(agent, "a", "MQ==")
    journal.compact()
    assert (tmp_path / "journal.jsonl").read_bytes() == b""
    snap = json.loads((tmp_path / "state.json").read_text())
    assert snap["tables"]["kvs"]["a"]["Value"] == "MQ=="
    _put(agent, "b", "Mg==")  # lands in the new journal, after the snapshot
    journal.close()
    again, _ = _attach(tmp_path)
    assert set(again.store.rows("kvs")) == {"a", "b"}
    assert not (tmp_path / "state.json.tmp").exists()


def test_record_without_its_newline_is_kept_and_the_journal_stays_appendable(tmp_path: Path) -> None:
    agent, journal = _attach(tmp_path)
    _put(agent, "a", "MQ==")
    journal._fh.close()  # type: ignore[union-attr]
    path = tmp_path / "journal.jsonl"
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    again, journal2 = _attach(tmp_path)
    assert again.store.get("kvs", "a") is not None
    _put(again, "b", "Mg==")
    journal2._fh.close()  # type: ignore[union-attr]
    third, _ = _attach(tmp_path)
    assert set(third.store.rows("kvs")) == {"a", "b"}


def test_concurrent_syncs_share_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    async def main() -> None:
        agent = Agent(AgentConfig(node_name="n1"))
        journal = persist.attach(agent, str(tmp_path))
        for task in list(agent._tasks):
            task.cancel()
        monkeypatch.setattr(os, "fsync", counting)
        for i in range(5):
            _put(agent, f"k{i}", "MQ==")
        assert journal.synced < journal.written
        assert agent.durable is not None
        await asyncio.gather(*(agent.durable() for _ in range(20)))
        assert journal.synced == journal.written
        assert 1 <= len(calls) <= 2  # one fsync for all twenty waiters (two if they straddle one)
        await agent.durable()  # nothing new: no fsync
        assert len(calls) <= 2
        await journal.aclose()

    asyncio.run(main())
