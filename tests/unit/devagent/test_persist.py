"""The -data-dir journal: replay, torn tails, compaction (files only, no sockets)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from catalog.devagent import kv, persist
from catalog.devagent.agent import Agent, AgentConfig


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
