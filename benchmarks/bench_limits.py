"""What the limits of issue 9 cost: the sidecar pair's CPU per call now vs the last release, same run.

The last release (``WEFT_BENCH_RELEASE``, default ``ee2a015``, the commit before any hardening) is
extracted with ``git archive`` into a temporary directory at run time, and its sidecars run from
there (``python -m weft.cli sidecar`` with that directory as the working directory, so its own
packages are imported first) next to the current ones, in one mesh (dev agent, CA and policy
service of the current tree), in front of the same echo app, under the same load:

- ``l4``: client sidecar (outbound, parses the app's HTTP/2) -> mTLS -> server sidecar, which passes
  the L4-allowed connection through to the app (now with the frame guard);
- ``l7``: the same to a service whose intention allows the client by an L7 permission, so that the
  server sidecar parses and authorizes every call on its full path.

Each path is run ``WEFT_BENCH_ROUNDS`` times (default 5), ``WEFT_BENCH_SECONDS`` each (default 5):
one load generator calls both variants' client sidecars at once, its 64 workers taking the two
targets in turn (unary, about 32 calls in flight per pair), and counts the calls it made to each. CPU
is utime+stime from /proc of each sidecar, before and after the run, divided by that variant's
calls. Ratios (current / release):

- ``pair_cpu_ratio`` (l4 path, client + server sidecar): target <= 1.05 (issue 9 item 7);
- ``passthrough_cpu_ratio``: the server sidecar alone on the l4 path, i.e. the pass-through's cost
  with its frame guard vs the release's blind pass-through;
- ``outbound_cpu_ratio``: the client sidecar alone; ``l7_pair_cpu_ratio``: the full path.

Each ratio is the median over the rounds of that round's ratio. Why both variants in one run: on
this 2-core machine, shared with other tenants, CPU per call moves by 10-15 % from one run to the next
(their load, and how a closed loop bunches calls into reads and writes, which it settles into
differently each time). Measured one after the other, current and release met different moments, and
the ratio of each side's lowest round (this benchmark's figure until 2026-12-06, kept as
``ratios_least_disturbed``) divided two extremes taken at different times: the same code measured
1.008 to 1.135 in six runs. Loaded together, both variants meet the same moments and the same
bunching. The table shows each variant's least disturbed round.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import weft_pair
from benchmarks.bench_sidecar import _processes, _start_app
from benchmarks.harness import cpu_seconds, load, ready_grpc
from tests.support import REPO, WEFT, DevAgent, Proc, free_port, wait_for

RELEASE = "ee2a015"
TARGET_RATIO = 1.05
CONCURRENCY_PER_PAIR = 32
VARIANTS = ("current", "release")


def extract(commit: str, into: Path) -> Path:
    """The tree of ``commit`` (of this repository) as plain files under ``into``."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit],
                             capture_output=True, timeout=120)
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {commit}: {archive.stderr.decode(errors='replace')[-500:]}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True, timeout=120)
    check = subprocess.run([sys.executable, "-c", "import sidecar; print(sidecar.__file__)"], cwd=str(into),
                           capture_output=True, text=True, timeout=60)
    if not check.stdout.strip().startswith(str(into)):
        raise RuntimeError(f"python started in {into} imports the sidecar from {check.stdout.strip()!r}, "
                           "not from the extracted release: it would measure the current code twice")
    return into


