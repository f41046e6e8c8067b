"""`Watch`: an async iterator over the results of a Consul blocking query, following Consul's client rules.

    watch = health_connect_watch(client, "api")   # or Watch(fetch) with fetch(index, wait) -> (index, value)
    async for instances in watch:                        # yields the first answer, then only real changes
        ...
    watch.last / watch.healthy / watch.last_error / watch.last_success_time / watch.index
    watch.close()                                        # ends the iteration

Rules (the decisions live in the pure `IndexPlan` / `HashPlan`, tested without sockets):
- The first call sends ``index=0`` (no blocking); later calls send the index of the last answer.
- An answered index of 0 is treated as 1 (Consul: the index is always at least 1), so 0 is never sent
  after an answer, except right after a reset:
- if the answered index is lower than the one sent, the index went backwards (snapshot restore, a new
  server): the next call sends 0, restarting the loop; the answer itself is still a valid result.
- Calls start at least `min_interval` apart, so a server that answers at once (flapping index) cannot
  make the loop spin.
- After an error the next call waits `backoff_delay(failures)`: exponential from `backoff_base`, capped
  at `backoff_max`, with random jitter; the first call after an error blocks only `recovery_wait`
  seconds so that a restarted server whose index went backwards is noticed quickly.
- A result is yielded only when its index moved (an unchanged index is a timeout) and it differs
  from the last one yielded (equal results under a higher index are spurious wake-ups and are
  skipped), as Consul's own watch plan does. After a reset (index backwards) the answer is still a
  valid result and is yielded if it differs. The first answer after an error is judged by its
  content alone: the server may be a new one (restarted, state lost) whose index only coincides
  with ours (a single KV key's index is its ModifyIndex, so this happens).
- Fail static: while Consul is unreachable nothing is yielded, `last` keeps the last good value,
  `healthy` is False and `last_error` says why; the loop keeps retrying.

`HashWatch` is the same loop for agent-local endpoints that block on a content hash
(`/v1/agent/service/:id`: ``?hash=&wait=``, `X-Consul-ContentHash`): the first call sends no hash; an
answer without a hash makes the next call a plain poll, at most every `poll_interval`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import structlog

if TYPE_CHECKING:
    from catalog.chain import CompiledChain
    from catalog.client import ConsulClient
    from catalog.models import KVEntry, ServiceInstance, ServiceRegistration

log = structlog.get_logger(__name__)

T = TypeVar("T")
C = TypeVar("C")
K = TypeVar("K")


# ---------------------------------------------------------------------------------------------------------------
# Pure decision logic


@dataclass(frozen=True)
class WatchPolicy:
    wait: float = 60.0
    """`wait` sent with each blocking call (seconds; Consul caps it at 10 minutes)."""
    min_interval: float = 0.1
    """Minimum time between the starts of two calls."""
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    jitter: float = 0.5
    """Fraction of each backoff delay that is random: the delay is d * (1 - jitter * u), u in [0, 1)."""
    recovery_wait: float = 1.0
    """`wait` of the first call after an error."""
    poll_interval: float = 1.0
    """`HashWatch`: minimum interval between calls while there is no hash to block on."""

    def __post_init__(self) -> None:
        for name in ("wait", "min_interval", "backoff_base", "backoff_max", "recovery_wait", "poll_interval"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"WatchPolicy.{name}: must be a number >= 0, got {v!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"WatchPolicy.jitter: must be between 0 and 1, got {self.jitter!r}")
        if self.wait > 600:
            raise ValueError(f"WatchPolicy.wait: Consul caps wait at 600s, got {self.wait!r}")


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set or `timeout` seconds pass; True if set. Unlike `asyncio.wait_for`, a
    cancellation arriving as the event is set is never swallowed (Python 3.11's wait_for can lose it)."""
    if event.is_set():
        return True
    if timeout <= 0:
        return False
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return event.is_set()


def backoff_delay(attempt: int, policy: WatchPolicy, u: float) -> float:
    """Delay before retry number `attempt` (1 for the first retry) with jitter draw `u` in [0, 1)."""
    if attempt < 1:
        return 0.0
    exp = min(attempt - 1, 62)
    base = min(policy.backoff_max, policy.backoff_base * (2.0 ** exp))
    return base * (1.0 - policy.jitter * min(max(u, 0.0), 1.0))


