"""The dev agent under load (issue #2, item 6).

1. 1,000 concurrent blocking queries on one KV key; one write wakes them all: p50/p99 wake-up
   latency (from just before the write is sent to the arrival of each answer's headers, read by a
   minimal HTTP client so the figures are the agent's). Baseline in the same run:
   the same with ONE blocking query, and a plain GET round trip.
   The agent's CPU time for the wake-up (user+system, from /proc) is reported too: unlike the
   latency it does not depend on how loaded the shared machine is.
2. The same on ``/v1/health/service/:name`` (woken by registering one more instance), when the
   agent serves it.
3. 10,000 registered instances of one service: the agent's RSS before/after, and
   ``/v1/health/service/:name`` latency with 10,000 instances against the same query for a
   service with one instance (the baseline). ``health_10000_instances`` is measured after an
   unrelated write before every read (a busy cluster's index always moves);
   ``health_10000_after_own_change`` after one of the instances' checks changed (the answer must
   be rebuilt); ``health_10000_unchanged`` repeats the read with no write in between;
   ``health_10000_herd_50``: 50 concurrent reads at one index (clients re-arming after a change).
4. The floor: the agent's CPU for 1,000 concurrent plain requests (``/v1/status/leader``: accept,
   parse, answer, close), against which the wake-ups' agent CPU compares.

Run alone: ``.venv/bin/python -m benchmarks devagent``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.support import DevAgent

WAITERS = 1000
INSTANCES = 10_000


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * (len(s) - 1))))
    return s[k]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used (load-independent, unlike wall latency)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _index(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as resp:
        await resp.read()
        return int(resp.headers["X-Consul-Index"])


async def _wake(session: aiohttp.ClientSession, base: str, read_path: str, n: int,
                write: Any, pid: int) -> dict[str, float]:
    """Start n blocking reads of read_path, then call write(); return wake-up latency figures (ms)."""
    index = await _index(session, base + read_path)
    arrivals: list[float] = []
    sep = "&" if "?" in read_path else "?"
    host, port = base.removeprefix("http://").split(":")
    request = f"GET {read_path}{sep}index={index}&wait=120s HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()

    async def one() -> None:
        # a minimal HTTP client, so that the figures are the agent's and not a heavy client's
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            arrivals.append(time.perf_counter())
            headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line)
            await reader.readexactly(int(headers.get("Content-Length", "0")))
            if not head.startswith(b"HTTP/1.1 200") or int(headers["X-Consul-Index"]) <= index:
                raise RuntimeError("a blocking query answered without a change")
        finally:
            writer.close()

    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
    await asyncio.sleep(1.0 + n / 500)  # let every query reach the agent and park
    early = sum(t.done() for t in tasks)
    if early:
        raise RuntimeError(f"{early} blocking queries answered before any write")
    cpu0 = _cpu_s(pid)
    t0 = time.perf_counter()
    await write()
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    cpu = _cpu_s(pid) - cpu0
    lat = [(a - t0) * 1000 for a in arrivals]
    return {"n": n, "p50_ms": round(_pct(lat, 50), 2), "p99_ms": round(_pct(lat, 99), 2),
            "max_ms": round(max(lat), 2), "agent_cpu_ms": round(cpu * 1000, 1)}


async def _serves(session: aiohttp.ClientSession, url: str) -> bool:
    async with session.get(url) as resp:
        await resp.read()
        return resp.status == 200


async def _latency(session: aiohttp.ClientSession, url: str, n: int,
                   before: Any = None) -> dict[str, float]:
    """Sequential GETs of url; ``before()`` (awaited, not timed) runs before each."""
    times = []
    for _ in range(n):
        if before is not None:
            await before()
        t0 = time.perf_counter()
        async with session.get(url) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{url} answered {resp.status}")
        times.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": round(statistics.median(times), 2), "p99_ms": round(_pct(times, 99), 2)}


async def _burst(base: str, path: str, n: int, pid: int) -> dict[str, float]:
    """n concurrent GETs of path on fresh connections: wall time and the agent's CPU."""
    host, port = base.removeprefix("http://").split(":")
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(n)]
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line)
            await reader.readexactly(int(headers.get("Content-Length", "0")))
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"{path} answered {head[:20]!r}")
        finally:
            writer.close()

    await asyncio.sleep(0.2)
    cpu0 = _cpu_s(pid)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(r, w) for r, w in conns))
    return {"n": n, "wall_ms": round((time.perf_counter() - t0) * 1000, 1),
            "agent_cpu_ms": round((_cpu_s(pid) - cpu0) * 1000, 1)}


async def _register(session: aiohttp.ClientSession, base: str, name: str, i: int) -> None:
    body = {"Node": f"bench-node-{i // 100}", "Address": f"10.0.{i // 250}.{i % 250}",
            "Service": {"ID": f"{name}-{i}", "Service": name, "Port": 8000 + i % 1000, "Tags": ["v1"]},
            "Check": {"CheckID": f"service:{name}-{i}", "Name": "ok", "Status": "passing",
                      "ServiceID": f"{name}-{i}"}}
    async with session.put(base + "/v1/catalog/register", json=body) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"catalog/register answered {resp.status}")


