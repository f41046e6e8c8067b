"""SourceWatcher: Consul's blocking-query rules and fail-static, with scripted answers (no sockets)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from policies.sources import SourceWatcher


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes | None
    modify_index: int = 1
    session: str = ""


class Scripted:
    """Answers kv_get_recurse from a script of (index, entries | Exception); records the indexes asked."""

    def __init__(self, kv_script: list[Any], native_script: list[Any] | None = None) -> None:
        self.kv_script = kv_script
        self.native_script = native_script or [(1, ())]
        self.kv_asked: list[int] = []
        self.native_asked: list[int] = []

    async def _next(self, script: list[Any], asked: list[int], index: int) -> Any:
        asked.append(index)
        if len(script) > 1:
            item = script.pop(0)
        else:
            await asyncio.sleep(0.05)  # the last answer repeats, like a blocking query timing out
            item = script[0]
        if isinstance(item, Exception):
            raise item
        return item

    async def kv_get_recurse(self, prefix: str, *, index: int = 0, wait: float | None = None,
                             token: str | None = None) -> tuple[int, Sequence[Entry]]:
        assert prefix == "weft/intentions/"
        result: tuple[int, Sequence[Entry]] = await self._next(self.kv_script, self.kv_asked, index)
        return result

    async def config_list(self, kind: str, *, index: int = 0, wait: float | None = None,
                          token: str | None = None) -> tuple[int, Sequence[dict[str, Any]]]:
        assert kind == "service-intentions"
        result: tuple[int, Sequence[dict[str, Any]]] = await self._next(self.native_script, self.native_asked, index)
        return result


async def run_for(watcher: SourceWatcher, seconds: float) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_blocking_indexes_reset_and_fail_static() -> None:
    doc = Entry("weft/intentions/db", b"{}")
    api = Scripted([
        (10, (doc,)),
        (12, (doc, Entry("weft/intentions/", None))),  # the folder key is ignored
        (5, (doc,)),  # index went backwards (e.g. a restored snapshot): one non-blocking read
        (6, (doc,)),
        ConnectionError("consul down"),  # after a failure too
        (7, (doc, Entry("weft/intentions/cache", b"{}"))),
    ])
    watcher = SourceWatcher(api, wait=1, min_interval=0, max_backoff=0.05)
    await run_for(watcher, 0.6)
    assert api.kv_asked[:7] == [0, 10, 12, 0, 6, 0, 7]
    assert watcher.errors == 1
    snap = watcher.snapshot()
    assert snap.ready and set(snap.kv) == {"weft/intentions/db", "weft/intentions/cache"}
    assert [d.ref for d in snap.documents()] == ["weft/intentions/cache", "weft/intentions/db"]


async def test_last_good_state_is_kept_while_consul_is_down() -> None:
    doc = Entry("weft/intentions/db", b'{"x": 1}')
    api = Scripted([(3, (doc,)), ConnectionError("down")])
    watcher = SourceWatcher(api, wait=1, min_interval=0, max_backoff=0.02)
    await run_for(watcher, 0.3)
    assert watcher.errors >= 2
    assert watcher.snapshot().kv == {"weft/intentions/db": b'{"x": 1}'}


async def test_changed_fires_on_content_change_only() -> None:
    doc = Entry("weft/intentions/db", b"{}")
    api = Scripted([(3, (doc,)), (4, (doc,))], native_script=[(7, ({"Kind": "service-intentions", "Name": "x"},))])
    watcher = SourceWatcher(api, wait=1, min_interval=0)
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    await asyncio.sleep(0.2)
    assert watcher.changed.is_set()
    watcher.changed.clear()
    await asyncio.sleep(0.2)  # same content at a new index: no change
    assert not watcher.changed.is_set()
    stop.set()
    await asyncio.wait_for(task, 5)
    assert [d.ref for d in watcher.snapshot().documents()] == ["weft/intentions/db", "service-intentions/x"]


async def test_a_source_that_is_not_watched_counts_as_ready_and_empty() -> None:
    api = Scripted([(3, ())], native_script=[RuntimeError("must not be called")])
    watcher = SourceWatcher(api, kv=True, native=False, wait=1, min_interval=0)
    await run_for(watcher, 0.1)
    assert watcher.snapshot().ready and api.native_asked == []
    with pytest.raises(ValueError):
        SourceWatcher(api, kv=False, native=False)


class NotFound(Exception):
    status = 404


async def test_an_agent_without_config_entries_has_no_native_intentions() -> None:
    api = Scripted([(3, (Entry("weft/intentions/db", b"{}"),))], native_script=[NotFound("404")])
    watcher = SourceWatcher(api, wait=1, min_interval=0)
    watcher._native_missing_retry = 0.01
    await run_for(watcher, 0.2)
    snap = watcher.snapshot()
    assert snap.ready and snap.native == () and watcher.errors == 0 and len(api.native_asked) > 1
    # any other failure of the native source keeps it not ready: nothing is published half-informed
    api = Scripted([(3, ())], native_script=[PermissionError("403")])
    watcher = SourceWatcher(api, wait=1, min_interval=0, max_backoff=0.01)
    await run_for(watcher, 0.1)
    assert not watcher.snapshot().ready and watcher.errors >= 1