class _PlanBase(Generic[T]):
    """What both plans share: the last value, failures, and call timing (all times from the caller)."""

    def __init__(self, policy: WatchPolicy) -> None:
        self.policy = policy
        self.has_value = False
        self.value: T | None = None
        self.failures = 0
        self.retry_at = 0.0
        self.last_start: float | None = None
        self._next_interval = policy.min_interval

    def delay(self, now: float) -> float:
        """Seconds to wait before starting the next call."""
        if self.failures:
            return max(0.0, self.retry_at - now)
        if self.last_start is None:
            return 0.0
        return max(0.0, self.last_start + self._next_interval - now)

    def started(self, now: float) -> None:
        self.last_start = now

    def on_error(self, now: float, u: float) -> float:
        """Record a failed call; returns the backoff delay before the next one."""
        self.failures += 1
        d = backoff_delay(self.failures, self.policy, u)
        self.retry_at = now + d
        return d

    def _accept(self, value: T) -> bool:
        self.failures = 0
        emit = not self.has_value or value != self.value
        if emit:
            self.value = value
            self.has_value = True
        return emit

    def _wait(self) -> float:
        return self.policy.recovery_wait if self.failures else self.policy.wait


class IndexPlan(_PlanBase[T]):
    """Index-based blocking (`X-Consul-Index`, ``?index=&wait=``)."""

    def __init__(self, policy: WatchPolicy | None = None) -> None:
        super().__init__(policy or WatchPolicy())
        self.index = 0
        """The index the next call sends."""
        self.resets = 0

    def request(self) -> tuple[int, float]:
        """(index, wait) for the next call; index 0 means a non-blocking read."""
        return (self.index, min(self._wait(), self.policy.wait))

    def on_answer(self, index: int, value: T) -> bool:
        """Record an answer to a call that sent `self.index`; True when `value` should be yielded:
        the first answer, or an answer whose index moved (up, or backwards: a reset) and whose value
        differs from the last one yielded. An unchanged index is a timeout: nothing changed."""
        sent = self.index
        got = max(int(index), 1)
        if got < sent:
            self.index = 0
            self.resets += 1
        else:
            self.index = got
        if self.has_value and got == sent and not self.failures:
            return False
        # (after an error the server may be another one, e.g. restarted with its state lost, whose index
        # merely coincides with ours: then the content alone decides)
        return self._accept(value)


class HashPlan(_PlanBase[T]):
    """Content-hash blocking (`X-Consul-ContentHash`, ``?hash=&wait=``) for agent-local endpoints."""

    def __init__(self, policy: WatchPolicy | None = None) -> None:
        super().__init__(policy or WatchPolicy())
        self.hash = ""

    def request(self) -> tuple[str, float]:
        return (self.hash, min(self._wait(), self.policy.wait))

    def on_answer(self, content_hash: str, value: T) -> bool:
        """True for the first answer, or when the hash changed and the value differs from the last one
        yielded. (Without a hash to compare, e.g. a 404, the value decides.)"""
        sent = self.hash
        self.hash = content_hash
        self._next_interval = self.policy.min_interval if content_hash else max(self.policy.min_interval,
                                                                                 self.policy.poll_interval)
        if self.has_value and content_hash and content_hash == sent:
            self.failures = 0
            return False
        return self._accept(value)


# ---------------------------------------------------------------------------------------------------------------
# The async loop


