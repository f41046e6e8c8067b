"""The public port: mTLS only, the caller's identity from its certificate, every call authorized.

Each accepted connection goes through a TLS handshake with the context of the *current* snapshot
(a rotated leaf or trust bundle applies to the next handshake), with ALPN ``h2`` for gRPC services
and ``http/1.1`` for HTTP ones. A failed handshake (plaintext, foreign CA, expired or absent
client certificate) or a certificate without a SPIFFE identity of this trust domain is counted in
``weft_tls_handshake_errors_total`` by reason and closed; other connections are not affected.

Then the caller's identity is authorized for the connection (``policies.evaluate``):

- an L4 allow in enforce mode ("pass-through"): every call on the connection would be allowed, so
  its bytes go straight to the app; per-call metrics come from the caller's outbound side;
- otherwise, for gRPC and HTTP services ("full path"): a server authorizes every call with the
  caller's identity and answers PERMISSION_DENIED / 403 naming the deciding rule, or forwards the
  call to the app. For gRPC it is the frame-level HTTP/2 proxy of ``sidecar.h2_proxy``, fed the
  decrypted bytes in this process (``TlsServerConnection.attach_protocol``), the identity handed to
  its connection; for HTTP an aiohttp server on loopback, into which the decrypted connection is
  spliced and which learns the caller's identity from the local port of the splice connection;
- for TCP services a denied connection is closed (and counted and logged with its rule).

When the policy changes, open pass-through connections (and TCP connections) are re-decided and
closed if their pair is no longer allowed that way; gRPC clients reconnect and come back through
the path that now applies.

Bounds (``sidecar.limits``): at most ``max_connections`` open connections and
``max_pending_handshakes`` unfinished handshakes (the oldest dropped past it), each handshake within
``handshake_timeout`` (``sidecar.tls_conn.TlsAdmission``); pass-through and TCP connections that
move no byte (and, for HTTP/2, have no open stream) for ``idle_timeout`` are closed; the frames of
pass-through HTTP/2 connections are checked in both directions by ``sidecar.h2guard``.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import structlog

from ca.identity import SpiffeId
from sidecar import authz
from sidecar.authorizer import Authorizer
from sidecar.h2guard import H2Guard, Violation
from sidecar.limits import Limits
from sidecar.pipe import IdleSweeper, Pipe
from sidecar.snapshot import InboundTraffic, Snapshot
from sidecar.telemetry import Telemetry
from sidecar.tls import PeerIdentityError, TlsContexts, peer_identity, tls_error_reason
from sidecar.tls_conn import TlsAdmission, TlsServerConnection
from sidecar.traffic import InboundControls

if TYPE_CHECKING:  # the full-path servers are imported when the first caller needs one
    from sidecar.h2_proxy import H2Inbound
    from sidecar.http_proxy import InboundHttp
    from sidecar.tap import TapHub

log = structlog.get_logger("weft.sidecar.inbound")


class Inbound:
    """The public listener and the internal full-path servers of one sidecar."""

    def __init__(self, snapshot: Callable[[], Snapshot], telemetry: Telemetry, tls: TlsContexts, *,
                 max_message_bytes: int = 4 * 1024 * 1024, passthrough_enabled: bool = True,
                 limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.snapshot = snapshot
        self.telemetry = telemetry
        self.authorizer = Authorizer(telemetry)
        self.tls = tls
        self.max_message_bytes = max_message_bytes
        self.passthrough_enabled = passthrough_enabled
        self.identities: dict[int, SpiffeId] = {}
        # which splice holds each local port: loopback ports are reused at once (tcp_tw_reuse), so a closed
        # splice may only forget the identity of its own port, not that of a newer splice on the same one
        self._splice_of_port: dict[int, Pipe] = {}
        self.draining = False
        self._server: asyncio.AbstractServer | None = None
        self._http: InboundHttp | None = None
        self._h2: H2Inbound | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._internal_lock = asyncio.Lock()
        # open connections by (caller service, mode): re-decided when the policy changes
        self.connections: dict[Pipe, tuple[SpiffeId, str]] = {}
        self._policy_version = ""
        self.port = 0
        self.admission = TlsAdmission("public", self.limits, telemetry)
        self._idle = IdleSweeper("public", self.limits.idle_timeout, lambda: self.connections, telemetry)
        telemetry.tap.changed.append(self._tap_changed)
        # rate limits and faults: a caller they may apply to goes through the per-call (full) path
        self.controls = InboundControls()
        self._controls_config: InboundTraffic | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        snap = self.snapshot()
        self._policy_version = snap.policy_version
        protocol = snap.registration.protocol
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, host, port, reuse_address=True, backlog=1024)
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        self._idle.start()
        log.info("inbound_listening", address=f"{host}:{self.port}", protocol=protocol)
        return self.port

    def stop_accepting(self) -> None:
        self.draining = True
        if self._server is not None:
            self._server.close()
        self._idle.stop()

    async def close(self, grace: float = 5.0) -> None:
        self.stop_accepting()
        if self._http is not None:
            await self._http.close()
        if self._h2 is not None:
            await self._h2.close(grace)
        deadline = time.monotonic() + grace
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for pipe in list(self.connections):
            pipe.close(abort=True)
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one connection ------------------------------------------------------------------------
    def _accept(self) -> asyncio.BaseProtocol:
        pipe = Pipe(on_close=self._closed)
        return TlsServerConnection(pipe, self._context, self._handshaken, self._tls_failed, admission=self.admission)

    def _context(self) -> ssl.SSLContext:
        snap = self.snapshot()
        return self.tls.server(snap.credentials, snap.registration.protocol)

    def _handshaken(self, conn: TlsServerConnection) -> None:
        snap = self.snapshot()
        try:
            der = conn.sslobj.getpeercert(binary_form=True)
            ident = peer_identity(der, snap.credentials.trust_domain)
        except PeerIdentityError as exc:
            self._tls_failed(conn, exc)
            conn.raw.abort()
            return
        if self.draining:
            conn.raw.abort()
            return
        # decided before the first decrypted byte is read, so that a pass-through connection's guard sees them all,
        # and the full path's HTTP/2 server every frame
        decision = authz.decide(snap.policy, ident.uri, authz.TCP)
        protocol = snap.registration.protocol
        passthrough = protocol != "tcp" and self._passthrough(decision, ident.service, snap) \
            and not self.telemetry.tap.wants_calls_from(ident.service, snap.registration.service)
        if protocol == "grpc":
            if not passthrough:
                self._h2_full_path(conn, ident)
                return
            # a gRPC app speaks nothing but HTTP/2, so the guard applies whatever the client's ALPN said (or omitted)
            conn.pipe.info["source"] = ident.service
            conn.pipe.watch(H2Guard(self.limits), self._violation)
        self._spawn(self._route(conn, ident, snap, decision, passthrough))

    def _h2_full_path(self, conn: TlsServerConnection, ident: SpiffeId) -> None:
        """A gRPC caller's decrypted connection goes to the frame-level HTTP/2 server in this process."""
        if self._h2 is None:
            from sidecar.h2_proxy import H2Inbound

            self._h2 = H2Inbound(self)
        conn.pipe.info.update(source=ident.service, mode="full")
        conn.attach_protocol(self._h2.connection_for(ident))
        self.telemetry.inbound_connections.labels("full").inc()

    async def _route(self, conn: TlsServerConnection, ident: SpiffeId, snap: Snapshot,
                     decision: authz.Decision, passthrough: bool) -> None:
        pipe = conn.pipe
        protocol = snap.registration.protocol
        app = (snap.registration.local_service_address, snap.registration.local_service_port)
        try:
            if protocol == "tcp":
                if not self.authorizer.settle(decision, ident, snap.registration.service).allowed:
                    self.telemetry.inbound_connections.labels("denied").inc()
                    self.telemetry.request("inbound", ident.service, snap.registration.service, "tcp", "denied", 0.0)
                    conn.close()
                    return
                pipe.info.update(source=ident.service, mode="tcp")
                self.connections[pipe] = (ident, "tcp")
                await pipe.connect_b(*app)
                self.telemetry.inbound_connections.labels("passthrough").inc()
            elif passthrough:  # checked frame by frame when it is HTTP/2 (see _handshaken)
                self.authorizer.settle(decision, ident, snap.registration.service)
                pipe.info.update(source=ident.service, mode="passthrough")
                self.connections[pipe] = (ident, "passthrough")
                await pipe.connect_b(*app)
                self.telemetry.inbound_connections.labels("passthrough").inc()
            else:
                pipe.info.update(source=ident.service, mode="full")
                internal = await self._internal(protocol)
                transport = await pipe.connect_b("127.0.0.1", internal)
                local_port = int(transport.get_extra_info("sockname")[1])
                self._remember_splice(local_port, ident, pipe)
                pipe.info["local_port"] = local_port
                self.telemetry.inbound_connections.labels("full").inc()
            pipe.start()
        except (OSError, TimeoutError, ConnectionError) as exc:
            if not pipe.a.closed and pipe.violation is None:  # else the client went first (refusals are logged)
                log.warning("app_connect_failed", app=f"{app[0]}:{app[1]}", error=str(exc))
            self.connections.pop(pipe, None)
            pipe.close(abort=True)

    def controls_for(self, snap: Snapshot) -> InboundControls:
        if snap.inbound is not self._controls_config:
            self._controls_config = snap.inbound
            self.controls.update(snap.inbound)
        return self.controls

    def _passthrough(self, decision: authz.Decision, caller: str, snap: Snapshot) -> bool:
        """Pass-through when every call would be allowed and no rate limit or fault applies to the caller."""
        return (self.passthrough_enabled and authz.passthrough(decision)
                and not self.controls_for(snap).needs_call_path(caller))

    async def _internal(self, protocol: str) -> int:
        """The port of the internal full-path server for ``protocol`` (started on first use): HTTP only,
        gRPC's full path runs in process (see _h2_full_path)."""
        async with self._internal_lock:
            if protocol == "http":
                if self._http is None:
                    from sidecar.http_proxy import InboundHttp

                    http = InboundHttp(self)
                    await http.start()
                    self._http = http
                return int(self._http.port)
        raise ConnectionRefusedError(f"no internal server for protocol {protocol}")

    def _tls_failed(self, conn: TlsServerConnection, exc: BaseException) -> None:
        reason = tls_error_reason(exc)
        self.telemetry.tls_errors.labels("inbound", reason).inc()
        peer = conn.raw.get_extra_info("peername") if conn.raw is not None else None
        # rate-limited: a flood of bad handshakes must not turn the log into the attack
        self.telemetry.peer_log.warning(time.monotonic(), "tls_refused", reason=reason,
                                        peer=f"{peer[0]}:{peer[1]}" if peer else "", error=str(exc)[:200])

    def _violation(self, pipe: Pipe, violation: Violation) -> None:
        """A pass-through client broke a frame-level limit (its connection is being closed): count and log once."""
        self.telemetry.h2_protocol_error(violation.reason)
        self.telemetry.peer_log.warning(time.monotonic(), "h2_protocol_error", reason=violation.reason,
                                        code=violation.code, detail=violation.detail, mode="passthrough",
                                        source=pipe.info.get("source", ""))

    def _remember_splice(self, local_port: int, ident: SpiffeId, pipe: Pipe) -> None:
        """The full-path server finds the caller of a spliced connection by the splice's local port."""
        self.identities[local_port] = ident
        self._splice_of_port[local_port] = pipe

    def _closed(self, pipe: Pipe) -> None:
        entry = self.connections.pop(pipe, None)
        port = pipe.info.get("local_port")
        if port is not None and self._splice_of_port.get(port) is pipe:
            del self._splice_of_port[port]
            self.identities.pop(port, None)
        if entry is not None and entry[1] == "tcp":
            snap = self.snapshot()
            self.telemetry.request("inbound", entry[0].service, snap.registration.service, "tcp", "closed",
                                   time.monotonic() - pipe.started)

    def _tap_changed(self, hub: TapHub) -> None:
        """A tap opened: pass-through connections of the callers it may match are closed, so that they
        come back through the per-call path where the tap sees their calls (as after a policy change)."""
        service = self.snapshot().registration.service
        for pipe, (ident, mode) in list(self.connections.items()):
            if mode == "passthrough" and hub.wants_calls_from(ident.service, service):
                log.info("connection_closed_for_tap", source=ident.service, destination=service)
                self.connections.pop(pipe, None)
                pipe.close(abort=True)

    # -- policy changes ------------------------------------------------------------------------
    def on_snapshot(self, snap: Snapshot) -> None:
        """Re-decide open pass-through and TCP connections when the policy changed."""
        if self._h2 is not None:
            self._h2.on_snapshot()
        controls_changed = snap.inbound is not self._controls_config
        self.controls_for(snap)
        if snap.policy_version == self._policy_version and not controls_changed:
            return
        self._policy_version = snap.policy_version
        closed = 0
        for pipe, (ident, mode) in list(self.connections.items()):
            decision = authz.decide(snap.policy, ident.uri, authz.TCP)
            keep = decision.allowed if mode == "tcp" else self._passthrough(decision, ident.service, snap)
            if not keep:
                closed += 1
                self.telemetry.inbound_connections.labels("closed_by_policy").inc()
                log.info("connection_closed_by_policy", source=ident.service,
                         destination=snap.registration.service, rule=decision.rule_label, mode=mode)
                self.connections.pop(pipe, None)
                pipe.close(abort=True)
        if closed:
            log.info("policy_change_closed_connections", count=closed, policy_version=snap.policy_version)
