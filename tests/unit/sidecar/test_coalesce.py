"""Snapshot publishing coalesced as Consul's proxycfg does, with a fake clock."""

from __future__ import annotations

import itertools

import pytest

from sidecar.coalesce import DEFAULT_WINDOW, PublishWindow


class FakeLoop:
    """Feeds changes to a PublishWindow at given times and records when publishes happen, each with
    the last change it carries (the state is 'whole': the latest change at publish time)."""

    def __init__(self, window: PublishWindow) -> None:
        self.window = window
        self.timer: float | None = None
        self.state = 0
        self.published: list[tuple[float, int]] = []
        self.ready = False  # a snapshot has been published

    def run_until(self, now: float) -> None:
        if self.timer is not None and self.timer <= now:
            at, self.timer = self.timer, None
            self.window.fire()
            self.published.append((round(at, 3), self.state))

    def change(self, now: float, state: int, *, complete: bool = True) -> None:
        self.run_until(now)
        self.state = state
        delay = self.window.change(now, published=self.ready)
        if delay == 0.0:
            if complete:
                self.published.append((round(now, 3), state))
                self.ready = True
        elif delay is not None:
            self.timer = now + delay


def test_first_snapshot_at_once_then_one_publish_per_window_with_the_latest_state() -> None:
    loop = FakeLoop(PublishWindow(0.2))
    loop.change(0.0, 1)
    assert loop.published == [(0.0, 1)]  # start-up readiness does not wait
    for i, t in enumerate((1.0, 1.05, 1.1, 1.19), start=2):  # a burst
        loop.change(t, i)
    loop.run_until(1.2)
    assert loop.published == [(0.0, 1), (1.2, 5)]
    loop.change(1.25, 6)  # a change after the publish opens a new window
    loop.change(1.3, 7)
    loop.run_until(2.0)
    assert loop.published == [(0.0, 1), (1.2, 5), (1.45, 7)]


def test_incomplete_states_before_the_first_snapshot_are_tried_at_once() -> None:
    loop = FakeLoop(PublishWindow(0.2))
    loop.change(0.0, 1, complete=False)
    loop.change(0.5, 2, complete=False)
    assert loop.published == [] and not loop.window.pending
    loop.change(0.7, 3)
    assert loop.published == [(0.7, 3)]


def test_publishes_are_at_least_a_window_apart_under_a_steady_stream() -> None:
    loop = FakeLoop(PublishWindow(0.2))
    loop.change(0.0, 0)
    for i in range(1, 200):  # a change every 10 ms for 2 s
        loop.change(i / 100, i)
    loop.run_until(10.0)
    times = [t for t, _ in loop.published]
    assert all(b - a >= 0.2 - 1e-9 for a, b in itertools.pairwise(times))
    assert len(times) <= 1 + 2 / 0.2 + 1
    assert loop.published[-1][1] == 199  # the last state is never lost


def test_no_window_publishes_every_change() -> None:
    window = PublishWindow(0)
    assert window.change(5.0, published=True) == 0.0
    assert not window.pending


def test_the_window_is_checked() -> None:
    assert PublishWindow().window == DEFAULT_WINDOW
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError):
            PublishWindow(bad)
