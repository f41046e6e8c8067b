"""What the benchmarks share: CPU and memory of processes read from /proc, the load generator run as
its own process (`benchmarks.load`), and a readiness check for a gRPC path.

A module of its own so that the benchmarks (`bench_sidecar`, `weft_pair`, `bench_limits`,
`bench_tap`, `bench_traffic`) import it instead of each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tests.support import REPO

PY = sys.executable
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


# -- /proc ------------------------------------------------------------------------------------------

def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime+stime of these processes and their live descendants, in seconds."""
    ticks = 0
    for root in pids:
        for p in _descendants(root):
            with contextlib.suppress(OSError), open(f"/proc/{p}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return ticks / _CLK_TCK


def rss_mb(pid: int) -> float:
    """Resident set size in MB of 10^6 bytes (the target's unit; 80 MB = 76.3 MiB)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 1e6


def memory_breakdown_mb(pid: int) -> dict[str, float]:
    """RSS split from /proc/<pid>/smaps_rollup: private (USS) vs shared clean (libraries other processes share).

    In MB of 10^6 bytes like `rss_mb`, plus `rss_mib` (2^20 bytes, what top and ps call MB).
    """
    fields: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[key] = int(parts[0])
    if not fields:
        return {}
    def mb(kib: int) -> float:
        return round(kib * 1024 / 1e6, 1)
    return {"rss_mb": mb(fields.get("Rss", 0)), "rss_mib": round(fields.get("Rss", 0) / 1024, 1),
            "pss_mb": mb(fields.get("Pss", 0)),
            "private_mb": mb(fields.get("Private_Dirty", 0) + fields.get("Private_Clean", 0)),
            "shared_clean_mb": mb(fields.get("Shared_Clean", 0))}


# -- load -------------------------------------------------------------------------------------------

def load(mode: str, targets: Sequence[str], *extra: str, timeout: float = 300) -> dict[str, Any]:
    args = [PY, "-m", "benchmarks.load", mode, *(a for t in targets for a in ("--target", t)), *extra]
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({' '.join(args[3:])}):\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))



def ready_grpc(target: str) -> Callable[[], bool]:
    """A check for `wait_for`: one echo call through `target` succeeds."""
    def check() -> bool:
        import grpc

        from tests.apps.echo import echo_pb2, echo_pb2_grpc

        with grpc.insecure_channel(target) as channel:
            echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(payload=b"ping"), timeout=2)  # type: ignore[no-untyped-call]
        return True
    return check
