"""LeafManager against an in-process CA (no sockets): renewal window, fail static, backoff, roots change,
thread-safe hand-over to subscribers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

from ca.client import CAUnavailable, Credentials, LeafManager, SignResult
from ca.identity import SpiffeId
from ca.provider import CAConfig, TrustBundle
from ca.renewal import Backoff, renewal_window
from ca.server import CAService, utcnow

from .test_service import acl, make_service


class InProcessCA:
    """A CAConnector straight onto CAService; `down` makes every call fail like an unreachable CA."""

    def __init__(self, service: CAService) -> None:
        self.service = service
        self.down = False
        self.calls = 0

    async def sign(self, csr: bytes, *, token: str, current_chain: bytes, proof: bytes, ttl_seconds: int,
                   bundle: TrustBundle | None) -> SignResult:
        self.calls += 1
        if self.down:
            raise CAUnavailable("CA down")
        await asyncio.sleep(0)  # a real CA call yields to the event loop
        leaf = await self.service.sign(csr, token, current_chain, proof, ttl_seconds)
        return SignResult(leaf.cert_pem, leaf.chain_pem, self.service.bundle)

    async def watch_roots(self, known_index: int, bundle: TrustBundle | None) -> AsyncIterator[TrustBundle]:
        if self.down:
            raise CAUnavailable("CA down")
        async for b in self.service.watch(known_index):
            yield b


async def until(pred: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_renews_in_window_serves_while_down_and_recovers() -> None:
    svc = await make_service(acl(), utcnow)
    ca = InProcessCA(svc)
    sid = SpiffeId.for_service(svc.trust_domain, "web")
    mgr = LeafManager(sid, ca, token="web-token", bundle=svc.bundle, ttl=timedelta(seconds=3),
                      backoff=Backoff(base=0.02, factor=2, cap=0.1))
    stop = asyncio.Event()
    task = mgr.start(stop)
    try:
        first = await mgr.wait_ready(10)
        lo, hi = renewal_window(first.not_before, first.not_after)
        await until(lambda: mgr.current is not None and mgr.current.serial != first.serial)
        renewed_at = datetime.now(UTC)
        # renewed inside the 60-90 % window (with slack for a busy machine after it)
        assert lo - timedelta(seconds=0.05) <= renewed_at <= hi + timedelta(seconds=2)
        second = mgr.current
        assert second is not None

        ca.down = True
        await until(lambda: mgr.failures >= 3)
        cur = mgr.current
        assert cur is not None and cur.serial == second.serial  # still serving the last good leaf
        assert mgr.expiry_unix() == second.not_after.timestamp()
        assert "CA down" in mgr.last_error

        ca.down = False
        await until(lambda: mgr.current is not None and mgr.current.serial != second.serial)
    finally:
        stop.set()
        await task


async def test_roots_change_renews_at_once_and_callbacks_are_thread_safe() -> None:
    svc = await make_service(acl(), utcnow)
    ca = InProcessCA(svc)
    sid = SpiffeId.for_service(svc.trust_domain, "web")
    mgr = LeafManager(sid, ca, token="web-token", bundle=svc.bundle)
    got: list[Credentials] = []
    seen_threads: set[int] = set()

    def on_creds(c: Credentials) -> None:
        seen_threads.add(threading.get_ident())
        got.append(c)

    mgr.subscribe(on_creds)
    stop = asyncio.Event()
    task = mgr.start(stop)
    # a reader on another thread (as gRPC's certificate fetcher) only ever sees whole credentials
    reads: list[int] = []
    reader_stop = threading.Event()

    def reader() -> None:
        while not reader_stop.is_set():
            c = mgr.current
            if c is not None:
                assert c.cert_pem.startswith(b"-----BEGIN CERTIFICATE-----")
                reads.append(c.generation)

    t = threading.Thread(target=reader)
    t.start()
    try:
        first = await mgr.wait_ready(10)
        assert mgr.next_renewal_delay() > 60  # a 1 h leaf is not renewed for a long while
        new_root = await svc.rotate("operator")
        await until(lambda: mgr.current is not None and mgr.current.serial != first.serial
                    and mgr.current.bundle.active_root_id == new_root, 10)
        assert len(mgr.current.bundle.roots) == 2  # type: ignore[union-attr]
        assert [c.generation for c in got] == sorted(c.generation for c in got)
    finally:
        reader_stop.set()
        t.join()
        stop.set()
        await task
    assert reads and len(got) >= 2


async def test_first_certificate_needs_a_token() -> None:
    svc = await make_service(acl(), utcnow)
    ca = InProcessCA(svc)
    sid = SpiffeId.for_service(svc.trust_domain, "web")
    mgr = LeafManager(sid, ca, token="reader", bundle=svc.bundle, backoff=Backoff(base=0.02, cap=0.05))
    stop = asyncio.Event()
    task = mgr.start(stop)
    try:
        await until(lambda: mgr.failures >= 2)
        assert mgr.current is None and "lacks service:write" in mgr.last_error
    finally:
        stop.set()
        await task


def test_config_bounds() -> None:
    assert CAConfig().leaf_ttl == timedelta(hours=72)


async def test_a_leaf_due_at_once_does_not_make_the_client_spin() -> None:
    svc = await make_service(acl())  # the CA's clock is frozen: every leaf it signs soon looks overdue
    ca = InProcessCA(svc)
    mgr = LeafManager(SpiffeId.for_service(svc.trust_domain, "web"), ca, token="web-token", bundle=svc.bundle,
                      ttl=timedelta(seconds=2))
    stop = asyncio.Event()
    task = mgr.start(stop)
    try:
        await mgr.wait_ready(10)
        await asyncio.sleep(3.0)
    finally:
        stop.set()
        await task
    assert ca.calls <= 3.0 / LeafManager.MIN_RENEW_INTERVAL_S + 3