class _WatchBase(Generic[T]):
    def __init__(self, name: str, policy: WatchPolicy | None, clock: Callable[[], float] | None,
                 rand: Callable[[], float] | None) -> None:
        self.name = name
        self.policy = policy or WatchPolicy()
        self._clock = clock or time.monotonic
        self._rand = rand or random.random
        self._closed = False
        self._task_wakeup = asyncio.Event()
        self.last_error: BaseException | None = None
        self.last_success_time: float | None = None
        """Wall-clock time (time.time()) of the last successful call."""
        self._healthy = False
        self._has_value = False
        self._last: T | None = None
        self._inflight: asyncio.Future[Any] | None = None

    @property
    def healthy(self) -> bool:
        """True when the last call succeeded."""
        return self._healthy

    @property
    def has_value(self) -> bool:
        return self._has_value

    @property
    def last(self) -> T | None:
        """The last good value (kept while Consul is unreachable); None before the first answer."""
        return self._last

    def close(self) -> None:
        """End the iteration: a pending `__anext__` (even one inside a blocking call) raises
        StopAsyncIteration."""
        self._closed = True
        self._task_wakeup.set()
        if self._inflight is not None:
            self._inflight.cancel()

    async def _sleep(self, seconds: float) -> None:
        await wait_event(self._task_wakeup, seconds)

    async def _next(self, plan: _PlanBase[T], request: Callable[[], tuple[K, float]],
                    fetch: Callable[[K, float], Awaitable[tuple[K, T]]], on_answer: Callable[[K, T], bool]) -> T:
        """The loop both watches share; `K` is what the server blocks on (an index or a content hash)."""
        while not self._closed:
            await self._sleep(plan.delay(self._clock()))
            if self._closed:
                break
            key, wait = request()
            plan.started(self._clock())
            result = await self._call(fetch(key, wait))
            if result is None:
                plan.on_error(self._clock(), self._rand())
                continue
            got, value = result
            if on_answer(got, value):
                self._last, self._has_value = value, True
                return value
        raise StopAsyncIteration

    def _record_error(self, exc: BaseException) -> None:
        was_healthy = self._healthy or self.last_error is None
        self._healthy = False
        self.last_error = exc
        if was_healthy:
            log.warning("watch_unhealthy", watch=self.name, error=str(exc), serving_last=self._has_value)

    def _record_success(self) -> None:
        if not self._healthy and self.last_error is not None:
            log.info("watch_recovered", watch=self.name)
        self._healthy = True
        self.last_error = None
        self.last_success_time = time.time()

    async def _call(self, call: Awaitable[C]) -> C | None:
        """Run one fetch; None on error (recorded: fail static) or when `close()` cancelled it."""
        task = asyncio.ensure_future(call)
        self._inflight = task
        try:
            result = await task
        except asyncio.CancelledError:
            if self._closed and task.cancelled():
                return None
            raise
        except Exception as exc:  # fail static: keep the last value, back off, retry
            self._record_error(exc)
            return None
        finally:
            self._inflight = None
        self._record_success()
        return result

    def __aiter__(self) -> _WatchBase[T]:
        return self

    async def __anext__(self) -> T:
        raise NotImplementedError

    async def first(self, timeout: float | None = None) -> T:
        """The first value (waits for it); later `async for` continues with changes only."""
        if self._has_value:
            return self._last  # type: ignore[return-value]
        return await asyncio.wait_for(self.__anext__(), timeout)


class Watch(_WatchBase[T]):
    """Index-based blocking query loop. `fetch(index, wait)` returns `(index, value)` (a ConsulClient
    read); values must compare with == (Weft's models are frozen dataclasses and tuples)."""

    def __init__(self, fetch: Callable[[int, float], Awaitable[tuple[int, T]]], *, name: str = "watch",
                 policy: WatchPolicy | None = None, clock: Callable[[], float] | None = None,
                 rand: Callable[[], float] | None = None) -> None:
        super().__init__(name, policy, clock, rand)
        self.plan: IndexPlan[T] = IndexPlan(self.policy)
        self._fetch_index = fetch

    @property
    def index(self) -> int:
        return self.plan.index

    async def __anext__(self) -> T:
        return await self._next(self.plan, self.plan.request, self._fetch_index, self.plan.on_answer)


class HashWatch(_WatchBase[T]):
    """Content-hash blocking loop for agent-local endpoints. `fetch(hash, wait)` returns `(hash, value)`."""

    def __init__(self, fetch: Callable[[str, float], Awaitable[tuple[str, T]]], *, name: str = "hash-watch",
                 policy: WatchPolicy | None = None, clock: Callable[[], float] | None = None,
                 rand: Callable[[], float] | None = None) -> None:
        super().__init__(name, policy, clock, rand)
        self.plan: HashPlan[T] = HashPlan(self.policy)
        self._fetch_hash = fetch

    @property
    def hash(self) -> str:
        return self.plan.hash

    async def __anext__(self) -> T:
        return await self._next(self.plan, self.plan.request, self._fetch_hash, self.plan.on_answer)


