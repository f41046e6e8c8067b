"""``-data-dir``: the dev agent's state survives restarts, and an acknowledged write survives a crash.

Layout of the data dir:
- ``node-id``: this agent's node ID (kept across restarts, as Consul keeps it).
- ``state.json``: a snapshot of the whole store (written to a temp file, fsynced, renamed).
- ``journal.jsonl``: one JSON line per committed transaction after the snapshot, written to the
  file before the transaction becomes visible. No answer leaves the agent before the journal is
  fsynced up to that point (``Agent.durable``, awaited by the HTTP dispatcher): one fsync in a
  worker thread serves every request waiting at that moment (group commit), and the event loop
  never blocks on the disk.

On start-up the snapshot is loaded and the journal replayed; a torn last line (a crash in the
middle of an append, never acknowledged) is dropped. The journal is compacted into a new snapshot
periodically, when it grows, and at shutdown.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import IO, Any

import structlog

from devagent.agent import Agent

log = structlog.get_logger("weft.devagent")

COMPACT_BYTES = 16 * 1024 * 1024
COMPACT_INTERVAL = 60.0


class Journal:
    def __init__(self, agent: Agent, data_dir: Path) -> None:
        self.agent = agent
        self.dir = data_dir
        self.snapshot_path = data_dir / "state.json"
        self.journal_path = data_dir / "journal.jsonl"
        self._fh: IO[bytes] | None = None
        self.size = 0
        self.dirty = False
        self.written = 0  # records appended since start
        self.synced = 0  # records known to be on disk
        self._inflight: asyncio.Future[None] | None = None
        self.compact_due = False

    def load(self) -> None:
        store = self.agent.store
        if self.snapshot_path.exists():
            store.load(json.loads(self.snapshot_path.read_text()))
        base = store.index
        if self.journal_path.exists():
            data = self.journal_path.read_bytes()
            good = 0
            for line in data.split(b"\n"):
                if not line.endswith(b"}"):
                    break  # torn tail: the write was never acknowledged
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break
                if int(record["i"]) > base:
                    store.replay(record)
                good += len(line) + 1
            if good < len(data):
                log.warning("dropping torn journal tail", bytes=len(data) - good)
                with open(self.journal_path, "r+b") as fh:
                    fh.truncate(good)
                    fh.flush()
                    os.fsync(fh.fileno())
            elif data and not data.endswith(b"\n"):  # a whole record whose newline never made it
                with open(self.journal_path, "ab") as fh:
                    fh.write(b"\n")
                    fh.flush()
                    os.fsync(fh.fileno())
        self._fh = open(self.journal_path, "ab")
        self.size = self._fh.tell()
        self.dirty = self.size > 0

    def append(self, record: dict[str, Any]) -> None:
        """Hand one record to the OS (it survives a crash of this process); ``sync`` makes it durable."""
        assert self._fh is not None
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        self._fh.write(line)
        self._fh.flush()
        self.written += 1
        self.size += len(line)
        self.dirty = True
        if self.size > COMPACT_BYTES:
            self.compact_due = True

    async def sync(self) -> None:
        """Return once every record appended so far is fsynced; concurrent callers share one fsync."""
        target = self.written
        while self.synced < target:
            if self._inflight is None:
                self._inflight = asyncio.ensure_future(self._fsync())
            await asyncio.shield(self._inflight)

    async def _fsync(self) -> None:
        target = self.written
        try:
            assert self._fh is not None
            await asyncio.to_thread(os.fsync, self._fh.fileno())
            self.synced = max(self.synced, target)
        finally:
            self._inflight = None

    async def compact_async(self) -> None:
        """Compact once no fsync is in flight (compaction replaces the journal file)."""
        while self._inflight is not None:
            await asyncio.shield(self._inflight)
        if self._fh is not None:  # not closed meanwhile
            self.compact()

    def compact(self) -> None:
        """Write a snapshot (temp file, fsync, rename, fsync dir), then start an empty journal.
        Not while an fsync is in flight: use ``compact_async`` from the event loop."""
        assert self._inflight is None
        tmp = self.dir / "state.json.tmp"
        with open(tmp, "wb") as fh:
            fh.write(json.dumps(self.agent.store.dump(), separators=(",", ":")).encode())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.snapshot_path)
        _fsync_dir(self.dir)
        if self._fh is not None:
            self._fh.close()
        self._fh = open(self.journal_path, "wb")
        os.fsync(self._fh.fileno())
        self.size = 0
        self.dirty = False
        self.compact_due = False
        self.synced = self.written

    async def aclose(self) -> None:
        if self._fh is not None:
            if self.dirty:
                await self.compact_async()
            assert self._fh is not None
            self._fh.close()
            self._fh = None

    def close(self) -> None:
        """Synchronous close (no event loop): compact if needed."""
        if self._fh is not None:
            if self.dirty and self._inflight is None:
                self.compact()
            assert self._fh is not None
            self._fh.close()
            self._fh = None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def node_id(data_dir: Path, fresh: str) -> str:
    path = data_dir / "node-id"
    if path.exists():
        value = path.read_text().strip()
        if value:
            return value
    tmp = data_dir / "node-id.tmp"
    tmp.write_text(fresh)
    os.replace(tmp, path)
    return fresh


def attach(agent: Agent, data_dir: str) -> Journal:
    """Load the state in ``data_dir`` into the agent's store and journal every later write there."""
    path = Path(data_dir)
    path.mkdir(parents=True, exist_ok=True)
    agent.node_id = node_id(path, agent.node_id)
    journal = Journal(agent, path)
    journal.load()
    agent.store.journal = journal.append
    agent.durable = journal.sync

    async def periodic() -> None:
        last = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(1.0)
            now = asyncio.get_running_loop().time()
            if journal.compact_due or (journal.dirty and now - last >= COMPACT_INTERVAL):
                await journal.compact_async()
                last = now

    async def close() -> None:
        await journal.aclose()
        agent.store.journal = None
        agent.durable = None

    agent.spawn(periodic(), name="devagent-compact")
    agent.on_stop(close)
    log.info("state loaded", data_dir=str(path), index=agent.store.index)
    return journal
