"""In-process CA servers on loopback, backed by the in-memory fakes of ca.backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import pytest

from ca.authz import TokenAuthorizer
from ca.client import GrpcCA, fixed_resolver
from ca.provider import CAConfig
from ca.server import CAServer, CAService, ServeOptions
from ca.store import CAStore, kek_from_text
from tests.unit.ca.fakes import FakeAcl, FakeKV, FakeLock, FakeRegistry

KEK = kek_from_text(bytes(range(32)), "test")


@dataclass
class RunningCA:
    server: CAServer
    service: CAService
    kv: FakeKV
    acl: FakeAcl
    stop: asyncio.Event

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def connector(self) -> GrpcCA:
        return GrpcCA(fixed_resolver(self.address))


async def start_ca(kv: FakeKV, acl: FakeAcl, lock: FakeLock, config: CAConfig | None = None) -> RunningCA:
    config = config or CAConfig(leaf_ttl=timedelta(hours=1), max_leaf_ttl=timedelta(hours=2))
    service = CAService(CAStore(kv, KEK), TokenAuthorizer(acl, "dc1"), config)
    stop = asyncio.Event()
    handle = lock.handle()
    server = CAServer(service, handle, FakeRegistry(), ServeOptions(listen="127.0.0.1:0", maintain_interval_s=0.5))
    assert await server.start(stop)
    # the first replica campaigns again once registered (see CAServer.start): wait until it leads,
    # unless another replica holds the lock (then this one is a standby)
    deadline = asyncio.get_running_loop().time() + 30
    while lock.holder in (None, handle) and not service.active:
        assert asyncio.get_running_loop().time() < deadline, "the CA did not become active"
        await asyncio.sleep(0.02)
    return RunningCA(server, service, kv, acl, stop)


def default_acl() -> FakeAcl:
    acl = FakeAcl()
    acl.add_policy("web-write", 'service "web" { policy = "write" }')
    acl.add_policy("read-all", 'service_prefix "" { policy = "read" }')
    acl.add_policy("op", 'operator = "write"')
    acl.add_token("web-token", ["web-write"])
    acl.add_token("reader", ["read-all"])
    acl.add_token("operator", ["op"])
    acl.add_token("all", service_identities=["a", "b", "web"])
    return acl


@pytest.fixture
async def running_ca() -> AsyncIterator[RunningCA]:
    ca = await start_ca(FakeKV(), default_acl(), FakeLock())
    try:
        yield ca
    finally:
        ca.stop.set()
        await ca.server.stop()
