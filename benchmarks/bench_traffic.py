"""Traffic management's cost per call: a call through a router + splitter + resolver chain, with a retry
policy, a route timeout, passive health checking and circuit-breaker limits configured, against the plain
path. Real processes on loopback: the dev agent, the CA, the policy service, one echo app registered as
two instances of each destination service, and one caller per path, each with one upstream:

- `plain`: `cplain` -> `plain-1`, `plain-2` (no config entries beyond the protocol; the default balancer);
- `routed`: `crouted` -> `routed-1`, `routed-2` (meta version v1/v2). `routed` has a resolver (subsets
  v1/v2), a 50/50 splitter and a router (a header route, and a route with `NumRetries = 2`,
  `RetryOn = ["unavailable"]`, `RequestTimeout = "10s"`); `crouted`'s service-defaults give it a
  `PassiveHealthCheck` and `Limits` (circuit breakers, never reached);
- `limited`: `climited` -> `limited-1`, `limited-2` (no chain), with KV `weft/ratelimits/limited` a
  per-caller limit that is never reached, so its calls take the destination's per-call path
  (issue 10, item 6, by design); `limited_ratio` is its cost against the plain path, with no target
  (`WEFT_BENCH_TRAFFIC_LIMITS=0` leaves this path out).

Every path spreads its calls evenly over two instances, so that `ratio` measures the chain, not a second
connection's smaller writes or a second instance's background work. Until 2026-12-05 the plain path had
one instance and the split was 90/10: ratio 1.22 at 23:13 UTC that day, and the plain caller's sidecar
alone cost 141 us/call with its one upstream connection against 148-156 with two (fewer frames per TLS
write). The load generator alternates rounds over the paths
(unary, 8 in flight); the CPU of each path's sidecars (`/proc`) over its calls gives
`proxy_cpu_us_per_call` (and, split by sidecar, `per_sidecar_us_per_call`: where a path's CPU goes), and
`ratio` = routed / plain (target: at most 1.15).

    python -m benchmarks traffic        (WEFT_BENCH_SECONDS per round, default 8; WEFT_BENCH_ROUNDS, default 3;
                                         WEFT_BENCH_TRAFFIC_LIMITS=0 leaves the limited path out)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import cpu_seconds, load
from tests.integration.sidecar.test_mesh import Mesh
from tests.support import WEFT, DevAgent, free_port, http_ok, wait_for

TARGET_RATIO = 1.15


class _Mesh(Mesh):
    """The integration tests' process mesh, with a register that takes meta and quiet sidecars."""

    def register_meta(self, sid: str, name: str, port: int, public: int, meta: dict[str, str],
                      upstreams: tuple[tuple[str, int], ...] = ()) -> None:
        self.consul("PUT", "/v1/agent/service/register", {
            "ID": sid, "Name": name, "Address": "127.0.0.1", "Port": port, "Meta": {"protocol": "grpc", **meta},
            "Connect": {"SidecarService": {"Port": public, "Proxy": {"Upstreams": [
                {"DestinationName": d, "LocalBindPort": p} for d, p in upstreams]}}}})

    def sidecar(self, sid: str) -> None:
        admin = free_port()
        proc = self.proc(f"sidecar-{sid}", [*WEFT, "sidecar", "--sidecar-for", sid, "--admin-port", str(admin),
                                            "--bind", "127.0.0.1", "--log-level", "warning"])
        self.sidecars[sid] = (proc, admin, 0)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.agent.stop()


