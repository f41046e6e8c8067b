"""The CA process: the ``weft.ca.v1.CA`` gRPC service (grpc.aio), leadership, upkeep, registration.

Replicas share one state in Consul KV. Exactly one is *active* at a time: the holder of the session
lock on ``weft/ca/leader``. The active replica signs, rotates, prunes and publishes the bundle; a
*standby* answers every call with UNAVAILABLE (clients then try another replica) and takes over when
the lock is released or its session expires.

Every replica serves TLS with its own ``weft-ca`` leaf (signed from the shared state), so clients
verify the CA against the bundle in ``weft/ca/roots`` with target name
``weft-ca.svc.default.<trust-domain>``; ACL tokens never cross the network in clear.

Authorization of ``Sign`` (see ``ca.authz``): a Consul ACL token with ``service:write`` on the
CSR's service, or (renewal) a current, valid leaf of the same identity plus a signature by its key
over the new CSR. With ACLs disabled anyone gets any identity, and the CA warns at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import structlog
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ca import renewal
from ca.authz import TokenAuthorizer
from ca.backend import SERVICE_NAME, BackendError, LeaderLock, Registry
from ca.builtin import BuiltinProvider
from ca.csr import key_pem, make_csr, new_key, parse_csr, verify_renewal
from ca.identity import SpiffeId
from ca.provider import CAConfig, CAError, InvalidRequest, NotAuthorized, Provider, SignedLeaf, TrustBundle
from ca.store import CAStore
from ca.v1 import ca_pb2, ca_pb2_grpc

HEALTH_SERVICE_NAME = "weft.ca.v1.CA"

log = structlog.get_logger(__name__)


class NotActive(CAError):
    """This replica is a standby (or not ready): UNAVAILABLE, try another."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def bundle_to_pb(bundle: TrustBundle) -> ca_pb2.TrustBundle:
    doc = bundle.to_consul()
    return ca_pb2.TrustBundle(
        trust_domain=bundle.trust_domain,
        active_root_id=bundle.active_root_id,
        index=bundle.index,
        cluster_id=bundle.cluster_id,
        roots=[
            ca_pb2.Root(
                id=r["ID"], name=r["Name"], serial_number=r["SerialNumber"],
                signing_key_id=r["SigningKeyID"], not_before=r["NotBefore"], not_after=r["NotAfter"],
                root_cert=r["RootCert"], intermediate_certs=r["IntermediateCerts"], active=r["Active"],
                private_key_type=r["PrivateKeyType"], private_key_bits=r["PrivateKeyBits"],
                create_index=r["CreateIndex"], modify_index=r["ModifyIndex"],
            )
            for r in doc["Roots"]
        ],
    )


@dataclass(frozen=True, slots=True)
class ServingCert:
    key_pem: bytes
    chain_pem: bytes  # leaf + chain
    not_before: datetime
    not_after: datetime
    roots_key: tuple[str, ...]


