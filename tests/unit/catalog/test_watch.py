"""catalog.watch: Consul's blocking-query client rules, with scripted answers (no sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from catalog.watch import HashPlan, HashWatch, IndexPlan, Watch, WatchPolicy, backoff_delay

P = WatchPolicy(wait=30, min_interval=0.1, backoff_base=0.5, backoff_max=8, jitter=0.5, recovery_wait=1)


# -- the pure plan -----------------------------------------------------------------------------------------------


def test_first_call_sends_zero_then_the_returned_index() -> None:
    plan: IndexPlan[str] = IndexPlan(P)
    assert plan.request() == (0, 30)
    assert plan.on_answer(12, "a") is True          # the first answer is always yielded
    assert plan.request() == (12, 30)


def test_index_zero_is_treated_as_one_and_zero_never_sent_after_an_answer() -> None:
    plan: IndexPlan[str] = IndexPlan(P)
    plan.on_answer(0, "a")
    assert plan.request()[0] == 1
    plan.on_answer(0, "a")
    assert plan.request()[0] == 1


def test_same_index_timeout_does_not_yield() -> None:
    plan: IndexPlan[str] = IndexPlan(P)
    plan.on_answer(5, "a")
    assert plan.on_answer(5, "a") is False
    assert plan.request()[0] == 5
    # an unchanged index means nothing changed (as in Consul's watch plan), whatever the body says
    assert plan.on_answer(5, "b") is False
    assert plan.value == "a"
    assert plan.on_answer(6, "b") is True


def test_higher_index_with_equal_content_is_a_spurious_wakeup() -> None:
    plan: IndexPlan[tuple[str, ...]] = IndexPlan(P)
    plan.on_answer(5, ("x",))
    assert plan.on_answer(9, ("x",)) is False
    assert plan.request()[0] == 9                  # the index still advances
    assert plan.on_answer(11, ("x", "y")) is True
    assert plan.value == ("x", "y")


def test_index_going_backwards_resets_to_zero_then_continues() -> None:
    plan: IndexPlan[str] = IndexPlan(P)
    plan.on_answer(100, "old")
    assert plan.on_answer(7, "new") is True        # a valid, changed answer is still yielded
    assert plan.request()[0] == 0                  # restart the loop
    assert plan.resets == 1
    assert plan.on_answer(7, "new") is False
    assert plan.request()[0] == 7


def test_backwards_with_same_content_does_not_yield() -> None:
    plan: IndexPlan[str] = IndexPlan(P)
    plan.on_answer(100, "v")
    assert plan.on_answer(3, "v") is False
    assert plan.request()[0] == 0


def test_rate_limit_between_call_starts() -> None:
    plan: IndexPlan[str] = IndexPlan(P)
    assert plan.delay(now=10.0) == 0.0              # nothing called yet
    plan.started(10.0)
    plan.on_answer(5, "a")
    assert plan.delay(now=10.02) == pytest.approx(0.08)
    assert plan.delay(now=10.5) == 0.0
    # a server that answers at once with a flapping index still gets at most one call per min_interval
    t = 10.5
    for i in range(20):
        t += plan.delay(t)
        plan.started(t)
        plan.on_answer(6 + (i % 2), "a")
    assert t >= 10.5 + 19 * 0.1 - 1e-9


def test_backoff_grows_exponentially_is_capped_and_jittered() -> None:
    assert backoff_delay(0, P, 0.0) == 0.0
    assert [backoff_delay(n, P, 0.0) for n in range(1, 7)] == [0.5, 1, 2, 4, 8, 8]
    assert backoff_delay(3, P, 0.999) == pytest.approx(2 * (1 - 0.5 * 0.999))
    assert backoff_delay(10_000, P, 0.0) == 8          # no overflow
    lo, hi = backoff_delay(4, P, 0.99), backoff_delay(4, P, 0.0)
    assert 2.0 <= lo < hi == 4.0


def test_errors_back_off_then_first_call_after_error_blocks_briefly() -> None:
    plan: IndexPlan[str] = IndexPlan(P)
    plan.started(0.0)
    plan.on_answer(50, "v")
    assert plan.on_error(now=1.0, u=0.0) == 0.5
    assert plan.delay(now=1.0) == 0.5
    assert plan.on_error(now=1.5, u=0.0) == 1.0
    assert plan.delay(now=2.0) == 0.5
    assert plan.request() == (50, 1)                # keeps the index, short wait to notice a restart
    assert plan.on_answer(50, "v") is False         # same value: nothing new to yield
    assert plan.failures == 0
    assert plan.request() == (50, 30)


def test_first_answer_after_an_error_is_judged_by_content() -> None:
    # a restarted agent with fresh state can answer the very index we hold, with other data
    plan: IndexPlan[str] = IndexPlan(P)
    plan.on_answer(2, "before")
    plan.on_error(now=0.0, u=0.0)
    assert plan.on_answer(2, "after") is True
    assert plan.failures == 0
    assert plan.on_answer(2, "later") is False     # steady state again: unchanged index, no change


def test_hash_plan() -> None:
    plan: HashPlan[str | None] = HashPlan(WatchPolicy(min_interval=0.1, poll_interval=2))
    assert plan.request()[0] == ""
    plan.started(0.0)
    assert plan.on_answer("h1", "a") is True
    assert plan.request()[0] == "h1"
    assert plan.delay(0.05) == pytest.approx(0.05)
    plan.started(1.0)
    assert plan.on_answer("h1", "a") is False
    assert plan.on_answer("h1", "z") is False       # same hash: unchanged
    assert plan.on_answer("h2", "b") is True
    assert plan.on_answer("h3", "b") is False       # new hash, same value: spurious
    plan.started(2.0)
    assert plan.on_answer("", None) is True         # e.g. the service was deregistered (404)
    assert plan.request()[0] == ""
    assert plan.delay(2.5) == pytest.approx(1.5)    # no hash to block on: poll at most every 2s


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="wait"):
        WatchPolicy(wait=601)
    with pytest.raises(ValueError, match="jitter"):
        WatchPolicy(jitter=2)
    with pytest.raises(ValueError, match="min_interval"):
        WatchPolicy(min_interval=-1)


# -- the loop, driven by a scripted fetch -------------------------------------------------------------------------

FAST = WatchPolicy(wait=5, min_interval=0, backoff_base=0.001, backoff_max=0.002, recovery_wait=0.5)


class Script:
    """Answers calls from a list of (index, value) or exceptions; records what was sent."""

    def __init__(self, steps: list[object]) -> None:
        self.steps = list(steps)
        self.sent: list[tuple[object, float]] = []
        self.done = asyncio.Event()

    async def __call__(self, index: Any, wait: float) -> tuple[Any, Any]:
        self.sent.append((index, wait))
        if not self.steps:
            self.done.set()
            await asyncio.sleep(3600)
        step = self.steps.pop(0)
        if isinstance(step, BaseException):
            raise step
        assert isinstance(step, tuple)
        return step


async def collect(watch: Watch[object] | HashWatch[object], n: int) -> list[object]:
    out = []
    async for v in watch:
        out.append(v)
        if len(out) == n:
            break
    return out


async def test_loop_yields_only_changes_and_sends_consul_indexes() -> None:
    script = Script([(3, "a"), (3, "a"), (4, "a"), (9, "b"), (2, "c"), (2, "c"), (5, "d")])
    w: Watch[object] = Watch(script, policy=FAST)
    got = await asyncio.wait_for(collect(w, 4), 5)
    assert got == ["a", "b", "c", "d"]
    assert [i for i, _ in script.sent] == [0, 3, 3, 4, 9, 0, 2]
    assert w.index == 5 and w.healthy and w.last == "d"


async def test_fail_static_keeps_last_value_and_recovers() -> None:
    boom = ConnectionError("refused")
    script = Script([(7, "v1"), boom, boom, boom, (7, "v1"), (8, "v2")])
    w: Watch[object] = Watch(script, policy=FAST)
    assert await asyncio.wait_for(w.first(), 5) == "v1"
    assert w.last_success_time is not None
    nxt = asyncio.ensure_future(w.__anext__())
    await asyncio.sleep(0)
    # while failing: not yielded, last kept, unhealthy with the error
    while len(script.sent) < 3:
        await asyncio.sleep(0.001)
    assert not nxt.done()
    assert w.last == "v1" and not w.healthy and w.last_error is boom
    assert await asyncio.wait_for(nxt, 5) == "v2"
    assert w.healthy and w.last_error is None
    # the index survived the errors, and the first call after them blocked only briefly
    assert script.sent[4] == (7, 0.5)


async def test_close_ends_iteration() -> None:
    script = Script([(1, "a")])
    w: Watch[object] = Watch(script, policy=FAST)
    assert await w.first() == "a"

    async def closer() -> None:
        await script.done.wait()
        w.close()

    task = asyncio.ensure_future(closer())
    # the pending fetch blocks "forever": close() cancels it and the iteration ends
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(w.__anext__(), 5)
    await task
    assert w.last == "a"
    with pytest.raises(StopAsyncIteration):
        await w.__anext__()


async def test_hash_watch_loop() -> None:
    script = Script([("h1", "a"), ("h1", "a"), ("h2", "b")])
    w: HashWatch[object] = HashWatch(script, policy=FAST)
    assert await asyncio.wait_for(collect(w, 2), 5) == ["a", "b"]
    assert [h for h, _ in script.sent] == ["", "h1", "h1"]
    assert w.hash == "h2"