async def _main(agent: DevAgent) -> dict[str, Any]:
    base = agent.url
    out: dict[str, Any] = {"loadavg_1m_at_start": round(os.getloadavg()[0], 2)}
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=300)) as s:
        async with s.put(base + "/v1/kv/bench/key", data=b"0") as resp:
            await resp.read()
        counter = iter(range(1, 1_000_000))

        async def kv_write() -> None:
            async with s.put(base + "/v1/kv/bench/key", data=str(next(counter)).encode()) as r:
                await r.read()

        out["kv_get_roundtrip"] = await _latency(s, base + "/v1/kv/bench/key", 200)
        out["floor_1000_plain_requests"] = await _burst(base, "/v1/status/leader", WAITERS, agent.proc.pid)
        out["kv_wake_1"] = await _wake(s, base, "/v1/kv/bench/key", 1, kv_write, agent.proc.pid)
        out["kv_wake_1000"] = await _wake(s, base, "/v1/kv/bench/key", WAITERS, kv_write, agent.proc.pid)
        out["kv_p99_vs_single_waiter"] = round(out["kv_wake_1000"]["p99_ms"] / max(out["kv_wake_1"]["p99_ms"],
                                                                                   0.01), 1)
        out["kv_target_p99_100ms_met"] = out["kv_wake_1000"]["p99_ms"] <= 100

        health = "/v1/health/service/bench-web"
        if not await _serves(s, base + health):
            out["health"] = "skipped: this agent does not serve /v1/health/service yet"
            return out
        await _register(s, base, "bench-web", 0)
        await _register(s, base, "bench-one", 0)
        n_reg = iter(range(1, 1_000_000))

        async def health_write() -> None:
            await _register(s, base, "bench-web", next(n_reg))

        out["health_wake_1"] = await _wake(s, base, health, 1, health_write, agent.proc.pid)
        out["health_wake_1000"] = await _wake(s, base, health, WAITERS, health_write, agent.proc.pid)
        out["health_p99_vs_single_waiter"] = round(
            out["health_wake_1000"]["p99_ms"] / max(out["health_wake_1"]["p99_ms"], 0.01), 1)

        rss_before = _rss_kib(agent.proc.pid)
        start = next(n_reg)
        sem = asyncio.Semaphore(32)

        async def reg(i: int) -> None:
            async with sem:
                await _register(s, base, "bench-web", i)

        t0 = time.perf_counter()
        await asyncio.gather(*(reg(i) for i in range(start, start + INSTANCES)))
        out["register_10000_s"] = round(time.perf_counter() - t0, 2)
        rss_after = _rss_kib(agent.proc.pid)
        out["rss_mib_before"] = round(rss_before / 1024, 1)
        out["rss_mib_with_10000"] = round(rss_after / 1024, 1)
        out["rss_kib_per_instance"] = round((rss_after - rss_before) / INSTANCES, 2)
        one = await _latency(s, base + "/v1/health/service/bench-one", 20, kv_write)
        many = await _latency(s, base + health, 10, kv_write)
        passing = await _latency(s, base + health + "?passing", 10, kv_write)
        out["health_1_instance"] = one
        out["health_10000_instances"] = many
        out["health_10000_passing"] = passing
        out["health_10000_vs_1_p50"] = round(many["p50_ms"] / max(one["p50_ms"], 0.01), 1)
        out["health_10000_unchanged"] = await _latency(s, base + health, 10)
        flips = iter(range(1, 1_000_000))

        async def own_change() -> None:  # one of the 10,000 instances changes its check's output
            i = next(flips)
            body = {"Node": "bench-node-0", "Address": "10.0.0.0",
                    "Check": {"CheckID": "service:bench-web-1", "Name": "ok", "Status": "passing",
                              "ServiceID": "bench-web-1", "Output": f"flip {i}"}}
            async with s.put(base + "/v1/catalog/register", json=body) as resp:
                await resp.read()

        out["health_10000_after_own_change"] = await _latency(s, base + health, 10, own_change)
        out["rss_mib_after_health_reads"] = round(_rss_kib(agent.proc.pid) / 1024, 1)  # with any caches built
        await kv_write()
        out["health_10000_herd_50"] = await _burst(base, health, 50, agent.proc.pid)
        # 50 answers of ~6 MB in flight at once: the bodies and the transports' send buffers
        out["rss_mib_after_herd"] = round(_rss_kib(agent.proc.pid) / 1024, 1)
    return out


def run() -> dict[str, Any]:
    agent = DevAgent("-log-level", "warn")
    try:
        try:
            import uvloop

            return uvloop.run(_main(agent))  # type: ignore[no-any-return]
        except ImportError:  # pragma: no cover
            return asyncio.run(_main(agent))
    finally:
        agent.stop()


if __name__ == "__main__":
    import json

    sys.path.insert(0, os.getcwd())
    print(json.dumps(run(), indent=2))
