"""`LeaderLock`: one active replica, elected with a Consul session lock on a KV key.

    while not stop.is_set():
        async with LeaderLock(client, "weft/ca/leader", ttl="15s", value=b"10.0.0.5:8502") as lock:
            await lock.acquired()              # blocks while another replica holds the key
            ... act as leader until lock.lost is set (lock.lost: asyncio.Event) ...
            await lock.lost.wait()

How it works (as Consul's own `api.Lock`):
- A session is created with `TTL`, `Behavior` (release by default) and `LockDelay`, and renewed every
  TTL/2 from then on, standby included.
- Acquire is ``PUT /v1/kv/<key>?acquire=<session>`` with `value` as the body.
- Standby: a blocking query on the key waits until its `Session` is empty, then tries again. When the
  key is free but the acquire still fails, Consul's lock-delay is in effect: the next try waits
  `retry_interval` (default: the lock delay, between 0.5s and 5s).
- Loss: the key's `Session` is no longer ours (seen by a blocking query on the key), the session is gone
  (renew answers 404), or renewals have failed for a whole TTL (Consul unreachable: we can no longer know
  that we hold it). Then `lost` is set and `held` is False. A `LeaderLock` is one term: after a loss,
  leave the `async with` block and enter a new one to campaign again.
- Stop (leaving the block, or `await lock.stop()`): ``?release=`` on the key, then the session is
  destroyed, so that a standby takes over at once (a release is not subject to lock-delay). `lost` is
  set on stop too: it means "not (or no longer) the leader".

Errors talking to Consul are retried with backoff; they never escape `acquired()`, which only raises
`LockStopped` if the lock is stopped before it was acquired.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from types import TracebackType
from typing import TYPE_CHECKING

import structlog

from catalog.client import ConsulError, ConsulNotFound
from catalog.models import parse_duration
from catalog.watch import WatchPolicy, backoff_delay, wait_event

if TYPE_CHECKING:
    from catalog.client import ConsulClient

log = structlog.get_logger(__name__)


class LockStopped(Exception):
    """The lock was stopped before it was acquired."""


class LeaderLock:
    def __init__(self, client: ConsulClient, key: str, *, ttl: float | str = "15s", lock_delay: float | str = "15s",
                 behavior: str = "release", value: bytes | str = b"", session_name: str = "",
                 retry_interval: float | None = None, wait: float = 60.0,
                 node_checks: list[str] | None = None) -> None:
        if not key or key.startswith("/"):
            raise ValueError(f"lock key must be non-empty and not start with '/', got {key!r}")
        if behavior not in ("release", "delete"):
            raise ValueError(f"behavior: expected 'release' or 'delete', got {behavior!r}")
        self.client = client
        self.key = key
        self.ttl = parse_duration(ttl, "ttl")
        if not 0 < self.ttl <= 86400:
            # Consul's lower bound is its session_ttl_min (10s by default); the server checks it
            raise ValueError(f"ttl: a session TTL must be between 0 and 86400s, got {ttl!r}")
        self.lock_delay = parse_duration(lock_delay, "lock_delay")
        self.behavior = behavior
        self.value = value.encode() if isinstance(value, str) else value
        self.session_name = session_name or f"weft lock {key}"
        self.retry_interval = (retry_interval if retry_interval is not None
                               else min(5.0, max(0.5, self.lock_delay)))
        self.wait = wait
        self.node_checks = node_checks
        self.session_id = ""
        self.lost = asyncio.Event()
        """Set when this replica is not (or no longer) the leader after having tried: loss or stop."""
        self.leader_value: bytes | None = None
        """The key's value as last seen (the current holder's `value`), for standbys."""
        self._acquired = asyncio.Event()
        self._stopped = asyncio.Event()
        self._held = False
        self._task: asyncio.Task[None] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._last_renew = 0.0
        self._policy = WatchPolicy(backoff_base=0.5, backoff_max=10.0)

    # -- public ---------------------------------------------------------------------------------------------------

    @property
    def held(self) -> bool:
        return self._held

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"leader-lock:{self.key}")

    async def acquired(self) -> None:
        """Wait until this replica holds the lock. Raises `LockStopped` if stopped first."""
        if self._acquired.is_set():
            return
        self.start()
        acq = asyncio.ensure_future(self._acquired.wait())
        stp = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait({acq, stp}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            acq.cancel()
            stp.cancel()
        if not self._acquired.is_set():
            raise LockStopped(f"lock {self.key} stopped before it was acquired")

    async def stop(self) -> None:
        """Release the key (if held) and destroy the session; idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        for t in (self._task, self._renew_task):
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        sid, self.session_id = self.session_id, ""
        if sid:
            if self._held:
                try:
                    await self.client.kv_put(self.key, self.value, release=sid)
                except ConsulError as exc:
                    log.warning("lock_release_failed", key=self.key, error=str(exc))
            try:
                await self.client.session_destroy(sid)
            except ConsulError as exc:
                log.warning("lock_session_destroy_failed", key=self.key, error=str(exc))
        if self._held:
            log.info("lock_released", key=self.key)
        self._held = False
        self.lost.set()

    # Aliases, so that a LeaderLock satisfies `ca.backend.LeaderLock` (acquire / wait_lost / release).

    async def acquire(self) -> None:
        """Start campaigning (if not yet) and wait until held; same as `acquired()`."""
        await self.acquired()

    async def wait_lost(self) -> None:
        """Return when leadership has ended (lost, or stopped)."""
        await self.lost.wait()

    async def release(self) -> None:
        """Same as `stop()`."""
        await self.stop()

    async def __aenter__(self) -> LeaderLock:
        self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    # -- internals ------------------------------------------------------------------------------------------------

    def _mark_lost(self, why: str) -> None:
        if self._held:
            log.warning("lock_lost", key=self.key, reason=why)
        self._held = False
        self.lost.set()

    async def _sleep(self, seconds: float) -> None:
        await wait_event(self._stopped, seconds)

    async def _ensure_session(self) -> str:
        if self.session_id:
            return self.session_id
        sid = await self.client.session_create(name=self.session_name, ttl=self.ttl, behavior=self.behavior,
                                               lock_delay=self.lock_delay, node_checks=self.node_checks)
        self.session_id = sid
        self._last_renew = time.monotonic()
        if self._renew_task is not None:
            self._renew_task.cancel()
        self._renew_task = asyncio.create_task(self._renew(sid), name=f"leader-lock-renew:{self.key}")
        return sid

    async def _renew(self, sid: str) -> None:
        failures = 0
        while not self._stopped.is_set():
            await self._sleep(self.ttl / 2 if failures == 0 else min(self.ttl / 4, 2.0))
            if self._stopped.is_set() or sid != self.session_id:
                return
            try:
                await self.client.session_renew(sid)
                self._last_renew = time.monotonic()
                failures = 0
            except ConsulNotFound:
                log.warning("lock_session_gone", key=self.key, held=self._held)
                if self.session_id == sid:
                    self.session_id = ""  # a standby campaigns on with a new session
                if self._held:
                    self._mark_lost("session invalidated")
                return
            except ConsulError as exc:
                failures += 1
                if time.monotonic() - self._last_renew >= self.ttl:
                    if self.session_id == sid:
                        self.session_id = ""
                    if self._held:
                        self._mark_lost(f"session not renewed for a whole TTL: {exc}")
                    return

    async def _run(self) -> None:
        failures = 0
        while not self._stopped.is_set() and not self._held:
            try:
                await self._campaign()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # ConsulError expected; anything else must not kill the campaign silently
                failures += 1
                d = backoff_delay(failures, self._policy, random.random())
                if isinstance(exc, ConsulError):
                    log.info("lock_campaign_retry", key=self.key, error=str(exc), delay=round(d, 2))
                else:
                    log.error("lock_campaign_error", key=self.key, error=repr(exc), delay=round(d, 2),
                              exc_info=True)
                await self._sleep(d)
        if self._held:
            await self._monitor()

    async def _campaign(self) -> None:
        """Try to acquire; return when held, or raise ConsulError for the caller to back off."""
        index = 0
        while not self._stopped.is_set():
            sid = await self._ensure_session()
            if await self.client.kv_put(self.key, self.value, acquire=sid):
                if sid != self.session_id:
                    continue
                self._held = True
                self._acquired.set()
                self.leader_value = self.value
                log.info("lock_acquired", key=self.key)
                return
            # not acquired: someone holds it, or lock-delay is in effect
            index, entry = await self.client.kv_get(self.key)
            if entry is None or not entry.session:
                # free, yet our acquire failed just now: lock-delay is in effect; wait before the next try
                await self._sleep(self.retry_interval)
                continue
            while entry is not None and entry.session and not self._stopped.is_set():
                self.leader_value = entry.value
                sent = max(index, 1)
                started = time.monotonic()
                got, entry = await self.client.kv_get(self.key, index=sent, wait=self.wait)
                # the index went backwards (a restarted server): do not block on the old one
                index = 0 if got < sent else got
                await self._sleep(started + self._policy.min_interval - time.monotonic())  # rate limit
            # the holder let go: try again at once

    async def _monitor(self) -> None:
        """While held: block on the key; lost when its Session is no longer ours."""
        index = 0
        failures = 0
        sid = self.session_id
        last_start = 0.0
        while not self._stopped.is_set() and self._held:
            await self._sleep(last_start + self._policy.min_interval - time.monotonic())  # rate limit
            if self._stopped.is_set():
                return
            last_start = time.monotonic()
            try:
                sent = index
                got, entry = await self.client.kv_get(self.key, index=sent, wait=self.wait)
                got = max(got, 1)
                index = 0 if got < sent else got  # backwards: start over
                failures = 0
            except asyncio.CancelledError:
                raise
            except ConsulError as exc:
                failures += 1
                await self._sleep(backoff_delay(failures, self._policy, random.random()))
                if time.monotonic() - self._last_renew >= self.ttl:
                    self._mark_lost(f"Consul unreachable for a whole TTL: {exc}")
                continue
            if entry is None or entry.session != sid or sid != self.session_id:
                self._mark_lost("key no longer held by our session")
                return