# ---------------------------------------------------------------------------------------------------------------
# Ready-made watches on ConsulClient reads


def kv_watch(client: ConsulClient, key: str, *, policy: WatchPolicy | None = None) -> Watch[KVEntry | None]:
    """One key (None while it does not exist)."""
    async def fetch(index: int, wait: float) -> tuple[int, KVEntry | None]:
        return await client.kv_get(key, index=index, wait=wait)
    return Watch(fetch, name=f"kv:{key}", policy=policy)


def kv_prefix_watch(client: ConsulClient, prefix: str, *,
                    policy: WatchPolicy | None = None) -> Watch[tuple[KVEntry, ...]]:
    async def fetch(index: int, wait: float) -> tuple[int, tuple[KVEntry, ...]]:
        return await client.kv_get_recurse(prefix, index=index, wait=wait)
    return Watch(fetch, name=f"kv-prefix:{prefix}", policy=policy)


def health_connect_watch(client: ConsulClient, service: str, *, passing: bool = True, filter: str = "",
                         policy: WatchPolicy | None = None) -> Watch[tuple[ServiceInstance, ...]]:
    """The healthy sidecars (and Connect-native instances) of `service`: what an upstream resolves to;
    `filter` narrows them (a service-resolver subset's expression, evaluated by Consul)."""
    async def fetch(index: int, wait: float) -> tuple[int, tuple[ServiceInstance, ...]]:
        if filter:
            return await client.health_connect(service, passing=passing, filter=filter, index=index, wait=wait)
        return await client.health_connect(service, passing=passing, index=index, wait=wait)
    return Watch(fetch, name=f"health-connect:{service}" + (f"[{filter}]" if filter else ""), policy=policy)


def config_entry_watch(client: ConsulClient, kind: str, name: str, *,
                       policy: WatchPolicy | None = None) -> Watch[dict[str, Any] | None]:
    async def fetch(index: int, wait: float) -> tuple[int, dict[str, Any] | None]:
        return await client.config_get(kind, name, index=index, wait=wait)
    return Watch(fetch, name=f"config:{kind}/{name}", policy=policy)


def config_list_watch(client: ConsulClient, kind: str, *,
                      policy: WatchPolicy | None = None) -> Watch[tuple[dict[str, Any], ...]]:
    async def fetch(index: int, wait: float) -> tuple[int, tuple[dict[str, Any], ...]]:
        return await client.config_list(kind, index=index, wait=wait)
    return Watch(fetch, name=f"config:{kind}", policy=policy)


def discovery_chain_watch(client: ConsulClient, service: str, *, compile_dc: str = "",
                          policy: WatchPolicy | None = None) -> Watch[CompiledChain]:
    """The compiled discovery chain of `service` (fail static: the last good chain stays while Consul is
    unreachable or answers a chain that does not parse)."""
    async def fetch(index: int, wait: float) -> tuple[int, CompiledChain]:
        return await client.discovery_chain(service, compile_dc=compile_dc, index=index, wait=wait)
    return Watch(fetch, name=f"discovery-chain:{service}", policy=policy)


def intentions_watch(client: ConsulClient, *,
                     policy: WatchPolicy | None = None) -> Watch[tuple[dict[str, Any], ...]]:
    async def fetch(index: int, wait: float) -> tuple[int, tuple[dict[str, Any], ...]]:
        return await client.intentions_list(index=index, wait=wait)
    return Watch(fetch, name="intentions", policy=policy)


def agent_service_watch(client: ConsulClient, service_id: str, *,
                        policy: WatchPolicy | None = None) -> HashWatch[ServiceRegistration | None]:
    """This agent's registration of `service_id` (None while not registered), blocking on its hash."""
    async def fetch(h: str, wait: float) -> tuple[str, ServiceRegistration | None]:
        return await client.agent_service(service_id, hash=h, wait=wait)
    return HashWatch(fetch, name=f"agent-service:{service_id}", policy=policy)