class Pairs(weft_pair.Stack):
    """Two sidecar pairs per path, one running the current tree and one the release's."""

    def __init__(self, workdir: Path, app_port: int, release_dir: Path) -> None:
        super().__init__(workdir, app_port, 0)
        self.release_dir = release_dir
        self.local: dict[tuple[str, str], int] = {}  # (variant, path) -> client sidecar's local port

    def _sidecar_from(self, service_id: str, cwd: Path | None) -> None:
        admin = free_port()
        proc = Proc([*WEFT, "sidecar", "--sidecar-for", service_id, "--admin-port", str(admin),
                     "--public-port", str(self.public_ports[service_id]), "--ca-addr", self.ca_addr],
                    env=self.env, log=self.workdir / f"sidecar-{service_id}.log", cwd=cwd)
        self.procs.append(proc)
        self.sidecars[service_id] = (proc, admin)

    def start(self) -> None:
        self.agent = DevAgent()
        self.ca_addr = f"127.0.0.1:{free_port()}"
        self._proc("ca", [*WEFT, "ca", "serve", "-dev", "--listen", self.ca_addr])
        self._proc("policy", [*WEFT, "policy", "serve", "-grpc-addr", f"127.0.0.1:{free_port()}"])
        ids = []
        for variant in VARIANTS:
            echo, echol7, client = f"echo-{variant}", f"echol7-{variant}", f"client-{variant}"
            l4_local, l7_local = free_port(), free_port()
            self.local[(variant, "l4")] = l4_local
            self.local[(variant, "l7")] = l7_local
            self._register(echo, self.app_port, "grpc", [])
            self._register(echol7, self.app_port, "grpc", [])
            self._register(client, free_port(), "grpc", [(echo, l4_local), (echol7, l7_local)])
            self._allow(client, echo)
            self._allow(client, echol7, l7_prefix="/weft.test.echo.v1.Echo/")
            cwd = self.release_dir if variant == "release" else None
            for sid in (echo, echol7, client):
                self._sidecar_from(sid, cwd)
                ids.append(sid)
        self._wait_ready(ids, timeout=120)
        for port in self.local.values():
            wait_for(ready_grpc(f"127.0.0.1:{port}"), timeout=60, interval=0.5, what=f"a call through :{port}")

    def pids(self, variant: str, path: str) -> tuple[int, int]:
        """(client sidecar, server sidecar) of one pair."""
        server = f"echo-{variant}" if path == "l4" else f"echol7-{variant}"
        return self.sidecars[f"client-{variant}"][0].pid, self.sidecars[server][0].pid


def measure(pairs: Pairs, path: str, seconds: str, order: tuple[str, ...] = VARIANTS) -> dict[str, dict[str, Any]]:
    """One load run over both variants of a path at once: per variant, CPU per call of each sidecar.

    The load generator's workers take the two targets in turn (64 in flight, about 32 per pair), so
    both pairs carry the same calls at the same moments: what the machine's other tenants do, and how
    the calls bunch into reads and writes, falls on both alike.
    """
    targets = {v: f"127.0.0.1:{pairs.local[(v, path)]}" for v in order}
    pids = {v: pairs.pids(v, path) for v in order}
    before = {v: (cpu_seconds([pids[v][0]]), cpu_seconds([pids[v][1]])) for v in order}
    result = load("unary", [targets[v] for v in order], "--concurrency", str(CONCURRENCY_PER_PAIR * len(order)),
                  "--duration", seconds)
    after = {v: (cpu_seconds([pids[v][0]]), cpu_seconds([pids[v][1]])) for v in order}
    out: dict[str, dict[str, Any]] = {}
    total = max(int(result["calls_total"]), 1)
    for v in order:
        calls = max(int(result["calls_by_target"][targets[v]]), 1)
        used = after[v][0] - before[v][0], after[v][1] - before[v][1]
        out[v] = {"rps": round(float(result["rps"]) * calls / total, 1), "p50_ms_both": result["p50_ms"],
                  "errors": result.get("errors", 0),
                  "client_cpu_us_per_call": round(used[0] / calls * 1e6, 1),
                  "server_cpu_us_per_call": round(used[1] / calls * 1e6, 1),
                  "pair_cpu_us_per_call": round((used[0] + used[1]) / calls * 1e6, 1)}
    return out


