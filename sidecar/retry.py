"""Retry decisions with a budget (pure: callers pass ``now`` and a ``random.Random``).

Budget (Linkerd's default): over a sliding window of ``ttl`` seconds, retries may be at most
``ratio`` (20 %) of the calls made plus ``min_per_second`` (10) per second of the window; one budget
per upstream. A retry happens only when all hold:

- the attempt failed with a condition the route's policy names (``routing.retryable``);
- fewer than ``num_retries`` retries were made for this call;
- the response has not started (nothing of it was sent back to the caller);
- the request body was buffered whole (at most ``BodyBuffer.limit``, 64 KiB by default): a larger
  call is never retried because its body is already gone;
- the backoff delay still ends before the caller's deadline;
- the budget has a retry left (else ``budget-exhausted``, which the metrics count).

Backoff: "full jitter", uniform in [0, min(cap, base * 2^retry)) (25 ms base, 250 ms cap, Envoy's defaults).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from sidecar.routing import Outcome, RetryPolicy, retryable

DEFAULT_RATIO = 0.2
DEFAULT_MIN_PER_SECOND = 10.0
DEFAULT_TTL = 10.0
BACKOFF_BASE = 0.025
BACKOFF_CAP = 0.250
DEFAULT_BODY_LIMIT = 64 * 1024


@dataclass
class RetryBudget:
    """Calls and retries in one-second slots over the last ``ttl`` seconds."""

    ratio: float = DEFAULT_RATIO
    min_per_second: float = DEFAULT_MIN_PER_SECOND
    ttl: float = DEFAULT_TTL
    _slots: deque[list[float]] = field(default_factory=deque)  # [second, calls, retries]
    _calls: float = 0.0
    _retries: float = 0.0
    exhausted: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.ratio <= 1000:
            raise ValueError("ratio must be between 0 and 1000")
        if self.min_per_second < 0 or self.ttl < 1:
            raise ValueError("min_per_second must be >= 0 and ttl >= 1 second")

    def _slot(self, now: float) -> list[float]:
        second = float(int(now))
        while self._slots and self._slots[0][0] <= second - self.ttl:
            old = self._slots.popleft()
            self._calls -= old[1]
            self._retries -= old[2]
        if not self._slots or self._slots[-1][0] != second:
            self._slots.append([second, 0.0, 0.0])
        return self._slots[-1]

    def record_call(self, now: float) -> None:
        """A call (not a retry) started."""
        self._slot(now)[1] += 1
        self._calls += 1

    def allowance(self, now: float) -> float:
        self._slot(now)
        return self.ratio * self._calls + self.min_per_second * self.ttl - self._retries

    def try_withdraw(self, now: float) -> bool:
        """Take one retry from the budget; False (and counted) when there is none left."""
        slot = self._slot(now)
        if self.ratio * self._calls + self.min_per_second * self.ttl - self._retries < 1:
            self.exhausted += 1
            return False
        slot[2] += 1
        self._retries += 1
        return True

    @property
    def window(self) -> tuple[float, float]:
        """(calls, retries) in the current window."""
        return self._calls, self._retries


def backoff(retry: int, rng: random.Random, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """The delay before retry number ``retry`` (1 = the first retry)."""
    return float(rng.random() * min(cap, base * float(2 ** max(0, retry - 1))))


class BodyBuffer:
    """A request body kept for replay while it fits in ``limit`` bytes; past it the copy is dropped."""

    __slots__ = ("chunks", "complete", "limit", "overflowed", "size")

    def __init__(self, limit: int = DEFAULT_BODY_LIMIT) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.overflowed = False
        self.complete = False

    def add(self, data: bytes, *, end: bool = False) -> None:
        if not self.overflowed:
            self.size += len(data)
            if self.size > self.limit:
                self.overflowed = True
                self.chunks = []
            elif data:
                self.chunks.append(data)
        if end:
            self.complete = True

    @property
    def replayable(self) -> bool:
        return not self.overflowed


class Replayable(Protocol):
    """What a retry asks of the request body: whether it can be sent again."""

    @property
    def replayable(self) -> bool: ...


@dataclass(frozen=True)
class RetryVerdict:
    retry: bool
    delay: float = 0.0
    # why not: not-retryable | attempts | response-started | body-too-large | deadline | budget-exhausted
    reason: str = ""


def decide(policy: RetryPolicy, outcome: Outcome, *, retries_done: int, response_started: bool,
           body: Replayable | None, now: float, deadline: float | None, budget: RetryBudget,
           rng: random.Random) -> RetryVerdict:
    """Whether to retry the failed attempt ``outcome``, and after what delay."""
    if not policy.enabled or not retryable(policy, outcome):
        return RetryVerdict(False, reason="not-retryable")
    if retries_done >= policy.num_retries:
        return RetryVerdict(False, reason="attempts")
    if response_started:
        return RetryVerdict(False, reason="response-started")
    if body is not None and not body.replayable:
        return RetryVerdict(False, reason="body-too-large")
    delay = backoff(retries_done + 1, rng)
    if deadline is not None and now + delay >= deadline:
        return RetryVerdict(False, reason="deadline")
    if not budget.try_withdraw(now):
        return RetryVerdict(False, reason="budget-exhausted")
    return RetryVerdict(True, delay=delay)
