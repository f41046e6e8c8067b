"""The leaf manager every sidecar embeds, and the gRPC client of the CA.

:class:`LeafManager` keeps one identity's leaf fresh:

- it makes the EC P-256 key itself and sends only a CSR (with a Consul ACL token the first time, and
  with the current certificate plus a proof of possession of its key on renewals);
- it renews at a random point between 60 % and 90 % of the leaf's life (``ca.renewal``), and at once
  when the roots change (it watches them with ``WatchRoots``);
- on errors it backs off (capped, jittered) and keeps serving the current leaf while the CA is down;
- it hands every new :class:`Credentials` to subscribers (plain callbacks, called on the event loop's
  thread) and keeps ``current`` readable from any thread: gRPC's dynamic credential fetcher runs on
  a gRPC thread and reads it without locks (the object is immutable and swapped atomically);
- it exposes the leaf's expiry (``expiry_unix``) for metrics.

:class:`GrpcCA` finds the CA through a resolver (Consul service ``weft-ca``, or a fixed ``--ca-addr``),
verifies it with TLS against the trust bundle (target name ``weft-ca.svc.<ns>.<trust-domain>``) and
moves on to the next replica when one answers UNAVAILABLE (a standby).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from ca import renewal
from ca.backend import SERVICE_NAME
from ca.csr import key_pem, make_csr, make_renewal_proof, new_key
from ca.identity import SpiffeId
from ca.provider import TrustBundle
from ca.v1 import ca_pb2
from ca.wire import bundle_from_pb

if TYPE_CHECKING:  # grpc is loaded by GrpcCA and server_credentials only: a sidecar never needs its C core
    import grpc
    import grpc.aio

log = structlog.get_logger(__name__)


class StatusCodeLike(Protocol):
    """A gRPC status code: `grpc.StatusCode` (GrpcCA) or the sidecar's own CA client's, of the same names."""

    @property
    def name(self) -> str: ...


class CARefused(Exception):
    """The CA answered with a refusal (INVALID_ARGUMENT, PERMISSION_DENIED, ...): retrying the same
    request will not help. ``code.name`` is the status's name."""

    def __init__(self, code: StatusCodeLike, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class CAUnavailable(Exception):
    """No CA replica could answer (all down, standbys, or unreachable)."""


@dataclass(frozen=True, slots=True)
class SignResult:
    cert_pem: str
    chain_pem: tuple[str, ...]
    bundle: TrustBundle | None


@dataclass(frozen=True, slots=True)
class Credentials:
    """One generation of an identity's credentials; immutable, so safe to share between threads."""

    identity: SpiffeId
    key_pem: bytes
    cert_pem: bytes  # the leaf alone
    chain_pem: bytes  # intermediates (and cross-signed certificates)
    bundle: TrustBundle
    not_before: datetime
    not_after: datetime
    serial: int
    generation: int

    @property
    def cert_chain_pem(self) -> bytes:
        """Leaf followed by its chain: what a TLS endpoint presents."""
        return self.cert_pem + self.chain_pem

    @property
    def roots_pem(self) -> bytes:
        return self.bundle.roots_pem.encode()

    def valid_at(self, now: datetime) -> bool:
        return renewal.is_valid_at(now, self.not_before, self.not_after)


class CAConnector(Protocol):
    async def sign(self, csr: bytes, *, token: str, current_chain: bytes, proof: bytes, ttl_seconds: int,
                   bundle: TrustBundle | None) -> SignResult: ...

    def watch_roots(self, known_index: int, bundle: TrustBundle | None) -> AsyncIterator[TrustBundle]: ...


Resolver = Callable[[], Awaitable[list[str]]]


def fixed_resolver(*addresses: str) -> Resolver:
    async def resolve() -> list[str]:
        return list(addresses)

    return resolve


async def ca_addresses(resolve: Resolver) -> list[str]:
    """The CA replicas to try, in order; CAUnavailable when none can be found (shared by every CA
    connection, the grpc one here and the sidecar's own HTTP/2 one)."""
    try:
        addresses = await resolve()
    except Exception as exc:
        raise CAUnavailable(f"cannot find the CA: {exc}") from None
    if not addresses:
        raise CAUnavailable(f"no healthy {SERVICE_NAME} instance is registered")
    return addresses


class GrpcCA:
    """Talks to the CA's replicas over TLS; tries each address until one answers."""

    def __init__(self, resolve: Resolver, *, namespace: str = "default", timeout_s: float = 15.0) -> None:
        self._resolve = resolve
        self._namespace = namespace
        self._timeout = timeout_s
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._retired: list[grpc.aio.Channel] = []

    def _channel(self, address: str, bundle: TrustBundle) -> grpc.aio.Channel:
        import grpc.aio

        roots = bundle.roots_pem
        key = (address, roots)
        channel = self._channels.get(key)
        if channel is None:
            # New roots: new connections must verify against them, but a stream may still run on the old
            # channel (a WatchRoots watch), so old channels are closed only after a grace period.
            for old_key in [k for k in self._channels if k[0] == address]:
                self._retire(self._channels.pop(old_key))
            target = SpiffeId.for_service(bundle.trust_domain, SERVICE_NAME, namespace=self._namespace).dns_name
            creds = grpc.ssl_channel_credentials(root_certificates=roots.encode())
            channel = grpc.aio.secure_channel(address, creds, options=[
                ("grpc.ssl_target_name_override", target),
                ("grpc.default_authority", target),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ])
            self._channels[key] = channel
        return channel

    RETIRED_CHANNEL_GRACE_S = 600.0

    def _retire(self, channel: grpc.aio.Channel) -> None:
        self._retired.append(channel)
        asyncio.get_running_loop().call_later(self.RETIRED_CHANNEL_GRACE_S, self._close_retired, channel)

    def _close_retired(self, channel: grpc.aio.Channel) -> None:
        if channel in self._retired:
            self._retired.remove(channel)
            task = asyncio.ensure_future(channel.close(None))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _addresses(self) -> list[str]:
        return await ca_addresses(self._resolve)

    async def sign(self, csr: bytes, *, token: str, current_chain: bytes, proof: bytes, ttl_seconds: int,
                   bundle: TrustBundle | None) -> SignResult:
        import grpc.aio

        from ca.v1 import ca_pb2_grpc

        if bundle is None:
            raise CAUnavailable("no trust bundle yet: cannot verify the CA")
        errors: list[str] = []
        for address in await self._addresses():
            stub = ca_pb2_grpc.CAStub(self._channel(address, bundle))  # type: ignore[no-untyped-call]
            try:
                resp: ca_pb2.SignResponse = await stub.Sign(
                    ca_pb2.SignRequest(csr=csr, token=token, current_chain=current_chain, renewal_proof=proof,
                                       ttl_seconds=ttl_seconds), timeout=self._timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    errors.append(f"{address}: {exc.details()}")
                    continue
                raise CARefused(exc.code(), exc.details() or "") from None
            new_bundle = bundle_from_pb(resp.bundle) if resp.HasField("bundle") else None
            return SignResult(resp.leaf_pem, tuple(resp.chain_pem), new_bundle)
        raise CAUnavailable("no CA replica could sign: " + "; ".join(errors))

    async def rotate(self, token: str, bundle: TrustBundle) -> tuple[str, TrustBundle]:
        import grpc.aio

        from ca.v1 import ca_pb2_grpc

        errors: list[str] = []
        for address in await self._addresses():
            stub = ca_pb2_grpc.CAStub(self._channel(address, bundle))  # type: ignore[no-untyped-call]
            try:
                resp: ca_pb2.RotateResponse = await stub.Rotate(ca_pb2.RotateRequest(token=token),
                                                                timeout=self._timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    errors.append(f"{address}: {exc.details()}")
                    continue
                raise CARefused(exc.code(), exc.details() or "") from None
            return resp.new_root_id, bundle_from_pb(resp.bundle)
        raise CAUnavailable("no CA replica could rotate: " + "; ".join(errors))

    async def watch_roots(self, known_index: int, bundle: TrustBundle | None) -> AsyncIterator[TrustBundle]:
        """Stream bundles from the first replica that serves the stream; raises CAUnavailable when none."""
        import grpc.aio

        from ca.v1 import ca_pb2_grpc

        if bundle is None:
            raise CAUnavailable("no trust bundle yet: cannot verify the CA")
        errors: list[str] = []
        for address in await self._addresses():
            stub = ca_pb2_grpc.CAStub(self._channel(address, bundle))  # type: ignore[no-untyped-call]
            call = stub.WatchRoots(ca_pb2.WatchRootsRequest(known_index=known_index))
            try:
                async for pb in call:
                    yield bundle_from_pb(pb)
                errors.append(f"{address}: stream ended")
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # we are being cancelled
                errors.append(f"{address}: stream cancelled (channel closed)")  # the call was, not us
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                      grpc.StatusCode.CANCELLED):
                    raise CARefused(exc.code(), exc.details() or "") from None
                errors.append(f"{address}: {exc.details()}")
            finally:
                call.cancel()
        raise CAUnavailable("no CA replica serves WatchRoots: " + "; ".join(errors))

    async def close(self) -> None:
        for channel in [*self._channels.values(), *self._retired]:
            with contextlib.suppress(Exception):
                await channel.close(None)
        self._channels.clear()
        self._retired.clear()


def _utcnow() -> datetime:
    return datetime.now(UTC)


class LeafManager:
    """Keeps one identity's leaf fresh (see the module docstring)."""

    MIN_RENEW_INTERVAL_S = 0.5

    def __init__(self, identity: SpiffeId, ca: CAConnector, *, token: str = "",
                 bundle: TrustBundle | None = None,
                 bundle_source: Callable[[], Awaitable[TrustBundle | None]] | None = None,
                 ttl: timedelta | None = None, backoff: renewal.Backoff | None = None,
                 clock: Callable[[], datetime] = _utcnow, rng: random.Random | None = None) -> None:
        self.identity = identity
        self._ca = ca
        self._token = token
        self._bundle = bundle
        self._bundle_source = bundle_source
        self._ttl = ttl
        self._backoff = backoff or renewal.Backoff(base=0.5, factor=2.0, cap=30.0)
        self._clock = clock
        self._rng = rng or random.Random()
        self._current: Credentials | None = None
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._draw = self._rng.random()
        self._generation = 0
        self._lock = threading.Lock()
        self._subscribers: list[Callable[[Credentials], None]] = []
        self._wake = asyncio.Event()
        self._stream_index = 0
        self.renewals = 0
        self.failures = 0
        self.last_error = ""

    # -- what listeners use (any thread) ---------------------------------------------------------

    @property
    def current(self) -> Credentials | None:
        return self._current

    @property
    def bundle(self) -> TrustBundle | None:
        return self._bundle

    def expiry_unix(self) -> float | None:
        cur = self._current
        return cur.not_after.timestamp() if cur is not None else None

    def subscribe(self, callback: Callable[[Credentials], None]) -> Callable[[], None]:
        """Call ``callback(credentials)`` now (if there are any) and on every change; returns an unsubscribe."""
        with self._lock:
            self._subscribers.append(callback)
        cur = self._current
        if cur is not None:
            callback(cur)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    async def wait_ready(self, timeout: float | None = None) -> Credentials:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._current is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"no certificate for {self.identity} after {timeout}s: {self.last_error}")
            await asyncio.sleep(0.05)
        return self._current

    def server_credentials(self, require_client_auth: bool = True) -> grpc.ServerCredentials:
        """gRPC server credentials that always present the current leaf and trust the current roots."""
        import grpc

        cur = self._current
        if cur is None:
            raise RuntimeError("no certificate yet; await wait_ready() first")

        def config(c: Credentials) -> grpc.ServerCertificateConfiguration:
            return grpc.ssl_server_certificate_configuration([(c.key_pem, c.cert_chain_pem)],
                                                            root_certificates=c.roots_pem)

        served = {"generation": cur.generation}

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            latest = self._current  # runs on a gRPC thread: one atomic read
            if latest is None or latest.generation == served["generation"]:
                return None
            served["generation"] = latest.generation
            return config(latest)

        return grpc.dynamic_ssl_server_credentials(config(cur), fetch,  # type: ignore[arg-type]
                                                   require_client_authentication=require_client_auth)

    # -- the loop ---------------------------------------------------------------------------------

    def _publish(self, creds: Credentials) -> None:
        self._current = creds
        with self._lock:
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(creds)
            except Exception as exc:  # one broken listener must not stop renewals
                log.warning("ca_client.subscriber_failed", error=repr(exc))
        log.info("ca_client.credentials", identity=str(creds.identity), serial=f"{creds.serial:x}",
                 not_after=creds.not_after.isoformat(), roots=list(creds.bundle.root_ids))

    def _set_bundle(self, bundle: TrustBundle) -> bool:
        """Adopt a newer bundle; True when the set of roots changed (renew at once)."""
        old = self._bundle
        self._bundle = bundle
        changed = old is None or old.root_ids != bundle.root_ids or old.active_root_id != bundle.active_root_id
        cur = self._current
        if changed and cur is not None:
            self._generation += 1
            self._publish(Credentials(cur.identity, cur.key_pem, cur.cert_pem, cur.chain_pem, bundle,
                                      cur.not_before, cur.not_after, cur.serial, self._generation))
        return changed

    async def _bootstrap_bundle(self) -> None:
        if self._bundle is None and self._bundle_source is not None:
            bundle = await self._bundle_source()
            if bundle is not None:
                self._set_bundle(bundle)

    async def renew_once(self) -> Credentials:
        """Get a new leaf now (renewal proof when the current leaf is valid, else the token)."""
        await self._bootstrap_bundle()
        key = new_key()
        csr = make_csr(key, self.identity)
        cur = self._current
        ttl = int(self._ttl.total_seconds()) if self._ttl else 0
        result: SignResult | None = None
        if cur is not None and self._key is not None and cur.valid_at(self._clock()):
            try:
                result = await self._ca.sign(csr, token="", current_chain=cur.cert_chain_pem,
                                             proof=make_renewal_proof(self._key, csr), ttl_seconds=ttl,
                                             bundle=self._bundle)
            except CARefused as exc:
                if not self._token:
                    raise
                log.info("ca_client.renewal_refused", reason=exc.message, fallback="token")
        if result is None:
            result = await self._ca.sign(csr, token=self._token, current_chain=b"", proof=b"", ttl_seconds=ttl,
                                         bundle=self._bundle)
        if result.bundle is not None:
            self._set_bundle(result.bundle)
        bundle = self._bundle
        if bundle is None:
            raise CAUnavailable("the CA sent no trust bundle")
        cert = x509.load_pem_x509_certificate(result.cert_pem.encode())
        self._key = key
        self._draw = self._rng.random()
        self._generation += 1
        creds = Credentials(self.identity, key_pem(key), result.cert_pem.encode(),
                            "".join(result.chain_pem).encode(), bundle, cert.not_valid_before_utc,
                            cert.not_valid_after_utc, cert.serial_number, self._generation)
        self.renewals += 1
        self._publish(creds)
        return creds

    def next_renewal_delay(self) -> float:
        cur = self._current
        if cur is None:
            return 0.0
        return renewal.renewal_delay(self._clock(), cur.not_before, cur.not_after, self._draw)

    async def _sleep_or_wake(self, seconds: float, stop: asyncio.Event) -> None:
        """Sleep until ``seconds`` pass, ``stop`` is set, or the roots changed (``_wake``, cleared only when
        a renewal starts, so a change seen during a renewal is not lost)."""
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _renew_loop(self, stop: asyncio.Event) -> None:
        attempt = 0
        just_renewed = False
        while not stop.is_set():
            delay = self.next_renewal_delay()
            if just_renewed:
                # a leaf that is due at once (clock skew, a CA capping lifetimes) must not make us spin
                delay = max(delay, self.MIN_RENEW_INTERVAL_S)
            if delay > 0 and attempt == 0:
                await self._sleep_or_wake(delay, stop)
                if stop.is_set():
                    return
            just_renewed = False
            self._wake.clear()
            try:
                await self.renew_once()
                attempt = 0
                just_renewed = True
                self.last_error = ""
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                self.last_error = str(exc)
                cur = self._current
                wait = renewal.retry_delay(self._backoff, attempt, self._rng.random(), self._clock(),
                                           cur.not_after if cur else None)
                attempt += 1
                log.warning("ca_client.renew_failed", identity=str(self.identity), error=str(exc),
                            retry_in=round(wait, 2), serving_until=cur.not_after.isoformat() if cur else None)
                await self._sleep_or_wake(wait, stop)
                # a roots change while backing off: retry at once, still counting the attempt
                if self._wake.is_set():
                    continue

    async def _roots_loop(self, stop: asyncio.Event) -> None:
        attempt = 0
        while not stop.is_set():
            try:
                await self._bootstrap_bundle()
                # the CA's bundle index (not Consul's KV index): survives failover between replicas
                async for bundle in self._ca.watch_roots(self._stream_index, self._bundle):
                    attempt = 0
                    self._stream_index = bundle.index
                    if self._set_bundle(bundle) and self._current is not None:
                        log.info("ca_client.roots_changed", roots=list(bundle.root_ids), action="renew now")
                        self._wake.set()
                    if stop.is_set():
                        return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("ca_client.roots_watch_failed", error=str(exc))
                await self._poll_bundle_source()
            wait = self._backoff.delay(attempt, self._rng.random())
            attempt += 1
            await self._sleep_or_wake_stop(wait, stop)

    async def _poll_bundle_source(self) -> None:
        """While the CA's stream is down, follow the bundle published in Consul KV instead."""
        if self._bundle_source is None:
            return
        try:
            bundle = await self._bundle_source()
        except Exception as exc:
            log.debug("ca_client.bundle_source_failed", error=str(exc))
            return
        if bundle is not None and self._set_bundle(bundle) and self._current is not None:
            log.info("ca_client.roots_changed", roots=list(bundle.root_ids), source="kv", action="renew now")
            self._wake.set()

    async def _sleep_or_wake_stop(self, seconds: float, stop: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set: keep the leaf fresh and follow the roots."""
        tasks = [asyncio.create_task(self._renew_loop(stop)), asyncio.create_task(self._roots_loop(stop))]
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t

    def start(self, stop: asyncio.Event) -> asyncio.Task[None]:
        return asyncio.create_task(self.run(stop), name=f"leaf-manager:{self.identity.service}")


def describe(creds: Credentials) -> dict[str, Any]:
    """A summary for logs, ``/config`` dumps and ``weft status`` (no key material)."""
    return {"identity": str(creds.identity), "serial": f"{creds.serial:x}",
            "not_before": creds.not_before.isoformat(), "not_after": creds.not_after.isoformat(),
            "roots": list(creds.bundle.root_ids), "active_root": creds.bundle.active_root_id,
            "generation": creds.generation}
