"""Watches of the two intention sources, with blocking queries (I/O through a Protocol).

``policies`` must not import ``catalog``: what the policy service needs from Consul is described by
the small Protocols below, which ``catalog.client.ConsulClient`` satisfies as it is (the entry point
``weft.cmd_policy`` passes one in). Tests can pass any object of the same shape.

:class:`SourceWatcher` keeps the latest state of both sources:

* KV documents under ``weft/intentions/`` (``GET /v1/kv/weft/intentions/?recurse`` blocking on the
  prefix's index), and
* native intentions: config entries of kind ``service-intentions`` (``GET /v1/config/service-intentions``
  blocking on its index) - which is also where Consul 1.9+ stores what
  ``PUT /v1/connect/intentions/exact`` (the UI) writes.

Each watch follows Consul's blocking-query rules: it sends the last ``X-Consul-Index`` with a
``wait``, resets to 0 when the index goes backwards, never busy-loops (a minimum interval between
queries), and keeps serving its last good answer while Consul is unreachable (fail static), retrying
with capped exponential back-off. ``changed`` is set whenever either source's content changes.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from policies.compile import Document
from policies.model import INTENTIONS_PREFIX, KIND

log = structlog.get_logger("policies.sources")


class KVEntryLike(Protocol):
    """The fields of a KV entry the policy service reads (``catalog.models.KVEntry`` has them)."""

    @property
    def key(self) -> str: ...

    @property
    def value(self) -> bytes | None: ...

    @property
    def modify_index(self) -> int: ...

    @property
    def session(self) -> str: ...


class SourcesAPI(Protocol):
    """Blocking reads of both intention sources."""

    async def kv_get_recurse(self, prefix: str, *, index: int = 0, wait: float | None = None,
                             token: str | None = None) -> tuple[int, Sequence[KVEntryLike]]: ...

    async def config_list(self, kind: str, *, index: int = 0, wait: float | None = None,
                          token: str | None = None) -> tuple[int, Sequence[dict[str, Any]]]: ...


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Both sources as last read. ``ready`` once each has answered at least once."""

    kv: Mapping[str, bytes]
    native: tuple[dict[str, Any], ...]
    kv_ready: bool
    native_ready: bool

    @property
    def ready(self) -> bool:
        return self.kv_ready and self.native_ready

    def documents(self) -> list[Document]:
        docs = [Document.kv(key, body) for key, body in sorted(self.kv.items())]
        docs += [Document.native(entry) for entry in self.native]
        return docs


class SourceWatcher:
    """Runs both watches; ``snapshot()`` is the latest state and ``changed`` fires on any change."""

    def __init__(self, api: SourcesAPI, *, wait: float = 30.0, min_interval: float = 0.02,
                 max_backoff: float = 5.0, kv: bool = True, native: bool = True) -> None:
        if not kv and not native:
            raise ValueError("at least one intention source (kv, native) must be watched")
        self._api = api
        self._watch_kv = kv
        self._watch_native = native
        self._wait = wait
        self._min_interval = min_interval
        self._max_backoff = max_backoff
        self._kv: dict[str, bytes] = {}
        self._native: tuple[dict[str, Any], ...] = ()
        self._kv_ready = not kv  # a source that is not watched counts as ready and empty
        self._native_ready = not native
        self.changed = asyncio.Event()
        self.errors = 0
        self._native_missing_logged = False
        self._native_missing_retry = 5.0

    def snapshot(self) -> Snapshot:
        return Snapshot(kv=dict(self._kv), native=self._native, kv_ready=self._kv_ready,
                        native_ready=self._native_ready)

    async def run(self, stop: asyncio.Event) -> None:
        tasks = []
        if self._watch_kv:
            tasks.append(asyncio.create_task(self._loop("kv", self._poll_kv, stop)))
        if self._watch_native:
            tasks.append(asyncio.create_task(self._loop("native", self._poll_native, stop)))
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _poll_kv(self, index: int) -> int:
        new_index, entries = await self._api.kv_get_recurse(INTENTIONS_PREFIX, index=index, wait=self._wait)
        docs = {e.key: (e.value or b"") for e in entries if not e.key.endswith("/")}
        if docs != self._kv or not self._kv_ready:
            self._kv = docs
            self._kv_ready = True
            self.changed.set()
        return new_index

    async def _poll_native(self, index: int) -> int:
        try:
            new_index, entries = await self._api.config_list(KIND, index=index, wait=self._wait)
        except Exception as exc:
            if getattr(exc, "status", None) != 404:
                raise
            # An agent without service-intentions config entries (Consul < 1.9, or a dev agent that
            # lacks them) has no native intentions: treat the source as empty rather than never
            # publishing, say so once, and look again now and then.
            if not self._native_missing_logged:
                log.warning("this Consul does not serve /v1/config/service-intentions; native intentions "
                            "are treated as empty", error=str(exc))
                self._native_missing_logged = True
            if self._native or not self._native_ready:
                self._native = ()
                self._native_ready = True
                self.changed.set()
            await asyncio.sleep(self._native_missing_retry)
            return 0
        native = tuple(sorted((dict(e) for e in entries), key=lambda e: str(e.get("Name", ""))))
        if native != self._native or not self._native_ready:
            self._native = native
            self._native_ready = True
            self.changed.set()
        return new_index

    async def _loop(self, name: str, poll: Any, stop: asyncio.Event) -> None:
        index = 0
        failures = 0
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            started = loop.time()
            try:
                new_index = await poll(index)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Consul unreachable or a bad answer: keep the last good state
                failures += 1
                self.errors += 1
                delay = min(self._max_backoff, 0.1 * 2 ** min(failures, 8)) * (0.5 + random.random() / 2)
                log.warning("intention source watch failed; serving last good state", source=name,
                            error=str(exc) or type(exc).__name__, retry_in=round(delay, 2))
                index = 0
                await _sleep_or_stop(stop, delay)
                continue
            failures = 0
            # Consul's rules: reset to 0 (one non-blocking read) when the index goes backwards; an
            # index of 0 from the server is used as 1 so that the next read blocks.
            index = 0 if new_index < index else max(new_index, 1)
            elapsed = loop.time() - started
            if elapsed < self._min_interval:
                await _sleep_or_stop(stop, self._min_interval - elapsed)


async def _sleep_or_stop(stop: asyncio.Event, delay: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=delay)
    except TimeoutError:
        pass
