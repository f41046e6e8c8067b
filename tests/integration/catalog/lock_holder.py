"""A process that takes a LeaderLock and holds it until killed (for the crash takeover test).

Usage: python -m tests.integration.catalog.lock_holder KEY VALUE TTL   (CONSUL_HTTP_ADDR in the environment)
Prints "acquired <session>" once it holds the lock."""

from __future__ import annotations

import asyncio
import sys

from catalog.client import ConsulClient
from catalog.lock import LeaderLock


async def main(key: str, value: str, ttl: str) -> None:
    async with ConsulClient() as c, LeaderLock(c, key, ttl=ttl, lock_delay="0s", value=value) as lock:
        await lock.acquired()
        print(f"acquired {lock.session_id}", flush=True)
        await lock.lost.wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
