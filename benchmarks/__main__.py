"""`make bench`: runs every `benchmarks/bench_*.py` and writes `benchmarks/results/latest.json`.

Each module exposes `run() -> dict[str, object]` returning its figures; ratios are computed against
baselines measured in the same run, because these machines are shared and noisy.
Run one with `python -m benchmarks NAME` (e.g. `python -m benchmarks devagent`).
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    names = argv or sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"python": platform.python_version(), "cpus": _cpus(), "platform": platform.platform()},
        "benchmarks": {},
    }
    out = HERE / "results" / "latest.json"
    if argv and out.exists():  # running a subset keeps the other results of the last full run
        results["benchmarks"] = json.loads(out.read_text()).get("benchmarks", {})
    failed = 0
    for name in names:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        print(f"== {name}", flush=True)
        try:
            figures = module.run()
        except Exception as exc:  # one broken benchmark must not hide the others
            failed += 1
            figures = {"error": repr(exc)}
            print(f"   FAILED: {exc!r}", flush=True)
        results["benchmarks"][name] = figures
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"results written to {out.relative_to(HERE.parent)}")
    return 1 if failed else 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
