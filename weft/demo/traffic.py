"""A gentle traffic generator for the demo: a few requests per second to `frontend`.

Mostly `/hello` (unary), every fifth request `/stream` (server streaming); names rotate so the
store's counters move. Every `-report` seconds it logs how many answers it got per HTTP status.

    python -m weft.demo.traffic -url http://127.0.0.1:19100 -rps 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections import Counter
from collections.abc import Sequence

import aiohttp
import structlog

from weft import logsetup, runner

log = structlog.get_logger("weft.demo.traffic")

NAMES = ("ada", "grace", "linus", "barbara", "ken")


def request_path(n: int) -> str:
    """The n-th request's path: every fifth a stream, the rest unary greetings."""
    name = NAMES[n % len(NAMES)]
    return f"/stream?name={name}&count=3" if n % 5 == 4 else f"/hello?name={name}"


async def generate(url: str, rps: float, report_every: float, stop: asyncio.Event) -> Counter[str]:
    if rps <= 0:
        raise ValueError(f"-rps must be positive, got {rps}")
    totals: Counter[str] = Counter()
    window: Counter[str] = Counter()
    interval = 1.0 / rps
    loop = asyncio.get_running_loop()
    next_report = loop.time() + report_every
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        n = 0
        while not stop.is_set():
            started = loop.time()
            try:
                async with session.get(url.rstrip("/") + request_path(n)) as resp:
                    await resp.read()
                    key = str(resp.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                key = type(exc).__name__
            window[key] += 1
            totals[key] += 1
            n += 1
            if loop.time() >= next_report:
                log.info("traffic", url=url, **{f"status_{k}": v for k, v in sorted(window.items())})
                window.clear()
                next_report = loop.time() + report_every
            delay = max(0.0, interval - (loop.time() - started))
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                pass
    return totals


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weft.demo.traffic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-url", "--url", default="http://127.0.0.1:19100", help="the frontend's base URL")
    parser.add_argument("-rps", "--rps", type=float, default=3.0, help="requests per second (default 3)")
    parser.add_argument("-report", "--report", type=float, default=10.0,
                        help="seconds between summary log lines (default 10)")
    parser.add_argument("-log-level", "--log-level", default=os.environ.get("WEFT_LOG_LEVEL", "info"))
    args = parser.parse_args(argv)
    if args.rps <= 0:
        parser.error(f"-rps must be positive, got {args.rps}")
    logsetup.configure(args.log_level)

    async def go(stop: asyncio.Event) -> int:
        totals = await generate(args.url, args.rps, args.report, stop)
        log.info("traffic stopped", **{f"status_{k}": v for k, v in sorted(totals.items())})
        return 0

    return runner.run(go)


if __name__ == "__main__":
    sys.exit(main())