def least_disturbed(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each CPU figure's lowest value over the rounds (noise only adds), the rest from the best pair run."""
    best = dict(min(runs, key=lambda r: float(r["pair_cpu_us_per_call"])))
    for key in ("client_cpu_us_per_call", "server_cpu_us_per_call"):
        best[key] = min(float(r[key]) for r in runs)
    best["rounds_pair_cpu_us_per_call"] = [r["pair_cpu_us_per_call"] for r in runs]
    return best


def ratio(a: Any, b: Any) -> float | None:
    return round(float(a) / float(b), 3) if a is not None and b else None


def paired_ratios(current: list[dict[str, Any]], release: list[dict[str, Any]], key: str) -> list[float]:
    """Round by round, current / release of one figure (the two runs of a round are back to back)."""
    return [float(c[key]) / float(r[key]) for c, r in zip(current, release, strict=True) if float(r[key])]


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def run() -> dict[str, Any]:
    seconds = os.environ.get("WEFT_BENCH_SECONDS", "5")
    rounds = int(os.environ.get("WEFT_BENCH_ROUNDS", "5"))
    release = os.environ.get("WEFT_BENCH_RELEASE", RELEASE)
    out: dict[str, Any] = {"release": release, "seconds_per_run": float(seconds), "rounds": rounds,
                           "load": f"unary, 100-byte payload, {CONCURRENCY_PER_PAIR} calls in flight per pair, "
                                   "both pairs of a path loaded at once"}
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    out["current"] = head.stdout.strip() or "unknown"
    with tempfile.TemporaryDirectory(prefix="weft-bench-limits-") as tmp, _processes() as started:
        workdir = Path(tmp)
        release_dir = extract(release, workdir / "release")
        app_port = free_port()
        started.append(_start_app("tests.apps.echo", app_port, workdir, "--name", "bench-echo"))
        wait_for(ready_grpc(f"127.0.0.1:{app_port}"), timeout=30, what="echo app")
        pairs = Pairs(workdir, app_port, release_dir)
        started.append(pairs)
        t0 = time.monotonic()
        pairs.start()
        out["startup_seconds"] = round(time.monotonic() - t0, 1)
        for path in ("l4", "l7"):  # a first, discarded run: start-up work and cold caches out of the way
            measure(pairs, path, "1")
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in range(rounds):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]  # which target the first worker takes
            for path in ("l4", "l7"):
                for variant, figures_of_run in measure(pairs, path, seconds, order).items():
                    runs.setdefault((variant, path), []).append(figures_of_run)
    figures = {f"{path}_{variant}": least_disturbed(rs) for (variant, path), rs in runs.items()}
    out["paths"] = figures
    cur, rel = figures["l4_current"], figures["l4_release"]
    out["ratios_least_disturbed"] = {
        "pair_cpu_ratio": ratio(cur["pair_cpu_us_per_call"], rel["pair_cpu_us_per_call"]),
        "passthrough_cpu_ratio": ratio(cur["server_cpu_us_per_call"], rel["server_cpu_us_per_call"]),
        "outbound_cpu_ratio": ratio(cur["client_cpu_us_per_call"], rel["client_cpu_us_per_call"]),
        "l7_pair_cpu_ratio": ratio(figures["l7_current"]["pair_cpu_us_per_call"],
                                   figures["l7_release"]["pair_cpu_us_per_call"]),
    }
    rounds_of = {name: paired_ratios(runs[("current", path)], runs[("release", path)], key)
                 for name, path, key in (("pair_cpu_ratio", "l4", "pair_cpu_us_per_call"),
                                         ("passthrough_cpu_ratio", "l4", "server_cpu_us_per_call"),
                                         ("outbound_cpu_ratio", "l4", "client_cpu_us_per_call"),
                                         ("l7_pair_cpu_ratio", "l7", "pair_cpu_us_per_call"))}
    out["ratios_by_round"] = {name: [round(v, 3) for v in values] for name, values in rounds_of.items()}
    out["ratios"] = {name: median(values) for name, values in rounds_of.items()}
    pair = out["ratios"]["pair_cpu_ratio"]
    out["targets"] = {"pair_cpu_ratio_vs_release": {"value": pair, "target": f"<= {TARGET_RATIO}",
                                                    "met": None if pair is None else pair <= TARGET_RATIO}}
    print(table(out))
    return out


def table(out: dict[str, Any]) -> str:
    lines = [f"current {out['current']} vs release {out['release']} ({out['load']}, {out['rounds']} rounds of "
             f"{out['seconds_per_run']:g} s)",
             f"{'path':<16} {'rps':>8} {'client us':>10} {'server us':>10} {'pair us':>9}  (least disturbed round)"]
    for name, f in out["paths"].items():
        lines.append(f"{name:<16} {f['rps']!s:>8} {f['client_cpu_us_per_call']!s:>10} "
                     f"{f['server_cpu_us_per_call']!s:>10} {f['pair_cpu_us_per_call']!s:>9}")
    lines.append(f"{'ratio (current/release)':<24} {'median':>7} {'rounds':<40} least disturbed")
    for name, value in out["ratios"].items():
        by_round = " ".join(f"{v:.3f}" for v in out["ratios_by_round"][name])
        lines.append(f"{name:<24} {value!s:>7} {by_round:<40} {out['ratios_least_disturbed'][name]}")
    t = out["targets"]["pair_cpu_ratio_vs_release"]
    lines.append(f"target pair CPU per call vs release {t['target']}: {t['value']} "
                 f"({ {True: 'met', False: 'NOT met', None: 'n/a'}[t['met']] })")
    return "\n".join(lines)
