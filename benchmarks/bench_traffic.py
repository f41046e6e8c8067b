"""Traffic management's cost per call: a call through a router + splitter + resolver chain, with a retry
policy, passive health checking and a per-caller rate limit configured, against the plain path. Real
processes on loopback: the dev agent, the CA, the policy service, one echo app registered as three
instances — `plain-1` (service `plain`, no config entries beyond its protocol) and `routed-1`,
`routed-2` (service `routed`, meta version v1/v2) — and two callers, `cplain` and `crouted`, each with
one upstream. `routed` has a resolver (subsets v1/v2), a 90/10 splitter, a router (a header route and a
route with `NumRetries = 2`, `RetryOn = ["unavailable"]`, `RequestTimeout = "10s"`), `crouted`'s
service-defaults a `PassiveHealthCheck` and `Limits` (circuit breakers, never reached) for it, and KV
`weft/ratelimits/routed` a (never reached) per-caller limit, so routed calls also take the inbound's
per-call path. The load generator alternates rounds on the two paths (unary, 8 in flight); the CPU
of each path's sidecars (`/proc`) over its calls gives `proxy_cpu_us_per_call` (and, split by sidecar,
`per_sidecar_us_per_call`: where a path's CPU goes), and `ratio` = routed / plain (target: at most 1.15).

    python -m benchmarks traffic        (WEFT_BENCH_SECONDS per round, default 8; WEFT_BENCH_ROUNDS, default 3;
                                         WEFT_BENCH_TRAFFIC_LIMITS=0 leaves the rate-limit document out)
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
    {"Kind": "service-defaults", "Name": "crouted", "UpstreamConfig": {"Overrides": [
        {"Name": "routed", "PassiveHealthCheck": {"MaxFailures": 5, "BaseEjectionTime": "30s"},
         # circuit breakers, never reached: their per-call accounting is part of the routed path's cost
         "Limits": {"MaxConnections": 1000, "MaxPendingRequests": 1000, "MaxConcurrentRequests": 1000}}]}},
    {"Kind": "service-resolver", "Name": "routed", "DefaultSubset": "v1",
     "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"Filter": "Service.Meta.version == v2"}}},
    {"Kind": "service-splitter", "Name": "routed",
     "Splits": [{"Weight": 90, "ServiceSubset": "v1"}, {"Weight": 10, "ServiceSubset": "v2"}]},
    {"Kind": "service-router", "Name": "routed", "Routes": [
        {"Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "1"}]}}, "Destination": {"ServiceSubset": "v2"}},
        {"Match": {"HTTP": {"PathPrefix": "/weft.test.echo.v1.Echo/"}},
         "Destination": {"NumRetries": 2, "RetryOn": ["unavailable"], "RequestTimeout": "10s"}}]},
]

# each path's sidecars: the caller's, then the destination instances'
SIDECARS = {"plain": ("cplain-1", "plain-1"), "routed": ("crouted-1", "routed-1", "routed-2")}


def _setup(m: _Mesh, limits: bool) -> tuple[str, str, dict[str, list[int]]]:
    m.proc("ca", [*WEFT, "ca", "serve", "-dev", "--listen", f"127.0.0.1:{free_port()}"])
    m.proc("policy", [*WEFT, "policy", "serve", "-grpc-addr", f"127.0.0.1:{free_port()}"])
    for dest, src in (("plain", "cplain"), ("routed", "crouted")):
        doc = {"Kind": "service-intentions", "Name": dest, "Sources": [{"Name": src, "Action": "allow"}]}
        m.consul("PUT", f"/v1/kv/weft/intentions/{dest}", json.dumps(doc).encode())
    for entry in ENTRIES:
        assert m.consul("PUT", "/v1/config", entry) is True, entry
    if limits:
        m.consul("PUT", "/v1/kv/weft/ratelimits/routed",
                 json.dumps({"PerCaller": {"RequestsPerSecond": 1_000_000, "RequestsMaxBurst": 1_000_000}}).encode())
    app_port = free_port()
    m.proc("echo", [sys.executable, "-m", "tests.apps.echo", "--port", str(app_port), "--name", "echo"])
    m.register_meta("plain-1", "plain", app_port, free_port(), {})
    m.register_meta("routed-1", "routed", app_port, free_port(), {"version": "v1"})
    m.register_meta("routed-2", "routed", app_port, free_port(), {"version": "v2"})
    plain_local, routed_local = free_port(), free_port()
    m.register_meta("cplain-1", "cplain", free_port(), free_port(), {}, (("plain", plain_local),))
    m.register_meta("crouted-1", "crouted", free_port(), free_port(), {}, (("routed", routed_local),))
    wait_for(lambda: http_ok(f"{m.agent.url}/v1/kv/weft/ca/roots"), timeout=60, what="the CA's roots")
    for sid in ("plain-1", "routed-1", "routed-2", "cplain-1", "crouted-1"):
        m.sidecar(sid)
    wait_for(lambda: all(http_ok(f"http://127.0.0.1:{admin}/ready") for _, admin, _ in m.sidecars.values()),
             timeout=120, interval=0.3, what="sidecars ready")

    def chain_ready() -> bool:
        chain = m.config("crouted-1")["snapshot"]["upstreams"]["routed"]["chain"]
        return bool(chain) and all(t["endpoints"] for t in chain["targets"].values())

    wait_for(chain_ready, timeout=60, interval=0.3, what="crouted's sidecar to know routed's chain")
    pids = {path: [m.sidecars[s][0].pid for s in sids] for path, sids in SIDECARS.items()}
    return f"127.0.0.1:{plain_local}", f"127.0.0.1:{routed_local}", pids


def run() -> dict[str, Any]:
    seconds = float(os.environ.get("WEFT_BENCH_SECONDS", "8"))
    limits = os.environ.get("WEFT_BENCH_TRAFFIC_LIMITS", "1") != "0"
    rounds = int(os.environ.get("WEFT_BENCH_ROUNDS", "3"))
    with tempfile.TemporaryDirectory(prefix="weft-bench-traffic-") as tmp:
        m = _Mesh(agent=DevAgent(), tmp=Path(tmp))
        try:
            plain, routed, pids = _setup(m, limits)
            names = {path: dict(zip(SIDECARS[path], pids[path], strict=True)) for path in pids}
            targets = {"plain": plain, "routed": routed}
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
    figures["per_caller_limit"] = limits
    print(f"   plain  {figures['plain']['proxy_cpu_us_per_call']} us/call, routed "
          f"{figures['routed']['proxy_cpu_us_per_call']} us/call: ratio {figures['ratio']} "
          f"(target <= {TARGET_RATIO})", flush=True)
    return figures


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
