"""What the catalog layer (`catalog.client`, `catalog.watch`, `catalog.models`) adds on top of raw HTTP.

1. Wake-up: N `kv_watch`es on one key over ONE ConsulClient session, woken by one write: p50/p99 from
   just before the write to each watch yielding the new value. Baseline in the same run: N raw
   aiohttp blocking GETs on the same key over one session, woken the same way (no parsing, no
   watch logic). Ratio = catalog / raw.
2. Parsing: `parse_instances` on 10,000 `/v1/health/connect` sidecar entries, against
   `json.loads` of the same body (the baseline every client pays). Ratio = parse / json.loads.

Run alone: ``.venv/bin/python -m benchmarks catalog``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

import aiohttp

from catalog.client import ConsulClient
from catalog.models import ConsulSettings, parse_instances
from catalog.watch import WatchPolicy, kv_watch
from tests.support import DevAgent

WATCHES = 200
ENTRIES = 10_000


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[max(0, min(len(s) - 1, round(p / 100 * (len(s) - 1))))]


async def _catalog_wakeup(agent: DevAgent, key: str) -> list[float]:
    async with ConsulClient(ConsulSettings.from_env(agent.env)) as c:
        watches = [kv_watch(c, key, policy=WatchPolicy(wait=60, min_interval=0.0)) for _ in range(WATCHES)]
        await asyncio.gather(*(w.first() for w in watches))
        woke: list[float] = []

        async def one(w: Any) -> None:
            await w.__anext__()
            woke.append(time.perf_counter())

        tasks = [asyncio.ensure_future(one(w)) for w in watches]
        await asyncio.sleep(1.0)  # let every watch block
        t0 = time.perf_counter()
        await c.kv_put(key, b"changed")
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        for w in watches:
            w.close()
        return [(t - t0) * 1000 for t in woke]


async def _raw_wakeup(agent: DevAgent, key: str) -> list[float]:
    url = f"{agent.url}/v1/kv/{key}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async with s.get(url) as r:
            index = r.headers["X-Consul-Index"]
        woke: list[float] = []

        async def one() -> None:
            async with s.get(url, params={"index": index, "wait": "60s"},
                             timeout=aiohttp.ClientTimeout(total=120)) as r:
                await r.read()
            woke.append(time.perf_counter())

        tasks = [asyncio.ensure_future(one()) for _ in range(WATCHES)]
        await asyncio.sleep(1.0)
        t0 = time.perf_counter()
        async with s.put(url, data=b"changed") as r:
            await r.read()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        return [(t - t0) * 1000 for t in woke]


def _entry(i: int) -> dict[str, Any]:
    return {"Node": {"ID": "n", "Node": f"node{i % 50}", "Address": "10.0.0.9", "Datacenter": "dc1"},
            "Service": {"Kind": "connect-proxy", "ID": f"api-{i}-sidecar-proxy", "Service": "api-sidecar-proxy",
                        "Tags": ["v1"], "Address": "", "Meta": {"protocol": "grpc"}, "Port": 21000 + i % 200,
                        "Weights": {"Passing": 1, "Warning": 1},
                        "Proxy": {"DestinationServiceName": "api", "DestinationServiceID": f"api-{i}",
                                  "LocalServiceAddress": "127.0.0.1", "LocalServicePort": 8080,
                                  "Upstreams": [{"DestinationType": "service", "DestinationName": "db",
                                                 "LocalBindPort": 9191}]}},
            "Checks": [{"Node": "n", "CheckID": "serfHealth", "Name": "Serf", "Status": "passing"},
                       {"Node": "n", "CheckID": f"api-{i}:ttl", "Name": "ttl", "Status": "passing",
                        "ServiceID": f"api-{i}-sidecar-proxy"}]}


def _parse_figures() -> dict[str, float]:
    body = json.dumps([_entry(i) for i in range(ENTRIES)])
    best_json, best_parse = float("inf"), float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        data = json.loads(body)
        t1 = time.perf_counter()
        parse_instances(data)
        t2 = time.perf_counter()
        best_json, best_parse = min(best_json, t1 - t0), min(best_parse, t2 - t1)
    return {"entries": ENTRIES, "json_loads_ms": round(best_json * 1000, 1),
            "parse_instances_ms": round(best_parse * 1000, 1),
            "parse_us_per_entry": round(best_parse * 1e6 / ENTRIES, 1),
            "parse_vs_json_ratio": round(best_parse / best_json, 2)}


def run() -> dict[str, object]:
    agent = DevAgent()
    try:
        raw = asyncio.run(_raw_wakeup(agent, "bench/raw"))
        cat = asyncio.run(_catalog_wakeup(agent, "bench/catalog"))
    finally:
        agent.stop()
    out: dict[str, object] = {
        "watches": WATCHES,
        "raw_wakeup_p50_ms": round(statistics.median(raw), 1), "raw_wakeup_p99_ms": round(_pct(raw, 99), 1),
        "catalog_wakeup_p50_ms": round(statistics.median(cat), 1),
        "catalog_wakeup_p99_ms": round(_pct(cat, 99), 1),
        "wakeup_p99_ratio_vs_raw": round(_pct(cat, 99) / max(_pct(raw, 99), 1e-6), 2),
    }
    out.update(_parse_figures())
    for k, v in out.items():
        print(f"   {k}: {v}", flush=True)
    return out
