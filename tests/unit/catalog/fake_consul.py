"""An in-memory stand-in for the few ConsulClient methods LeaderLock and TtlKeeper use, with Consul's
session-lock semantics (acquire/release, Behavior, lock-delay, blocking reads). No sockets."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from catalog.client import ConsulNotFound, ConsulUnavailable
from catalog.models import KVEntry, Session, parse_duration


class FakeConsul:
    def __init__(self) -> None:
        self.index = 1
        self.kv: dict[str, KVEntry] = {}
        self.sessions: dict[str, Session] = {}
        self.lock_delay_until: dict[str, float] = {}
        self.checks: dict[str, tuple[str, str]] = {}
        self.calls: list[tuple[str, Any]] = []
        self.down = False
        self._cond = asyncio.Condition()
        self._ids = itertools.count(1)

    def _up(self) -> None:
        if self.down:
            raise ConsulUnavailable("connection refused")

    async def _bump(self) -> None:
        self.index += 1
        async with self._cond:
            self._cond.notify_all()

    # -- sessions -----------------------------------------------------------------------------------------------
    async def session_create(self, *, name: str = "", ttl: float | str | None = None, behavior: str = "release",
                             lock_delay: float | str | None = None, node_checks: Any = None, **_: Any) -> str:
        self._up()
        sid = f"s{next(self._ids)}"
        self.sessions[sid] = Session(id=sid, name=name, behavior=behavior,
                                     ttl=parse_duration(ttl or 0), lock_delay=parse_duration(lock_delay or 0))
        self.calls.append(("session_create", sid))
        await self._bump()
        return sid

    async def session_renew(self, session_id: str, **_: Any) -> Session:
        self._up()
        self.calls.append(("session_renew", session_id))
        if session_id not in self.sessions:
            raise ConsulNotFound(f"Session id '{session_id}' not found", status=404)
        return self.sessions[session_id]

    async def session_destroy(self, session_id: str, **_: Any) -> bool:
        self._up()
        self.calls.append(("session_destroy", session_id))
        await self.invalidate(session_id)
        return True

    async def invalidate(self, session_id: str) -> None:
        """What Consul does when a session's TTL lapses or it is destroyed."""
        s = self.sessions.pop(session_id, None)
        if s is None:
            return
        for key, e in list(self.kv.items()):
            if e.session == session_id:
                if s.lock_delay:
                    self.lock_delay_until[key] = time.monotonic() + s.lock_delay
                if s.behavior == "delete":
                    del self.kv[key]
                else:
                    self.kv[key] = KVEntry(key, e.value, e.flags, e.create_index, self.index + 1, e.lock_index, "")
        await self._bump()

    # -- KV -----------------------------------------------------------------------------------------------------
    async def kv_get(self, key: str, *, index: int = 0, wait: float | None = None,
                     **_: Any) -> tuple[int, KVEntry | None]:
        self._up()
        if index:
            async with self._cond:
                try:
                    await asyncio.wait_for(self._cond.wait_for(lambda: self.index > index or self.down),
                                           timeout=wait or 300)
                except TimeoutError:
                    pass
            self._up()
        return (self.index, self.kv.get(key))

    async def kv_put(self, key: str, value: bytes | str | None = b"", *, acquire: str = "", release: str = "",
                     **_: Any) -> bool:
        self._up()
        data = value.encode() if isinstance(value, str) else (value or b"")
        cur = self.kv.get(key)
        if acquire:
            if acquire not in self.sessions:
                raise ConsulUnavailable("invalid session")  # Consul answers 500 for an unknown session
            if cur is not None and cur.session and cur.session != acquire:
                return False
            if time.monotonic() < self.lock_delay_until.get(key, 0):
                return False
            lock_index = (cur.lock_index if cur else 0) + (0 if cur and cur.session == acquire else 1)
            self.kv[key] = KVEntry(key, data, 0, cur.create_index if cur else self.index + 1, self.index + 1,
                                   lock_index, acquire)
        elif release:
            if cur is None or cur.session != release:
                return False
            self.kv[key] = KVEntry(key, data, 0, cur.create_index, self.index + 1, cur.lock_index, "")
        else:
            self.kv[key] = KVEntry(key, data, 0, cur.create_index if cur else self.index + 1, self.index + 1,
                                   cur.lock_index if cur else 0, cur.session if cur else "")
        await self._bump()
        return True

    async def set_down(self, down: bool) -> None:
        self.down = down
        async with self._cond:
            self._cond.notify_all()

    # -- agent checks ---------------------------------------------------------------------------------------------
    async def _check(self, check_id: str, status: str, note: str) -> None:
        self._up()
        self.calls.append((f"check_{status}", (check_id, note)))
        if check_id not in self.checks:
            raise ConsulNotFound(f'Unknown check ID "{check_id}"', status=404)
        self.checks[check_id] = (status, note)

    async def agent_check_pass(self, check_id: str, note: str = "", **_: Any) -> None:
        await self._check(check_id, "passing", note)

    async def agent_check_warn(self, check_id: str, note: str = "", **_: Any) -> None:
        await self._check(check_id, "warning", note)

    async def agent_check_fail(self, check_id: str, note: str = "", **_: Any) -> None:
        await self._check(check_id, "critical", note)