class CAService:
    """The CA's logic, transport aside: signing, rotation, upkeep, roots watchers, leadership state."""

    def __init__(self, store: CAStore, authorizer: TokenAuthorizer, config: CAConfig, *,
                 datacenter: str = "dc1", own_token: str = "", clock: Callable[[], datetime] = utcnow,
                 provider: Provider | None = None) -> None:
        self.store = store
        self.authorizer = authorizer
        self.config = config
        self.datacenter = datacenter
        self.own_token = own_token
        self.clock = clock
        self.provider: Provider = provider or BuiltinProvider()
        self.trust_domain = ""
        self.active = False
        self.acls_enabled = True
        self._mutex = asyncio.Lock()
        self._bundle: TrustBundle | None = None
        self._bundle_changed = asyncio.Condition()
        self.serving: ServingCert | None = None
        self.signed = 0
        self._published_index = -1

    # -- state ------------------------------------------------------------------------------------

    @property
    def bundle(self) -> TrustBundle | None:
        return self._bundle

    async def prepare(self) -> None:
        """Learn the trust domain and whether ACLs are on (warns when they are off)."""
        self.trust_domain = await self.store.trust_domain()
        self.acls_enabled = await self.authorizer.acls_enabled(self.own_token)
        if not self.acls_enabled:
            log.warning("ca.acls_disabled",
                        message="Consul ACLs are disabled: ANY caller gets ANY identity from this CA")

    async def refresh_acl_mode(self) -> None:
        """Re-check (with the CA's own token) whether Consul's ACLs are on; warn when that changes."""
        before = self.acls_enabled
        self.acls_enabled = await self.authorizer.acls_enabled(self.own_token)
        if before != self.acls_enabled:
            log.warning("ca.acl_mode_changed", acls_enabled=self.acls_enabled,
                        message="ANY caller now gets ANY identity" if not self.acls_enabled else
                        "tokens are checked again")

    async def load(self) -> bool:
        """Load the shared state (as a standby does, read-only). False when there is none yet."""
        async with self._mutex:
            state = await self.store.load_state(self.trust_domain)
            if state is None:
                return False
            self.provider.configure(self.config, self.trust_domain, state, self.clock())
            await self._set_bundle(self.provider.bundle(self.provider.state_index), publish=False)
            return True

    async def become_active(self) -> None:
        """Called with the leader lock held: load (or create) the state, tidy up, publish, serve."""
        async with self._mutex:
            now = self.clock()
            state = await self.store.load_state(self.trust_domain)
            created = state is None
            self.provider.configure(self.config, self.trust_domain, state, now)
            changed = self.provider.maintain(now)
            if created or changed or self.provider.state() != state:
                if not await self.store.save_state(self.trust_domain, self.provider.state()):
                    raise NotActive("another replica wrote the CA state while this one took over")
            self.active = True
            self._published_index = -1
            await self._set_bundle(self.provider.bundle(self.provider.state_index), publish=True)
        log.info("ca.active", trust_domain=self.trust_domain, created=created,
                 active_root=self._bundle.active_root_id if self._bundle else None)

    def become_standby(self) -> None:
        if self.active:
            log.warning("ca.standby", message="lost the leader lock; answering UNAVAILABLE")
        self.active = False

    async def _set_bundle(self, bundle: TrustBundle, *, publish: bool) -> None:
        async with self._bundle_changed:
            self._bundle = bundle
            self._bundle_changed.notify_all()
        if publish:
            await self.publish()

    async def publish(self) -> None:
        """Write the current bundle to KV ``weft/ca/roots`` (the upkeep retries after a failure)."""
        bundle = self._bundle
        if bundle is not None and self.active and self._published_index != bundle.index:
            await self.store.publish_roots(bundle)
            self._published_index = bundle.index

    async def _persist(self, before: dict[str, Any]) -> None:
        """Save the provider's changed state; on failure, return the provider to ``before``."""
        try:
            saved = await self.store.save_state(self.trust_domain, self.provider.state())
        except Exception:
            self.provider.configure(self.config, self.trust_domain, before, self.clock())
            raise
        if not saved:
            self.provider.configure(self.config, self.trust_domain, before, self.clock())
            self.active = False
            raise NotActive("the CA state changed under this replica; it steps down")
        # watchers and signing use the new state at once; KV gets it now or on the next upkeep
        await self._set_bundle(self.provider.bundle(self.provider.state_index), publish=False)
        with contextlib.suppress(Exception):
            await self.publish()

    async def maintain(self) -> bool:
        if not self.active:
            return False
        async with self._mutex:
            before = self.provider.state()
            if not self.provider.maintain(self.clock()):
                return False
            await self._persist(before)
        log.info("ca.maintained", roots=list(self._bundle.root_ids) if self._bundle else [])
        return True

    # -- RPCs -------------------------------------------------------------------------------------

    async def sign(self, csr: bytes, token: str, current_chain: bytes, proof: bytes,
                   ttl_seconds: int) -> SignedLeaf:
        if not self.active:
            raise NotActive("this CA replica is a standby; try another")
        request = parse_csr(csr, self.trust_domain)
        try:
            ttl = renewal.clamp_ttl(timedelta(seconds=ttl_seconds) if ttl_seconds else None, self.config.leaf_ttl,
                                    self.config.min_leaf_ttl, self.config.max_leaf_ttl)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        service = request.identity.service
        if request.identity.datacenter != self.datacenter:
            raise NotAuthorized(f"identity {request.identity} names datacenter {request.identity.datacenter!r}; "
                                f"this CA issues for {self.datacenter!r}")
        if current_chain:
            bundle = self._bundle
            if bundle is None:
                raise NotActive("the CA has no bundle yet")
            verify_renewal(request, current_chain, proof, bundle.roots_pem, self.clock())
            how = "renewal"
        else:
            decision = await self.authorizer.may_write_service(token, service)
            if decision is None:
                how = "acls-disabled"
            elif not decision.allowed:
                raise NotAuthorized(f"may not issue {request.identity}: {decision.reason}")
            else:
                how = "token"
        async with self._mutex:
            if not self.active:
                raise NotActive("this CA replica is a standby; try another")
            leaf = self.provider.sign(request, ttl, self.clock())
        self.signed += 1
        log.info("ca.signed", identity=str(leaf.identity), serial=f"{leaf.serial:x}", by=how,
                 not_after=leaf.not_after.isoformat())
        return leaf

    async def rotate(self, token: str) -> str:
        if not self.active:
            raise NotActive("this CA replica is a standby; try another")
        decision = await self.authorizer.may_operate(token)
        if decision is not None and not decision.allowed:
            raise NotAuthorized(f"may not rotate the CA: {decision.reason}")
        async with self._mutex:
            if not self.active:
                raise NotActive("this CA replica is a standby; try another")
            before = self.provider.state()
            new_id = self.provider.rotate(self.clock())
            await self._persist(before)
        log.info("ca.rotated", new_root=new_id, roots=list(self._bundle.root_ids) if self._bundle else [])
        return new_id

    async def watch(self, known_index: int) -> AsyncIterator[TrustBundle]:
        """Yield the bundle when newer than ``known_index``, then every change."""
        last = known_index

        def newer() -> bool:
            return self._bundle is not None and self._bundle.index > last

        while True:
            async with self._bundle_changed:
                await self._bundle_changed.wait_for(newer)
                bundle = self._bundle
            assert bundle is not None
            last = bundle.index
            yield bundle

    # -- the CA's own serving certificate --------------------------------------------------------

    def serving_identity(self) -> SpiffeId:
        return SpiffeId.for_service(self.trust_domain, SERVICE_NAME, datacenter=self.datacenter)

    def issue_serving_cert(self) -> ServingCert:
        """A fresh leaf for this replica's TLS listener, signed from the loaded state."""
        key: ec.EllipticCurvePrivateKey = new_key()
        request = parse_csr(make_csr(key, self.serving_identity()), self.trust_domain)
        leaf = self.provider.sign(request, self.config.leaf_ttl, self.clock())
        bundle = self.provider.bundle(0)
        self.serving = ServingCert(key_pem(key), (leaf.cert_pem + "".join(leaf.chain_pem)).encode(),
                                   leaf.not_before, leaf.not_after, bundle.root_ids)
        return self.serving

    def serving_cert_due(self) -> bool:
        s = self.serving
        if s is None:
            return True
        if self._bundle is not None and s.roots_key != self._bundle.root_ids:
            return True
        return self.clock() >= renewal.renewal_time(s.not_before, s.not_after, 0.5)

    def seconds_until_serving_due(self) -> float:
        """How long until the serving certificate is due for renewal (0 when it is due now)."""
        s = self.serving
        if s is None:
            return 0.0
        due = renewal.renewal_time(s.not_before, s.not_after, 0.5)
        return max(0.0, (due - self.clock()).total_seconds())


