"""In-memory fakes of the CA's Consul Protocols (ca.backend) for unit tests."""

from __future__ import annotations

import asyncio
from typing import Any

from ca.backend import KVEntry, ServiceAddress, TokenRejected


class FakeKV:
    def __init__(self) -> None:
        self.data: dict[str, KVEntry] = {}
        self.index = 1
        self._changed = asyncio.Event()
        self.fail = False

    async def get(self, key: str) -> KVEntry | None:
        if self.fail:
            raise ConnectionError("consul down")
        return self.data.get(key)

    async def put(self, key: str, value: bytes, *, cas: int | None = None) -> bool:
        if self.fail:
            raise ConnectionError("consul down")
        cur = self.data.get(key)
        if cas is not None and (cur.modify_index if cur else 0) != cas:
            return False
        self.index += 1
        self.data[key] = KVEntry(key, bytes(value), self.index)
        self._changed.set()
        self._changed = asyncio.Event()
        return True

    async def watch(self, key: str, index: int, wait_s: float) -> tuple[KVEntry | None, int]:
        entry = self.data.get(key)
        if entry is None or entry.modify_index <= index:
            try:
                await asyncio.wait_for(self._changed.wait(), wait_s)
            except TimeoutError:
                pass
        entry = self.data.get(key)
        return entry, (entry.modify_index if entry else self.index)


class FakeLock:
    """A lock shared by the FakeLockHandles made from it."""

    def __init__(self) -> None:
        self.holder: FakeLockHandle | None = None
        self.changed = asyncio.Condition()

    def handle(self) -> FakeLockHandle:
        return FakeLockHandle(self)


class FakeLockHandle:
    def __init__(self, lock: FakeLock) -> None:
        self.lock = lock

    async def acquire(self) -> None:
        async with self.lock.changed:
            await self.lock.changed.wait_for(lambda: self.lock.holder is None)
            self.lock.holder = self

    async def wait_lost(self) -> None:
        async with self.lock.changed:
            await self.lock.changed.wait_for(lambda: self.lock.holder is not self)

    async def release(self) -> None:
        async with self.lock.changed:
            if self.lock.holder is self:
                self.lock.holder = None
            self.lock.changed.notify_all()

    async def steal(self) -> None:
        """Simulate the session being invalidated."""
        async with self.lock.changed:
            self.lock.holder = None
            self.lock.changed.notify_all()


class FakeRegistry:
    def __init__(self) -> None:
        self.services: dict[str, ServiceAddress] = {}
        self.passes: list[str] = []

    async def register(self, service_id: str, address: str, port: int, tags: list[str], ttl_s: float) -> None:
        self.services[service_id] = ServiceAddress(service_id, address, port, tuple(tags))

    async def pass_check(self, service_id: str, note: str) -> None:
        self.passes.append(service_id)

    async def deregister(self, service_id: str) -> None:
        self.services.pop(service_id, None)

    async def healthy(self, service: str) -> list[ServiceAddress]:
        return list(self.services.values())


class FakeAcl:
    """Tokens -> token-self documents; policies and roles by id. ``enabled=False``: ACLs disabled."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tokens: dict[str, dict[str, Any]] = {}
        self.policies: dict[str, dict[str, Any]] = {}
        self.roles: dict[str, dict[str, Any]] = {}

    async def token_self(self, token: str) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        if token not in self.tokens:
            raise TokenRejected("ACL not found")
        return self.tokens[token]

    async def policy(self, policy_id: str) -> dict[str, Any]:
        return self.policies[policy_id]

    async def role(self, role_id: str) -> dict[str, Any]:
        return self.roles[role_id]

    def add_policy(self, pid: str, rules: str) -> None:
        self.policies[pid] = {"ID": pid, "Name": pid, "Rules": rules}

    def add_token(self, secret: str, policies: list[str] = (), service_identities: list[str] = (),  # type: ignore[assignment]
                  roles: list[str] = ()) -> None:  # type: ignore[assignment]
        self.tokens[secret] = {
            "AccessorID": f"acc-{secret}",
            "Policies": [{"ID": p, "Name": p} for p in policies],
            "ServiceIdentities": [{"ServiceName": s} for s in service_identities],
            "Roles": [{"ID": r, "Name": r} for r in roles],
        }