ENTRIES: list[dict[str, Any]] = [
    {"Kind": "service-defaults", "Name": "plain", "Protocol": "grpc"},
    {"Kind": "service-defaults", "Name": "routed", "Protocol": "grpc"},
    {"Kind": "service-defaults", "Name": "limited", "Protocol": "grpc"},
    {"Kind": "service-defaults", "Name": "crouted", "UpstreamConfig": {"Overrides": [
        {"Name": "routed", "PassiveHealthCheck": {"MaxFailures": 5, "BaseEjectionTime": "30s"},
         # circuit breakers, never reached: their per-call accounting is part of the routed path's cost
         "Limits": {"MaxConnections": 1000, "MaxPendingRequests": 1000, "MaxConcurrentRequests": 1000}}]}},
    {"Kind": "service-resolver", "Name": "routed", "DefaultSubset": "v1",
     "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"Filter": "Service.Meta.version == v2"}}},
    {"Kind": "service-splitter", "Name": "routed",
     "Splits": [{"Weight": 50, "ServiceSubset": "v1"}, {"Weight": 50, "ServiceSubset": "v2"}]},
    {"Kind": "service-router", "Name": "routed", "Routes": [
        {"Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "1"}]}}, "Destination": {"ServiceSubset": "v2"}},
        {"Match": {"HTTP": {"PathPrefix": "/weft.test.echo.v1.Echo/"}},
         "Destination": {"NumRetries": 2, "RetryOn": ["unavailable"], "RequestTimeout": "10s"}}]},
]

# each path's sidecars: the caller's, then the destination instances'; the path is the destination's name
SIDECARS = {"plain": ("cplain-1", "plain-1", "plain-2"), "routed": ("crouted-1", "routed-1", "routed-2"),
            "limited": ("climited-1", "limited-1", "limited-2")}


def _setup(m: _Mesh, with_limited: bool) -> tuple[dict[str, str], dict[str, list[int]]]:
    """The mesh of the module docstring; returns each path's local target and its sidecars' pids."""
    m.proc("ca", [*WEFT, "ca", "serve", "-dev", "--listen", f"127.0.0.1:{free_port()}"])
    m.proc("policy", [*WEFT, "policy", "serve", "-grpc-addr", f"127.0.0.1:{free_port()}"])
    paths = [p for p in SIDECARS if with_limited or p != "limited"]
    for dest in paths:
        doc = {"Kind": "service-intentions", "Name": dest, "Sources": [{"Name": f"c{dest}", "Action": "allow"}]}
        m.consul("PUT", f"/v1/kv/weft/intentions/{dest}", json.dumps(doc).encode())
    for entry in ENTRIES:
        assert m.consul("PUT", "/v1/config", entry) is True, entry
    if with_limited:
        m.consul("PUT", "/v1/kv/weft/ratelimits/limited",
                 json.dumps({"PerCaller": {"RequestsPerSecond": 1_000_000, "RequestsMaxBurst": 1_000_000}}).encode())
    app_port = free_port()
    m.proc("echo", [sys.executable, "-m", "tests.apps.echo", "--port", str(app_port), "--name", "echo"])
    local: dict[str, str] = {}
    for path in paths:
        caller, *instances = SIDECARS[path]
        for n, sid in enumerate(instances, 1):
            m.register_meta(sid, path, app_port, free_port(), {"version": f"v{n}"})
        port = free_port()
        m.register_meta(caller, caller.rsplit("-", 1)[0], free_port(), free_port(), {}, ((path, port),))
        local[path] = f"127.0.0.1:{port}"
    wait_for(lambda: http_ok(f"{m.agent.url}/v1/kv/weft/ca/roots"), timeout=60, what="the CA's roots")
    for path in paths:
        for sid in SIDECARS[path]:
            m.sidecar(sid)
    wait_for(lambda: all(http_ok(f"http://127.0.0.1:{admin}/ready") for _, admin, _ in m.sidecars.values()),
             timeout=120, interval=0.3, what="sidecars ready")

    def chain_ready() -> bool:
        chain = m.config("crouted-1")["snapshot"]["upstreams"]["routed"]["chain"]
        return bool(chain) and all(t["endpoints"] for t in chain["targets"].values())

    wait_for(chain_ready, timeout=60, interval=0.3, what="crouted's sidecar to know routed's chain")
    for path in paths:  # every unrouted caller knows both instances of its upstream before the first round
        if path == "routed":
            continue
        caller = SIDECARS[path][0]
        wait_for(lambda c=caller, p=path: len(m.config(c)["snapshot"]["upstreams"][p]["endpoints"]) == 2,  # type: ignore[misc]
                 timeout=60, interval=0.3, what=f"{caller}'s sidecar to know both instances of {path}")
    pids = {path: [m.sidecars[s][0].pid for s in SIDECARS[path]] for path in paths}
    return local, pids


def run() -> dict[str, Any]:
    seconds = float(os.environ.get("WEFT_BENCH_SECONDS", "8"))
    with_limited = os.environ.get("WEFT_BENCH_TRAFFIC_LIMITS", "1") != "0"
    rounds = int(os.environ.get("WEFT_BENCH_ROUNDS", "3"))
    with tempfile.TemporaryDirectory(prefix="weft-bench-traffic-") as tmp:
        m = _Mesh(agent=DevAgent(), tmp=Path(tmp))
        try:
            targets, pids = _setup(m, with_limited)
            names = {path: dict(zip(SIDECARS[path], pids[path], strict=True)) for path in pids}
            per_path: dict[str, dict[str, float]] = {p: {"cpu": 0.0, "calls": 0.0, "errors": 0.0} for p in targets}
            p50: dict[str, list[float]] = {p: [] for p in targets}
            per_process: dict[str, dict[str, float]] = {p: {} for p in targets}  # sidecar -> CPU seconds
            for _ in range(rounds):
                for path, target in targets.items():
                    before = {name: cpu_seconds([pid]) for name, pid in names[path].items()}
                    result = load("unary", [target], "--duration", str(seconds), "--concurrency", "8")
                    for name, pid in names[path].items():
                        used = cpu_seconds([pid]) - before[name]
                        per_process[path][name] = per_process[path].get(name, 0.0) + used
                        per_path[path]["cpu"] += used
                    per_path[path]["calls"] += result["calls_total"]
                    per_path[path]["errors"] += result["errors"]
                    p50[path].append(result["p50_ms"])
            shown = m.config("crouted-1").get("traffic", {}).get("routed", {})
        finally:
            m.stop()
    figures: dict[str, Any] = {}
    for path in targets:
        calls = max(per_path[path]["calls"], 1)
        figures[path] = {"calls": int(per_path[path]["calls"]), "errors": int(per_path[path]["errors"]),
                         "proxy_cpu_us_per_call": round(per_path[path]["cpu"] / calls * 1e6, 1),
                         "p50_ms": round(sorted(p50[path])[len(p50[path]) // 2], 3),
                         # where the CPU goes (per call of the path): the caller's sidecar, each instance's
                         "per_sidecar_us_per_call": {name: round(cpu / calls * 1e6, 1)
                                                     for name, cpu in per_process[path].items()}}
    ratio = figures["routed"]["proxy_cpu_us_per_call"] / max(figures["plain"]["proxy_cpu_us_per_call"], 1e-9)
    figures["ratio"] = round(ratio, 3)
    figures["target_ratio"] = TARGET_RATIO
    figures["met"] = ratio <= TARGET_RATIO
    figures["routed_splits_seen"] = shown.get("splits")
    line = (f"   plain  {figures['plain']['proxy_cpu_us_per_call']} us/call, routed "
            f"{figures['routed']['proxy_cpu_us_per_call']} us/call: ratio {figures['ratio']} "
            f"(target <= {TARGET_RATIO})")
    if "limited" in figures:
        figures["limited_ratio"] = round(
            figures["limited"]["proxy_cpu_us_per_call"] / max(figures["plain"]["proxy_cpu_us_per_call"], 1e-9), 3)
        line += (f"; per-caller rate limit {figures['limited']['proxy_cpu_us_per_call']} us/call: "
                 f"ratio {figures['limited_ratio']} (no target: the destination's per-call path)")
    print(line, flush=True)
    return figures


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