def _status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, NotAuthorized):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    if isinstance(exc, NotActive):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, CAError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if _is_backend_outage(exc):
        return grpc.StatusCode.UNAVAILABLE, f"the CA cannot reach Consul now ({type(exc).__name__}: {exc}); retry"
    return grpc.StatusCode.INTERNAL, f"the CA failed on this request ({type(exc).__name__}); see its log"


def _is_backend_outage(exc: Exception) -> bool:
    """Consul unreachable or failing (the adapters' errors are named Consul*; ``ca`` does not import them)."""
    if isinstance(exc, OSError | TimeoutError | BackendError):
        return True
    return any(cls.__name__.startswith("Consul") for cls in type(exc).__mro__)


class CAServicer(ca_pb2_grpc.CAServicer):
    def __init__(self, service: CAService) -> None:
        self.service = service

    async def Sign(self, request: ca_pb2.SignRequest, context: grpc.aio.ServicerContext[Any, Any]
                   ) -> ca_pb2.SignResponse:
        try:
            leaf = await self.service.sign(request.csr, request.token, request.current_chain,
                                           request.renewal_proof, request.ttl_seconds)
        except Exception as exc:
            code, message = _status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.error("ca.sign_failed", error=repr(exc), exc_info=exc)
            elif code == grpc.StatusCode.UNAVAILABLE and not isinstance(exc, NotActive):
                log.warning("ca.sign_failed", error=repr(exc))
            else:
                log.info("ca.refused", code=code.name, reason=message)
            await context.abort(code, message)
        bundle = self.service.bundle
        return ca_pb2.SignResponse(
            spiffe_id=str(leaf.identity), leaf_pem=leaf.cert_pem, chain_pem=list(leaf.chain_pem),
            serial=str(leaf.serial), not_before_unix=int(leaf.not_before.timestamp()),
            not_after_unix=int(leaf.not_after.timestamp()), root_id=leaf.root_id,
            bundle=bundle_to_pb(bundle) if bundle is not None else None,
        )

    async def WatchRoots(self, request: ca_pb2.WatchRootsRequest, context: grpc.aio.ServicerContext[Any, Any]
                         ) -> AsyncIterator[ca_pb2.TrustBundle]:
        if not self.service.active:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this CA replica is a standby; try another")
        async for bundle in self.service.watch(request.known_index):
            if not self.service.active:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "this CA replica stepped down; try another")
            yield bundle_to_pb(bundle)

    async def Rotate(self, request: ca_pb2.RotateRequest, context: grpc.aio.ServicerContext[Any, Any]
                     ) -> ca_pb2.RotateResponse:
        try:
            new_id = await self.service.rotate(request.token)
        except Exception as exc:
            code, message = _status_for(exc)
            log.info("ca.rotate_refused", code=code.name, reason=message)
            await context.abort(code, message)
        bundle = self.service.bundle
        return ca_pb2.RotateResponse(new_root_id=new_id,
                                     bundle=bundle_to_pb(bundle) if bundle is not None else None)


