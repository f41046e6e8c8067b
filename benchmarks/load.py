"""The load generator: its own process, so that its CPU never counts as a proxy's.

    python -m benchmarks.load unary --target 127.0.0.1:P [--target ...] --concurrency 32 --duration 5
    python -m benchmarks.load bidi  --target 127.0.0.1:P --streams 4 --window 16 --duration 5
    python -m benchmarks.load tcp   --target 127.0.0.1:P --connections 2 --duration 5
    python -m benchmarks.load interleaved --target A --target B ... --duration 10   (c1, per target)

It prints one JSON object on stdout. gRPC calls go through grpc.aio on uvloop with pre-serialized
request bytes and undecoded responses (the cheapest client grpc.aio allows); several `--target`s are
used round robin (one channel each). A warm-up (`--warmup` seconds) is excluded from the rates and
latencies but counted in `calls_total`, so that CPU read over the whole run divides by all calls.
`loadgen_cpu_us_per_call` shows what the generator itself costs, to tell whether it is the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import resource
import sys
import time
from array import array
from collections.abc import Sequence
from typing import Any, cast

UNARY = "/weft.test.echo.v1.Echo/Unary"
BIDI = "/weft.test.echo.v1.Echo/Bidi"
_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024)]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values by the nearest-rank method; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    rank = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return float(sorted_values[rank])


def latency_summary(latencies_s: Sequence[float]) -> dict[str, float]:
    values = sorted(latencies_s)
    return {"p50_ms": round(percentile(values, 0.50) * 1000, 4), "p99_ms": round(percentile(values, 0.99) * 1000, 4)}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _request(payload: int) -> bytes:
    from tests.apps.echo import echo_pb2

    return echo_pb2.EchoRequest(payload=b"x" * payload).SerializeToString()


class _Phase:
    """Warm-up, then the measured window; `calls`/`max_seconds` bound a count-driven run instead."""

    def __init__(self, warmup: float, duration: float, calls: int, max_seconds: float) -> None:
        self.start = time.perf_counter()
        self.measure_from = self.start + warmup
        self.end = self.measure_from + duration if calls == 0 else self.start + max_seconds
        self.calls = calls
        self.issued = 0

    def more(self) -> bool:
        if time.perf_counter() >= self.end:
            return False
        if self.calls and self.issued >= self.calls:
            return False
        self.issued += 1
        return True


async def run_unary(args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    channels = [grpc.aio.insecure_channel(t, options=_OPTIONS) for t in args.target]
    methods = [ch.unary_unary(UNARY, None, None) for ch in channels]  # bytes in, bytes out
    request = _request(args.payload)
    for method in methods:  # connect (and in a proxy, warm the connection) before the clock starts
        await method(request, timeout=30)
    phase = _Phase(args.warmup, args.duration, args.calls, args.max_seconds)
    latencies: array[float] = array("d")
    counts = {"ok": 0, "errors": 0, "measured": 0}
    by_target = [0] * len(methods)  # calls made (ok or not) per target, for CPU per call of each path
    first_error: list[str] = []
    cpu0 = _cpu_seconds()

    async def worker(offset: int) -> None:
        i = offset
        while phase.more():
            method = methods[i % len(methods)]
            by_target[i % len(methods)] += 1
            i += 1
            t0 = time.perf_counter()
            try:
                await method(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                counts["errors"] += 1
                if not first_error:
                    first_error.append(f"{exc.code().name}: {exc.details()}")
                continue
            t1 = time.perf_counter()
            counts["ok"] += 1
            if t0 >= phase.measure_from:
                latencies.append(t1 - t0)
                counts["measured"] += 1

    began = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(args.concurrency)))
    ended = time.perf_counter()
    cpu = _cpu_seconds() - cpu0
    for ch in channels:
        await ch.close(None)
    window = ended - phase.measure_from if args.calls == 0 else ended - began
    measured = counts["measured"] if args.calls == 0 else counts["ok"]
    total = counts["ok"] + counts["errors"]
    return {"calls_total": total, "calls_by_target": dict(zip(args.target, by_target, strict=True)),
            "calls": measured, "errors": counts["errors"],
            "first_error": first_error[0] if first_error else None, "seconds": round(window, 3),
            "rps": round(measured / window, 1) if window > 0 else 0.0, **latency_summary(latencies),
            "loadgen_cpu_us_per_call": round(cpu / max(total, 1) * 1e6, 1)}


async def run_interleaved(args: argparse.Namespace) -> dict[str, Any]:
    """Unary at concurrency 1 to several targets in turn, call by call, each its own path.

    Every target sees the same moments of machine noise, so latency differences between paths stay
    meaningful on a busy machine where separate runs drift by more than a proxy adds. The order
    within each turn rotates, so no target always follows another. Results per target.
    """
    import grpc

    channels = [grpc.aio.insecure_channel(t, options=_OPTIONS) for t in args.target]
    methods = [ch.unary_unary(UNARY, None, None) for ch in channels]
    request = _request(args.payload)
    for method in methods:
        await method(request, timeout=30)
    n = len(methods)
    latencies: list[array[float]] = [array("d") for _ in range(n)]
    totals, errors = [0] * n, [0] * n
    first_error: list[str] = []
    start = time.perf_counter()
    measure_from, end = start + args.warmup, start + args.warmup + args.duration
    turn = 0
    while time.perf_counter() < end:
        for k in range(n):
            i = (turn + k) % n
            t0 = time.perf_counter()
            try:
                await methods[i](request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                errors[i] += 1
                if not first_error:
                    first_error.append(f"{args.target[i]}: {exc.code().name}: {exc.details()}")
                continue
            finally:
                totals[i] += 1
            if t0 >= measure_from:
                latencies[i].append(time.perf_counter() - t0)
        turn += 1
    for ch in channels:
        await ch.close(None)
    return {"per_target": {t: {"calls_total": totals[i], "calls": len(latencies[i]), "errors": errors[i],
                               "rps": round(len(latencies[i]) / args.duration, 1), **latency_summary(latencies[i])}
                           for i, t in enumerate(args.target)},
            "first_error": first_error[0] if first_error else None, "seconds": args.duration}


async def run_bidi(args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    channel = grpc.aio.insecure_channel(args.target[0], options=_OPTIONS)
    method = channel.stream_stream(BIDI, None, None)
    request = _request(args.payload)
    phase = _Phase(args.warmup, args.duration, 0, 0)
    latencies: array[float] = array("d")
    counts = {"sent": 0, "received": 0, "measured": 0, "errors": 0}
    first_error: list[str] = []
    cpu0 = _cpu_seconds()

    async def stream() -> None:
        call = method(None, timeout=args.warmup + args.duration + 60)
        window = asyncio.Semaphore(args.window)
        sent_at: collections.deque[float] = collections.deque()

        async def writer() -> None:
            while time.perf_counter() < phase.end:
                await window.acquire()
                sent_at.append(time.perf_counter())
                await call.write(request)
                counts["sent"] += 1
            await call.done_writing()

        async def reader() -> None:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:  # type: ignore[attr-defined]
                    return
                now = time.perf_counter()
                t0 = sent_at.popleft()
                window.release()
                counts["received"] += 1
                if t0 >= phase.measure_from and now <= phase.end:
                    latencies.append(now - t0)
                    counts["measured"] += 1

        try:
            await asyncio.gather(writer(), reader())
        except grpc.aio.AioRpcError as exc:
            counts["errors"] += 1
            if not first_error:
                first_error.append(f"{exc.code().name}: {exc.details()}")

    await asyncio.gather(*(stream() for _ in range(args.streams)))
    cpu = _cpu_seconds() - cpu0
    await channel.close(None)
    return {"calls_total": counts["received"], "messages": counts["measured"], "errors": counts["errors"],
            "first_error": first_error[0] if first_error else None, "seconds": args.duration,
            "msgs_per_s": round(counts["measured"] / args.duration, 1), **latency_summary(latencies),
            "loadgen_cpu_us_per_call": round(cpu / max(counts["received"], 1) * 1e6, 1)}


class _Flood(asyncio.BufferedProtocol):
    """Writes `chunk` as fast as the connection takes it; counts what comes back."""

    def __init__(self, chunk: bytes, phase: _Phase, counts: dict[str, int], done: asyncio.Future[None]) -> None:
        self.chunk, self.phase, self.counts, self.done = chunk, phase, counts, done
        self.buffer = bytearray(256 * 1024)
        self.transport: asyncio.Transport | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self._fill()

    def _fill(self) -> None:
        assert self.transport is not None
        while not self.paused and not self.transport.is_closing():
            if time.perf_counter() >= self.phase.end:
                if self.transport.can_write_eof():
                    self.transport.write_eof()
                return
            self.transport.write(self.chunk)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._fill()

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buffer)

    def buffer_updated(self, nbytes: int) -> None:
        now = time.perf_counter()
        self.counts["total"] += nbytes
        if self.phase.measure_from <= now <= self.phase.end:
            self.counts["measured"] += nbytes
        if now > self.phase.end + 5 and self.transport is not None:  # peer never finishes: stop anyway
            self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def run_tcp(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    host, _, port = args.target[0].rpartition(":")
    phase = _Phase(args.warmup, args.duration, 0, 0)
    counts = {"total": 0, "measured": 0}
    chunk = b"\xa5" * args.chunk
    cpu0 = _cpu_seconds()
    waits = []
    for _ in range(args.connections):
        done: asyncio.Future[None] = loop.create_future()
        await loop.create_connection(lambda d=done: _Flood(chunk, phase, counts, d), host, int(port))  # type: ignore[misc]
        waits.append(done)
    await asyncio.wait_for(asyncio.gather(*waits), args.warmup + args.duration + 30)
    cpu = _cpu_seconds() - cpu0
    mb = counts["total"] / 1e6
    return {"mb_total": round(mb, 1), "seconds": args.duration,
            "mb_per_s": round(counts["measured"] / 1e6 / args.duration, 1),
            "loadgen_cpu_us_per_mb": round(cpu / max(mb, 1e-9) * 1e6, 1)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("unary", "interleaved", "bidi", "tcp"))
    parser.add_argument("--target", action="append", required=True, help="host:port (repeat to spread calls)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--payload", type=int, default=100, help="request payload bytes")
    parser.add_argument("--concurrency", type=int, default=32, help="unary: calls in flight")
    parser.add_argument("--calls", type=int, default=0, help="unary: make exactly this many calls instead")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="unary --calls: stop after this long")
    parser.add_argument("--streams", type=int, default=4, help="bidi: concurrent streams")
    parser.add_argument("--window", type=int, default=16, help="bidi: messages in flight per stream")
    parser.add_argument("--connections", type=int, default=2, help="tcp: connections")
    parser.add_argument("--chunk", type=int, default=64 * 1024, help="tcp: bytes per write")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from weft.runner import install_uvloop

    install_uvloop()
    runner = {"unary": run_unary, "interleaved": run_interleaved, "bidi": run_bidi, "tcp": run_tcp}[args.mode]
    result = asyncio.run(runner(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
