"""Where a sidecar's memory goes: RSS from /proc, and Python's allocations by top-level package.

The admin API's ``/memory`` answers with `report()`; `make bench` reads it from a sidecar started
with ``PYTHONTRACEMALLOC=N`` (tracing costs memory and time, so it is off unless asked for that way).

Attribution: each live allocation counts to the top-level package of the innermost frame of its
traceback that is not the import machinery. Allocations while a module's body runs count to that
module's package; the code objects unmarshalled for a module count to the package whose `import`
statement loaded it (the module's own frame does not exist yet then).
"""

from __future__ import annotations

import os
import sys
import sysconfig
import tracemalloc
from collections.abc import Iterable
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STDLIB = sysconfig.get_paths()["stdlib"]
TOP = 25  # packages listed by name; the rest are summed as "(other)"


def rss_bytes() -> int:
    """This process's resident set size (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def package_of(filename: str, roots: Iterable[str]) -> str:
    """The top-level package (or stdlib module) a source file belongs to."""
    if filename.startswith("<"):
        return filename  # <frozen ...>, <string>, <unknown>
    marker = "site-packages/"
    at = filename.rfind(marker)
    if at >= 0:
        return filename[at + len(marker):].split("/", 1)[0].removesuffix(".py").split(".", 1)[0]
    if filename.startswith(_STDLIB + "/"):
        return "stdlib:" + filename[len(_STDLIB) + 1:].split("/", 1)[0].removesuffix(".py")
    for root in roots:
        if root and filename.startswith(root + "/"):
            return filename[len(root) + 1:].split("/", 1)[0].removesuffix(".py")
    return filename


def by_package(snapshot: tracemalloc.Snapshot, roots: Iterable[str] = ()) -> dict[str, int]:
    """Bytes of live allocations per package, largest first (see the module docstring)."""
    roots = [r.rstrip("/") for r in roots]
    totals: dict[str, int] = {}
    packages: dict[str, str] = {}  # filename -> package, computed once per file
    raw = getattr(snapshot.traces, "_traces", None)  # CPython's (domain, size, frames newest first, ...)
    if raw is None:
        raw = [(0, t.size, tuple((f.filename, f.lineno) for f in reversed(t.traceback))) for t in snapshot.traces]
    # no allocation per trace below: tracemalloc is tracing this loop too, and would make it crawl
    for trace in raw:
        key = "<import machinery>"
        for frame in trace[2]:  # newest first
            filename = frame[0]
            if not filename.startswith("<frozen"):
                key = packages.get(filename) or packages.setdefault(filename, package_of(filename, roots))
                break
        totals[key] = totals.get(key, 0) + trace[1]
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def report() -> dict[str, Any]:
    """RSS, and when tracemalloc traces, the traced total and the top packages (MB of 10^6 bytes)."""
    out: dict[str, Any] = {"rss_mb": round(rss_bytes() / 1e6, 1)}
    if not tracemalloc.is_tracing():
        out["tracemalloc"] = "off: start the sidecar with PYTHONTRACEMALLOC=16 for a breakdown by package"
        return out
    snapshot = tracemalloc.take_snapshot()
    packages = by_package(snapshot, [p for p in sys.path if p])
    top = list(packages.items())[:TOP]
    rest = sum(packages.values()) - sum(v for _, v in top)
    out["traced_mb"] = round(sum(packages.values()) / 1e6, 2)
    out["tracemalloc_overhead_mb"] = round(tracemalloc.get_tracemalloc_memory() / 1e6, 1)
    out["by_package_mb"] = {k: round(v / 1e6, 3) for k, v in top} | ({"(other)": round(rest / 1e6, 3)} if rest else {})
    return out
