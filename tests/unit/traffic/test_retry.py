"""Retry budget, backoff and the retry decision, with plain values and a fixed clock."""

from __future__ import annotations

import random

from sidecar.retry import BodyBuffer, RetryBudget, backoff, decide
from sidecar.routing import Outcome, RetryPolicy

POLICY = RetryPolicy(3, frozenset({"unavailable"}), frozenset())
FAIL = Outcome(http_status=200, grpc_status=14)


def _decide(budget: RetryBudget, **kw: object) -> str:
    args: dict[str, object] = {"retries_done": 0, "response_started": False, "body": None, "now": 100.0,
                               "deadline": None, "budget": budget, "rng": random.Random(1)}
    outcome = kw.pop("outcome", FAIL)
    args.update(kw)
    v = decide(POLICY, outcome, **args)  # type: ignore[arg-type]
    return "retry" if v.retry else v.reason


def test_budget_is_20_percent_of_calls_plus_10_per_second() -> None:
    budget = RetryBudget(ttl=10)
    for i in range(1000):
        budget.record_call(100 + i / 1000)
    allowed = 0
    while budget.try_withdraw(100.5):
        allowed += 1
    assert allowed == 0.2 * 1000 + 10 * 10 and budget.exhausted == 1
    # the window slides: after ttl the old calls and retries are forgotten
    assert budget.try_withdraw(111.0) and budget.window == (0, 1)


def test_decision_reasons() -> None:
    budget = RetryBudget()
    assert _decide(budget) == "retry"
    assert _decide(budget, outcome=Outcome(http_status=200, grpc_status=13)) == "not-retryable"
    assert _decide(budget, retries_done=3) == "attempts"
    assert _decide(budget, response_started=True) == "response-started"
    big = BodyBuffer(limit=10)
    big.add(b"x" * 11)
    assert _decide(budget, body=big) == "body-too-large"
    assert _decide(budget, deadline=100.0) == "deadline"  # the backoff would end past the deadline
    empty = RetryBudget(ratio=0, min_per_second=0)
    assert _decide(empty) == "budget-exhausted" and empty.exhausted == 1


def test_backoff_is_jittered_and_capped() -> None:
    rng = random.Random(3)
    first = [backoff(1, rng) for _ in range(200)]
    late = [backoff(10, rng) for _ in range(200)]
    assert all(0 <= d < 0.025 for d in first) and len(set(first)) > 100
    assert all(0 <= d < 0.25 for d in late) and max(late) > 0.2


def test_body_buffer_keeps_small_bodies_whole() -> None:
    b = BodyBuffer(limit=8)
    b.add(b"abcd")
    b.add(b"efgh", end=True)
    assert b.replayable and b.complete and b"".join(b.chunks) == b"abcdefgh"
    b.add(b"!")
    assert not b.replayable and b.chunks == []
