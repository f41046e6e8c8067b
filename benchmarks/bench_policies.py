"""Policy benchmarks: compile time, evaluator throughput, source-change-to-compiled-key latency.

* compile: 10,000 intentions over 1,000 destinations (10 sources each, a tenth of them L7, plus
  wildcard-destination rules), against a same-run baseline of just ``json.loads`` of the same
  documents.
* evaluate: decisions per second on one core for a table with 1,000 sources (L4 by name, L4 by
  SPIFFE ID, L7 gRPC and HTTP), against a same-run baseline of a bare dict lookup in the same loop.
  The target is >= 200,000 decisions/s.
* latency: a dev agent and ``weft policy serve`` as real processes; time from the PUT of a KV
  intentions document to the compiled key changing (seen with a blocking query), against a same-run
  baseline of a plain KV PUT seen by a blocking query on the same agent.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.error
import urllib.request
from typing import Any

from policies.compile import Compiler, Document
from policies.evaluate import authorize
from policies.model import TCP, CompiledTable, GrpcRequest, HttpRequest

N_DEST = 1000
N_PER_DEST = 10


def _documents() -> list[Document]:
    docs = []
    for d in range(N_DEST):
        sources: list[dict[str, Any]] = []
        for s in range(N_PER_DEST):
            name = f"svc-{(d * 7 + s * 13) % 2000}"
            if s == 0:
                sources.append({"Name": name, "Permissions": [
                    {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
                    {"Action": "allow", "HTTP": {"PathPrefix": "/pkg.Svc/", "Methods": ["POST"]}}]})
            else:
                sources.append({"Name": name, "Action": "allow" if s % 3 else "deny"})
        docs.append(Document.kv(f"weft/intentions/dest-{d}",
                                json.dumps({"Kind": "service-intentions", "Name": f"dest-{d}", "Sources": sources})))
    docs.append(Document.native({"Kind": "service-intentions", "Name": "*",
                                 "Sources": [{"Name": "monitor", "Action": "allow"}, {"Name": "*", "Action": "deny"}]}))
    return docs


def bench_compile() -> dict[str, Any]:
    docs = _documents()
    intentions = N_DEST * N_PER_DEST + 2
    t0 = time.perf_counter()
    for d in docs:
        json.loads(d.body) if isinstance(d.body, str) else d.body
    baseline = time.perf_counter() - t0
    compiler = Compiler("deny")
    t0 = time.perf_counter()
    result = compiler.compile(docs)
    compile_s = time.perf_counter() - t0
    assert not result.errors and len(result.tables) == N_DEST + 1
    # what the policy service does on a change to one destination's document: compile all again
    docs[0] = Document.kv(docs[0].ref, json.dumps({"Kind": "service-intentions", "Name": "dest-0",
                                                   "Sources": [{"Name": "svc-1", "Action": "allow"}]}))
    t0 = time.perf_counter()
    again = compiler.compile(docs)
    recompile_s = time.perf_counter() - t0
    assert again.tables["dest-0"] != result.tables["dest-0"]
    t0 = time.perf_counter()
    texts = [t.dumps() for t in result.tables.values()]
    dump_s = time.perf_counter() - t0
    return {"intentions": intentions, "destinations": N_DEST, "compile_seconds": round(compile_s, 3),
            "serialize_seconds": round(dump_s, 3), "recompile_after_one_change_seconds": round(recompile_s, 4),
            "bytes": sum(len(t) for t in texts),
            "baseline_json_loads_seconds": round(baseline, 4),
            "compile_vs_json_loads": round(compile_s / baseline, 1)}


def _rate(fn: Any, n: int) -> float:
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        fn(n)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def bench_evaluate() -> dict[str, Any]:
    sources: list[dict[str, Any]] = [{"Name": f"svc-{i}", "Action": "allow" if i % 3 else "deny"} for i in range(1000)]
    sources[7] = {"Name": "svc-7", "Permissions": [
        {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
        {"Action": "deny", "HTTP": {"PathExact": "/pkg.Svc/Delete"}},
        {"Action": "allow", "HTTP": {"PathPrefix": "/pkg.Svc/", "Header": [{"Name": "x-tenant", "Present": True}]}},
        {"Action": "allow", "HTTP": {"PathRegex": "/v[0-9]+/items/.*", "Methods": ["GET", "HEAD"]}}]}
    sources.append({"Name": "*", "Action": "deny"})
    table: CompiledTable = Compiler("deny").compile([Document.kv("weft/intentions/db", json.dumps(
        {"Kind": "service-intentions", "Name": "db", "Sources": sources}))]).tables["db"]
    names = [f"svc-{i}" for i in range(1000)]
    spiffes = [f"spiffe://5a2f0c3e.consul/ns/default/dc/dc1/svc/svc-{i}" for i in range(1000)]
    lookup = {n: True for n in names}
    grpc_req = GrpcRequest("/pkg.Svc/Get", {"x-tenant": "t1"})
    http_req = HttpRequest.of("GET", "/v2/items/42?full=1")

    def baseline(n: int) -> None:
        get = lookup.get
        for i in range(n):
            get(names[i % 1000])

    def l4(n: int) -> None:
        for i in range(n):
            authorize(table, names[i % 1000], TCP)

    def l4_spiffe(n: int) -> None:
        for i in range(n):
            authorize(table, spiffes[i % 1000], TCP)

    def l7_grpc(n: int) -> None:
        for _ in range(n):
            authorize(table, "svc-7", grpc_req)

    def l7_http(n: int) -> None:
        for _ in range(n):
            authorize(table, "svc-7", http_req)

    n = 200_000
    base = _rate(baseline, n)
    out: dict[str, Any] = {"table_sources": len(table.rules), "baseline_dict_lookups_per_s": round(base)}
    for name, fn in (("l4", l4), ("l4_spiffe", l4_spiffe), ("l7_grpc", l7_grpc), ("l7_http", l7_http)):
        rate = _rate(fn, n)
        out[f"{name}_decisions_per_s"] = round(rate)
        out[f"{name}_cost_vs_dict_lookup"] = round(base / rate, 2)
    out["target_decisions_per_s"] = 200_000
    out["meets_target"] = min(out[f"{k}_decisions_per_s"] for k in ("l4", "l4_spiffe", "l7_grpc", "l7_http")) >= 200_000
    return out


def _http(method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    with urllib.request.urlopen(req, timeout=60) as resp:
        return int(resp.headers.get("X-Consul-Index", "0")), resp.read()


def _blocking_until_change(url: str, index: int) -> tuple[int, bytes]:
    sep = "&" if "?" in url else "?"
    while True:
        try:
            new, body = _http("GET", f"{url}{sep}index={index}&wait=10s")
        except urllib.error.HTTPError as exc:  # 404: not there yet
            new, body = int(exc.headers.get("X-Consul-Index", "0")), b""
        if new != index:
            return new, body
        index = new


def bench_latency(rounds: int = 15, preload: int = N_DEST) -> dict[str, Any]:
    from tests.support import WEFT, DevAgent, Proc, free_port, wait_for

    agent = DevAgent()
    policy: Proc | None = None
    try:
        kv = agent.url + "/v1/kv/"
        for d in _documents()[:preload]:  # a realistic fleet: every change recompiles against it
            _http("PUT", kv + d.ref, d.body.encode())
        policy = Proc([*WEFT, "policy", "serve", "-grpc-addr", f"127.0.0.1:{free_port()}", "-lock-ttl", "10s",
                       "-lock-delay", "1s", "-no-register", "-log-level", "warn"], env=agent.env)

        def has_wildcard_table() -> bool:
            try:
                _http("GET", kv + "weft/policy/compiled/_wildcard")
                return True
            except urllib.error.HTTPError:
                return False

        wait_for(has_wildcard_table, timeout=60, what="policy service's first table")
        base: list[float] = []
        _http("PUT", kv + "bench/plain", b"0")
        for i in range(rounds):
            idx, _ = _http("GET", kv + "bench/plain")
            t0 = time.perf_counter()
            _http("PUT", kv + "bench/plain", str(i + 1).encode())
            _blocking_until_change(kv + "bench/plain", idx)
            base.append(time.perf_counter() - t0)
        lat: list[float] = []
        key = kv + "weft/policy/compiled/bench-db?raw"
        for i in range(rounds):
            try:
                idx, _ = _http("GET", key)
            except urllib.error.HTTPError as exc:
                idx = int(exc.headers.get("X-Consul-Index", "0"))
            action = "allow" if i % 2 == 0 else "deny"
            doc = json.dumps({"Kind": "service-intentions", "Name": "bench-db",
                              "Sources": [{"Name": "web", "Action": action}]}).encode()
            t0 = time.perf_counter()
            _http("PUT", kv + "weft/intentions/bench-db", doc)
            while True:
                idx, body = _blocking_until_change(key, idx)
                if body and json.loads(body)["Rules"][0]["Action"] == action:
                    break
            lat.append(time.perf_counter() - t0)
        return {"rounds": rounds, "destinations_loaded": preload,
                "change_to_compiled_p50_ms": round(statistics.median(lat) * 1000, 1),
                "change_to_compiled_max_ms": round(max(lat) * 1000, 1),
                "baseline_kv_put_to_watch_p50_ms": round(statistics.median(base) * 1000, 1),
                "latency_vs_baseline": round(statistics.median(lat) / statistics.median(base), 1),
                "within_one_second": max(lat) < 1.0}
    finally:
        if policy is not None:
            policy.stop()
        agent.stop()


def run() -> dict[str, object]:
    out: dict[str, object] = {"compile": bench_compile(), "evaluate": bench_evaluate()}
    try:
        out["latency"] = bench_latency()
    except Exception as exc:  # the dev agent may lack an endpoint; keep the other figures
        out["latency"] = {"error": repr(exc)}
    for section, figures in out.items():
        print(f"   {section}: {json.dumps(figures)}", flush=True)
    return out