@dataclass
class ServeOptions:
    listen: str = "127.0.0.1:0"
    advertise: str = ""
    service_id: str = ""
    check_ttl_s: float = 15.0
    maintain_interval_s: float = 30.0


class CAServer:
    """Runs one replica: TLS gRPC listener, leader election, upkeep, Consul registration."""

    def __init__(self, service: CAService, lock: LeaderLock, registry: Registry | None,
                 options: ServeOptions) -> None:
        self.service = service
        self.lock = lock
        self.registry = registry
        self.options = options
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.ready = asyncio.Event()
        self.address = ""
        self.service_id = ""
        self._served: ServingCert | None = None
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.registered = asyncio.Event()
        self.lock_held_for_bootstrap = False

    def _initial_cert_config(self) -> grpc.ServerCertificateConfiguration:
        serving = self.service.serving or self.service.issue_serving_cert()
        self._served = serving
        return grpc.ssl_server_certificate_configuration([(serving.key_pem, serving.chain_pem)])

    def _cert_config(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate fetcher (runs on a gRPC thread): a new configuration when the leaf changed."""
        serving = self.service.serving
        if serving is None or serving is self._served:
            return None
        self._served = serving
        return grpc.ssl_server_certificate_configuration([(serving.key_pem, serving.chain_pem)])

    async def _initial_state(self, stop: asyncio.Event) -> bool:
        """Load the shared state, or create it as the first leader. False if stopped first."""
        await self.service.prepare()
        while not stop.is_set():
            if await self.service.load():
                return True
            # no state yet: whoever holds the lock creates it
            acquire = asyncio.ensure_future(self.lock.acquire())
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({acquire, stopper}, timeout=2.0, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if acquire in done:
                acquire.result()
                self.lock_held_for_bootstrap = True
                try:
                    await self.service.become_active()
                except Exception:
                    await self.lock.release()
                    raise
                return True
            acquire.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await acquire
            self.lock_held_for_bootstrap = True  # the campaign may go on in the background
        return False

    async def start(self, stop: asyncio.Event) -> bool:
        if not await self._initial_state(stop):
            return False
        if self.registry is not None and (self.service.active or self.lock_held_for_bootstrap):
            # The first term only created the state. Campaign again once registered, so that the lock's
            # session is tied to this replica's health check: if the process dies, Consul invalidates
            # the session when the check's TTL lapses, and a standby takes over within that TTL.
            self.service.active = False
            await self.lock.release()
        self.service.issue_serving_cert()
        creds = grpc.dynamic_ssl_server_credentials(self._initial_cert_config(),
                                                    self._cert_config,  # type: ignore[arg-type]
                                                    require_client_authentication=False)
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        ca_pb2_grpc.add_CAServicer_to_server(CAServicer(self.service), server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.port = server.add_secure_port(self.options.listen, creds)
        if self.port == 0:
            raise CAError(f"cannot listen on {self.options.listen}")
        await server.start()
        self._server = server
        host = self.options.listen.rsplit(":", 1)[0] or "127.0.0.1"
        if host in ("0.0.0.0", "[::]", ""):
            host = socket.gethostname()
        self.address = self.options.advertise or f"{host}:{self.port}"
        log.info("ca.listening", address=self.address, trust_domain=self.service.trust_domain,
                 active=self.service.active)
        self._tasks = [asyncio.create_task(self._leadership(stop)), asyncio.create_task(self._upkeep(stop)),
                       asyncio.create_task(self._health_status(stop))]
        if self.registry is not None:
            self._tasks.append(asyncio.create_task(self._registration(stop)))
        self.ready.set()
        return True

    async def _leadership(self, stop: asyncio.Event) -> None:
        if self.registry is not None:
            # campaign once registered (see start); without a working registry, campaign anyway
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.registered.wait(), 3 * self.options.check_ttl_s)
        while not stop.is_set():
            try:
                if not self.service.active:
                    await self.lock.acquire()
                    await self.service.become_active()
                    self.service.issue_serving_cert()
                await self.lock.wait_lost()
                self.service.become_standby()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.service.become_standby()
                log.warning("ca.leadership_error", error=repr(exc))
                await asyncio.sleep(1.0)

    async def _health_status(self, stop: asyncio.Event) -> None:
        """grpc.health.v1 on the CA's port: SERVING on the active replica, NOT_SERVING on a standby."""
        shown: bool | None = None
        while not stop.is_set():
            active = self.service.active
            if active != shown:
                status = health_pb2.HealthCheckResponse.SERVING if active else \
                    health_pb2.HealthCheckResponse.NOT_SERVING
                for name in ("", HEALTH_SERVICE_NAME):
                    await self._health.set(name, status)
                shown = active
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    async def _upkeep(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            # Wake for the serving certificate too: with short leaf TTLs (tests, --leaf-ttl 12s) it is
            # due long before the next maintenance round, and an expired one breaks every client.
            interval = min(self.options.maintain_interval_s, max(0.2, self.service.seconds_until_serving_due()))
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass
            if stop.is_set():
                return
            try:
                await self.service.refresh_acl_mode()
                if self.service.active:
                    await self.service.maintain()
                    await self.service.publish()
                else:
                    await self.service.load()  # a standby follows the shared state
                if self.service.serving_cert_due():
                    self.service.issue_serving_cert()
            except Exception as exc:
                log.warning("ca.upkeep_failed", error=repr(exc))

    async def _registration(self, stop: asyncio.Event) -> None:
        assert self.registry is not None
        sid = self.options.service_id or f"{SERVICE_NAME}-{self.address.replace(':', '-')}"
        self.service_id = sid
        host, port = self.address.rsplit(":", 1)
        # Registered once: re-registering would reset the TTL check to critical, and the leader's lock
        # session is tied to that check. The role goes in the check's output ("active"/"standby"),
        # which clients use to try the active replica first.
        registered = False
        while not stop.is_set():
            try:
                if not registered:
                    await self.registry.register(sid, host, int(port), [], self.options.check_ttl_s)
                    registered = True
                await self.registry.pass_check(sid, "active" if self.service.active else "standby")
                self.registered.set()
            except Exception as exc:
                registered = False
                log.warning("ca.registration_failed", error=repr(exc))
            try:
                await asyncio.wait_for(stop.wait(), self.options.check_ttl_s / 3)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.registry is not None and self.service_id:
            with contextlib.suppress(Exception):
                await self.registry.deregister(self.service_id)
        self.service.active = False  # stopping, not losing: no warning
        with contextlib.suppress(Exception):
            await self.lock.release()
        if self._server is not None:
            await self._server.stop(grace=1.0)
