"""`python -m benchmarks tap`: what an open tap costs the sidecars, per call.

The Weft pair of `benchmarks/weft_pair.py` (real processes on loopback), gRPC unary calls with
100-byte payloads, 32 in flight (`benchmarks/load.py`); proxy CPU per call is read from /proc for
both sidecars of the pair, as in `bench_sidecar`.

- `full_path`: the L7 pair (client -> echol7, whose sidecar authorizes every call on its per-call
  path). Rounds alternate "no tap", "one tap open on each sidecar of the pair, matching every call,
  payloads on (KV weft/tap/<service> {"Payload": true, "MaxBytes": 1024}), read as fast as it comes,
  with the default max_rps (100 calls/s recorded per sidecar, the rest skipped and counted)", and the
  same tap with no cap (max_rps=0: every call recorded), on both sidecars (`tap_all_calls`) and on the
  callee's alone (`one_tap_all_calls`: the one tap `weft tap echol7` opens in this pair, whose sidecar
  is the one that decodes payloads by reflection). `tap_vs_no_tap`, `one_tap_all_calls_vs_no_tap`
  and `tap_all_calls_vs_no_tap` are the ratios of the medians (target at most 1.25).
- `passthrough_pair`: the L4 pair (client -> echo). A tap on the callee's sidecar moves its callers
  from pass-through to the per-call path (so that the tap sees their calls): the ratio there is
  mostly the price of the per-call path, reported for information.
- `no_tap_noise`: two "no tap" rounds of the full path against each other: how far apart two
  identical runs are on this machine, the yardstick for "within noise".
- `inactive_hook_ns_per_call`: the hooks a call meets while nobody taps (an attribute check each),
  timed in process, and as a share of the per-call CPU of the pair.
- `WEFT_BENCH_PROFILE=1`: one more run with a tap on every call of both sidecars of the full path,
  with py-spy on them (`profile_tap_all_calls`: top frames of CPU-using samples, as in bench_sidecar).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import tempfile
import threading
import time
import timeit
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks import weft_pair
from benchmarks.bench_sidecar import Route, _processes, _start_app, measure, profile
from benchmarks.harness import ready_grpc
from sidecar.tap import DEFAULT_MAX_RPS
from tests.support import free_port, wait_for

PAYLOAD_SETTINGS = b'{"Payload": true, "MaxBytes": 1024}'
HOOKS_PER_UNARY_CALL = 8  # tap checks on one h2 unary call through both sidecars (start, data, headers, finish)


class TapReader:
    """One /tap?payload=1 stream read in a thread, as fast as the sidecar sends (a plain socket, so
    that closing it really closes the connection and the sidecar closes the tap)."""

    def __init__(self, admin_port: int, max_rps: float) -> None:
        self.lines = 0
        self.dropped = 0
        self.skipped = 0
        self._sock = socket.create_connection(("127.0.0.1", admin_port), timeout=30)
        self._sock.sendall(f"GET /tap?payload=1&max_rps={max_rps} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        self._file = self._sock.makefile("rb")
        status = self._file.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"/tap answered {status!r}")
        while self._file.readline() not in (b"\r\n", b""):
            pass
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for raw in self._file:
                if raw.startswith(b'{"dropped"'):
                    self.dropped += int(json.loads(raw)["dropped"])
                elif raw.startswith(b'{"skipped"'):
                    self.skipped += int(json.loads(raw)["skipped"])
                else:
                    self.lines += 1
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self._file.close()
        self._sock.close()


def _unary(route: Route, seconds: str) -> float:
    result = measure(route, "unary", route.proxy_pids, "--concurrency", "32", "--duration", seconds)
    return float(result["proxy_cpu_us_per_call"])


def _tapped(stack: Any, services: list[str], route: Route, seconds: str, max_rps: float) -> dict[str, Any]:
    readers = [TapReader(stack.sidecars[s][1], max_rps) for s in services]
    try:
        time.sleep(0.3)  # the sidecars subscribed before answering 200; let the callers' connections move
        cpu = _unary(route, seconds)
    finally:
        for r in readers:
            r.close()
    wait_for(lambda: all(_taps_open(stack, s) == 0 for s in services), timeout=10, what="the taps to close")
    return {"cpu": cpu, "lines": sum(r.lines for r in readers), "dropped": sum(r.dropped for r in readers),
            "skipped": sum(r.skipped for r in readers)}


def _taps_open(stack: Any, service: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.sidecars[service][1]}/config", timeout=10) as resp:
        return int(json.loads(resp.read()).get("taps_open", 0))


def inactive_hook_ns() -> float:
    """Nanoseconds of the checks a call meets while nobody taps (the hub's flag, a record slot)."""
    from sidecar.tap import TapHub

    class Holder:
        __slots__ = ("tap",)

        def __init__(self) -> None:
            self.tap = TapHub()

    h = Holder()
    n = 2_000_000
    seconds = min(timeit.repeat("h.tap.active", globals={"h": h}, number=n, repeat=5))
    return seconds / n * 1e9 * HOOKS_PER_UNARY_CALL


def run() -> dict[str, Any]:
    seconds = os.environ.get("WEFT_BENCH_SECONDS", "4")
    rounds = int(os.environ.get("WEFT_BENCH_ROUNDS", "3"))
    out: dict[str, Any] = {"payload_bytes": 100, "concurrency": 32, "seconds_per_run": float(seconds),
                           "rounds": rounds, "targets": {"tap_vs_no_tap": 1.25}}
    with tempfile.TemporaryDirectory(prefix="weft-bench-tap-") as tmp, _processes() as started:
        workdir = Path(tmp)
        app_port, tcp_port = free_port(), free_port()
        started.append(_start_app("tests.apps.echo", app_port, workdir, "--name", "bench-echo"))
        started.append(_start_app("tests.apps.tcpecho", tcp_port, workdir))
        wait_for(ready_grpc(f"127.0.0.1:{app_port}"), timeout=30, what="echo app")
        stack = weft_pair.Stack(workdir, app_port, tcp_port)
        started.append(stack)
        stack.start()
        for service in ("client", "echo", "echol7"):
            stack._consul("PUT", f"/v1/kv/weft/tap/{service}", PAYLOAD_SETTINGS)
        time.sleep(1.0)  # the sidecars' KV watches pick the settings up
        l7 = Route("weft_l7", stack.l7_target, None, stack.l7_pids)
        l4 = Route("weft", stack.grpc_target, None, stack.grpc_pids)

        # the pass-through pair first (a tap moves its connections to the per-call path for good)
        l4_plain = _unary(l4, seconds)
        l4_tap = _tapped(stack, ["client", "echo"], l4, seconds, 0)
        out["passthrough_pair"] = {
            "no_tap_cpu_us_per_call": l4_plain, "tap_all_calls": l4_tap,
            "tap_all_calls_vs_no_tap": round(l4_tap["cpu"] / l4_plain, 3),
            "note": "the tap also moves the callee's callers from pass-through to the per-call path"}

        plain: list[float] = []
        capped: list[dict[str, Any]] = []
        every: list[dict[str, Any]] = []
        one: list[dict[str, Any]] = []
        for _ in range(rounds):
            plain.append(_unary(l7, seconds))
            capped.append(_tapped(stack, ["client", "echol7"], l7, seconds, DEFAULT_MAX_RPS))
            every.append(_tapped(stack, ["client", "echol7"], l7, seconds, 0))
            one.append(_tapped(stack, ["echol7"], l7, seconds, 0))
        plain.append(_unary(l7, seconds))
        no_tap = statistics.median(plain)

        def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
            return {"cpu_us_per_call": [r["cpu"] for r in runs],
                    "vs_no_tap": round(statistics.median(r["cpu"] for r in runs) / no_tap, 3),
                    "lines": sum(r["lines"] for r in runs), "dropped": sum(r["dropped"] for r in runs),
                    "skipped": sum(r["skipped"] for r in runs)}

        out["full_path"] = {"no_tap_cpu_us_per_call": plain,
                            f"tap_max_rps_{DEFAULT_MAX_RPS:g}": summary(capped), "tap_all_calls": summary(every),
                            "one_tap_all_calls": summary(one)}
        out["no_tap_noise"] = round(max(plain) / min(plain), 3)
        out["tap_vs_no_tap"] = out["full_path"][f"tap_max_rps_{DEFAULT_MAX_RPS:g}"]["vs_no_tap"]
        out["tap_all_calls_vs_no_tap"] = out["full_path"]["tap_all_calls"]["vs_no_tap"]
        out["one_tap_all_calls_vs_no_tap"] = out["full_path"]["one_tap_all_calls"]["vs_no_tap"]
        hook_ns = inactive_hook_ns()
        out["inactive_hook_ns_per_call"] = round(hook_ns, 1)
        out["inactive_hook_share_of_call_cpu"] = round(hook_ns / 1000 / no_tap, 5)
        if os.environ.get("WEFT_BENCH_PROFILE"):
            # where the CPU of a tapped call goes: py-spy on both sidecars, one tap each on every call
            readers = [TapReader(stack.sidecars[s][1], 0) for s in ("client", "echol7")]
            try:
                time.sleep(0.3)
                out["profile_tap_all_calls"] = profile(l7, ["client", "echol7"], workdir, seconds)
            finally:
                for r in readers:
                    r.close()
        out["met"] = {"tap_vs_no_tap": out["tap_vs_no_tap"] <= 1.25,
                      "one_tap_all_calls_vs_no_tap": out["one_tap_all_calls_vs_no_tap"] <= 1.25,
                      "tap_all_calls_vs_no_tap": out["tap_all_calls_vs_no_tap"] <= 1.25}
    print(json.dumps(out, indent=2), flush=True)
    return out
