"""Where a sidecar's memory goes (sidecar.memstats): files to packages, live allocations summed by package."""

from __future__ import annotations

import sysconfig
import tracemalloc
from collections.abc import Callable
from typing import TypeVar

from sidecar import memstats

STDLIB = sysconfig.get_paths()["stdlib"]
T = TypeVar("T")


def test_files_map_to_their_top_level_package() -> None:
    roots = ["/repo"]
    assert memstats.package_of("/venv/lib/python3.11/site-packages/aiohttp/client.py", roots) == "aiohttp"
    assert memstats.package_of("/venv/lib/python3.11/site-packages/six.py", roots) == "six"
    assert memstats.package_of("/venv/lib/python3.11/site-packages/_cffi_backend.cpython-311.so", roots) \
        == "_cffi_backend"
    assert memstats.package_of(f"{STDLIB}/asyncio/events.py", roots) == "stdlib:asyncio"
    assert memstats.package_of(f"{STDLIB}/json/__init__.py", roots) == "stdlib:json"
    assert memstats.package_of("/repo/sidecar/h2_proxy.py", roots) == "sidecar"
    assert memstats.package_of("<frozen importlib._bootstrap>", roots) == "<frozen importlib._bootstrap>"
    assert memstats.package_of("/elsewhere/x.py", roots) == "/elsewhere/x.py"


def _hold() -> list[bytes]:
    return [bytes(1000) for _ in range(2000)]  # about 2 MB, allocated in this file (package "tests")


def _while_tracing(frames: int, measure: Callable[[], T]) -> T:
    """`measure()` while about 2 MB allocated here are live and traced with `frames` frames."""
    tracemalloc.start(frames)
    try:
        held = _hold()
        out = measure()
        assert len(held) == 2000
        return out
    finally:
        tracemalloc.stop()


def test_live_allocations_are_summed_by_package() -> None:
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    totals = memstats.by_package(_while_tracing(8, tracemalloc.take_snapshot), [root])
    assert totals["tests"] >= 2000 * 1000
    assert list(totals.values()) == sorted(totals.values(), reverse=True)


def test_report_without_tracing_says_how_to_turn_it_on() -> None:
    assert not tracemalloc.is_tracing()
    out = memstats.report()
    assert out["rss_mb"] > 0 and "PYTHONTRACEMALLOC" in out["tracemalloc"]


def test_report_while_tracing_lists_packages() -> None:
    out = _while_tracing(4, memstats.report)
    assert out["traced_mb"] >= 2.0 and len(out["by_package_mb"]) <= memstats.TOP + 1
