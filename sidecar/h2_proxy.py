"""The outbound gRPC listener as a frame-level HTTP/2 proxy (and, in ``H2Inbound``, the inbound full path).

Why: a grpc.aio server plus a grpc.aio client cost several hundred microseconds of CPU per call in
grpc's core and the event loop, whatever the options. This proxy keeps HTTP/2 end to end and does
only what a sidecar must do per call: it reads the app's streams, picks an endpoint for each new
stream (P2C/EWMA, ``sidecar.balance``), and forwards the stream's frames to one HTTP/2 connection per
endpoint (mTLS, ALPN h2, server identity checked), rewriting stream ids; responses come back the same
way. Messages, metadata (``-bin`` included), deadlines (``grpc-timeout``), status codes, details and
trailers pass through untouched, for every kind of call, because header blocks are forwarded as
they are:

- the proxy announces ``SETTINGS_HEADER_TABLE_SIZE=0`` to both sides, so once that is acknowledged
  every header block is context-free (static table and literals) and can move to another connection
  as is; blocks a peer sent before acknowledging (its first call or two), or that are not
  context-free, are decoded with a full HPACK decoder and re-encoded without the dynamic table;
- the method (``:path``) and the final ``grpc-status`` are read for metrics by a small scanner over
  the block (``sidecar.h2.hpack``), not by decoding every header.

The protocol itself (frame validation, stream states, flow-control windows, limits, GOAWAY) is the
pure state machine :class:`sidecar.h2.connection.H2Connection`; ``sidecar.h2_conn`` puts it on
asyncio transports, and this module does the proxying on top. Flow control is per connection and per stream on both
legs: data the peer has no window for is queued, and window updates to a sender are only given for
data already passed on (back-pressure), so what waits for one peer is bounded by the windows the
sidecar grants. A peer that does not read its socket is not read from either (``pause_writing``
pauses reading; no DATA is written to it until it drains). PINGs and SETTINGS are answered
locally. A stream whose upstream connection fails before anything was sent is retried once on
another endpoint; later failures end it with UNAVAILABLE (or the upstream's RST_STREAM), as a
direct client would see. An upstream's SETTINGS_MAX_CONCURRENT_STREAMS is honoured by queueing
streams until one of its streams ends; a connection is retired (no new streams) before its stream
ids run out.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import TYPE_CHECKING, Any

from sidecar import h2_circuit, h2_idle, h2_traffic
from sidecar.h2.frames import (
    DATA,
    E_CANCEL,
    E_PROTOCOL,
    HEADERS,
    frame,
)
from sidecar.h2.grpc import (
    INTERNAL,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
    STATUS_NAMES,
    UNAUTHENTICATED,
    UNAVAILABLE,
    status_name,
    status_of,
    trailers_only,
)
from sidecar.h2.hpack import (
    HeaderListTooLarge,
    MalformedRequest,
    check_request,
    context_free,
    headers_of,
    scan,
)
from sidecar.h2_conn import REPLAY_LIMIT, AppConn, Conn, Stream, UpConn, log
from sidecar.limits import DEFAULT as DEFAULT_LIMITS
from sidecar.limits import Limits
from sidecar.tap import HeaderBlock
from sidecar.telemetry import Telemetry
from sidecar.tls_conn import TlsProtocolClient

if TYPE_CHECKING:
    from ca.identity import SpiffeId
    from sidecar.gate import ListenerGate
    from sidecar.h2_conn import DeadlineGroup, Expiry
    from sidecar.seams import Direction, InboundDirection, UpstreamPool
    from sidecar.snapshot import Snapshot
    from sidecar.tap import CallRecord

TAP_MAX_HEADER_LIST = 64 * 1024  # what a tap's reader decodes of one header block at most


async def _open_tls(tls: TlsProtocolClient, host: str, port: int) -> None:
    """Connect ``tls`` and wait for its handshake (which connects its inner protocol)."""
    await asyncio.get_running_loop().create_connection(lambda: tls, host, port)
    await tls.ready


def _tap_headers_of(block: bytes) -> list[tuple[bytes, bytes]]:
    """A header block as the tap's reader decodes it (bounded; HpackError, a ValueError, past it)."""
    return headers_of(block, TAP_MAX_HEADER_LIST)


class H2Proxy:
    """What the outbound and inbound frame-level proxies share: the listener, the connections, and the
    relaying of a call's frames once its upstream connection is chosen. Where a new stream goes, and
    how a finished one is counted, is each subclass's (``open_stream``, ``release``, ``finish``)."""

    def __init__(self, direction: Direction, name: str, gate: ListenerGate | None = None) -> None:
        self._out = direction
        self.gate = gate
        self._server: asyncio.AbstractServer | None = None
        self.apps: set[AppConn] = set()
        self.ups: dict[str, UpConn] = {}
        self.all_ups: set[UpConn] = set()
        self.dirty: list[Conn] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._traffic_deadlines: dict[tuple[float, Expiry], DeadlineGroup] = {}  # sidecar.h2_traffic
        self.max_message = int(getattr(direction, "max_message_bytes", 4 * 1024 * 1024))
        self.name = name
        limits = getattr(direction, "limits", None)
        self.limits: Limits = limits if isinstance(limits, Limits) else DEFAULT_LIMITS
        self.telemetry: Telemetry | None = getattr(direction, "telemetry", None)
        if gate is None and isinstance(self.telemetry, Telemetry):
            from sidecar.gate import ListenerGate

            gate = ListenerGate(f"h2 {self.name}", self.limits.max_connections, self.telemetry)
        self.gate = gate

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: AppConn(self), host, port, reuse_address=True, backlog=1024)

    def flush(self) -> None:
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            conn.flush()

    # -- streams -----------------------------------------------------------------------------------
    def open_stream(self, st: Stream, exclude: str = "") -> None:
        """A new call (or one to send again, away from ``exclude``): on to an upstream connection, or failed."""
        raise NotImplementedError

    def release(self, st: Stream, *, ok: bool) -> None:
        """The stream leaves its endpoint."""
        raise NotImplementedError

    def finish(self, st: Stream, code: int) -> None:
        """The call ended with ``code``: counted (once)."""
        raise NotImplementedError

    def retry_answer(self, up: UpConn, st: Stream, raw: bytes, end: bool) -> bool:
        """Response headers of a stream with a plan (see ``H2Outbound``; only routed streams have one)."""
        return False

    def retry_lost(self, st: Stream) -> bool:
        """A stream with a plan lost its connection (see ``H2Outbound``; only routed streams have one)."""
        return False

    def _tap_start(self, st: Stream, direction: str, source: str, destination: str) -> None:
        """Only while a tap is open: a record for this call, with its request header block."""
        rec = self._out.telemetry.tap.start(direction, source, destination, st.method)
        if rec is not None:
            rec.request_headers = HeaderBlock(_tap_headers_of, st.request_block)  # decoded by the tap's reader
            st.tap = rec

    def _tap_headers(self, rec: CallRecord, block: bytes, end: bool) -> None:
        if end:
            rec.trailers = HeaderBlock(_tap_headers_of, block)
        else:
            rec.response_headers = HeaderBlock(_tap_headers_of, block)

    def route(self, st: Stream, up: UpConn) -> None:
        st.up = up
        if up.ready and not up.waiting and up.can_open():
            self.send_request(st, up)
        else:
            up.waiting.append(st)

    def forget(self, up: UpConn) -> None:
        """No new calls go to ``up``; it closes once its last stream is done."""
        if self.ups.get(up.key) is up:
            del self.ups[up.key]
        if not up.streams and not up.waiting and up.transport is not None and not up.closed:
            up.transport.close()

    def up_lost(self, up: UpConn) -> None:
        if up not in self.all_ups:
            return
        self.all_ups.discard(up)
        if self.ups.get(up.key) is up:
            del self.ups[up.key]
        waiting, up.waiting = up.waiting, []
        for st in waiting:  # nothing was sent: another endpoint may take it
            self.release(st, ok=False)
            st.up = None
            if not st.app.closed and st.a.sid in st.app.streams:
                if st.tries < 2:  # never for H2Inbound, which has nowhere else to go (see its up_lost)
                    self._out.telemetry.retries.labels(self.name).inc()
                    self.open_stream(st, exclude=up.key)
                else:
                    self.fail(st, UNAVAILABLE, f"weft: cannot reach {self.name} at {up.key}")
        for s in list(up.streams.values()):
            st = s.call
            st.u = None
            if st.plan is not None and self.retry_lost(st):
                continue
            if not st.app.closed:
                self.fail(st, UNAVAILABLE, f"weft: the connection to {self.name} was lost")
        up.streams.clear()
        self.flush()

    def send_request(self, st: Stream, up: UpConn) -> None:
        st.up = up
        u = up.open_stream(st)
        st.u = u
        up.send_headers(u, st.request_block, st.a.remote_closed and not st.q_up and st.trailers is None)
        if up.next_local_sid > up.sid_limit:  # retire it before its stream ids run out
            up.retired = True
            self.forget(up)
        if st.q_up or st.trailers is not None:
            self.flush_to_up(st)

    def client_trailers(self, st: Stream, block: bytes) -> None:
        """The client's trailers: sent after its queued data, once the upstream stream exists."""
        st.trailers = block
        if st.plan is not None:
            h2_idle.touch(st)
        if st.u is not None:
            self.flush_to_up(st)

    def to_upstream(self, st: Stream, data: bytes, end: bool) -> None:
        size = st.msg_up.too_large(data, self.max_message)
        if size:
            st.app.consumed(len(data))
            self.fail(st, RESOURCE_EXHAUSTED,
                      f"weft: request message of {size} bytes is larger than the limit of {self.max_message}")
            return
        if st.tap is not None:
            st.tap.request_data(data)
        if st.plan is not None:
            h2_idle.touch(st)
        st.q_up.append((data, end))
        if st.u is not None:
            self.flush_to_up(st)

    def flush_to_up(self, st: Stream) -> None:
        up = st.up
        u = st.u
        if up is None or u is None:
            return
        app = st.app
        a = st.a
        q = st.q_up
        while q:
            data, end = q[0]
            sent = up.send_data(u, data, end and st.trailers is None)
            if sent:
                st.data_sent = True
                replay = st.replay
                if replay is not None:
                    if st.replay_size + sent <= REPLAY_LIMIT:
                        chunk = data if sent == len(data) else data[:sent]
                        if not replay:
                            st.replay = chunk
                        elif isinstance(replay, bytes):
                            st.replay = [replay, chunk]
                        else:
                            replay.append(chunk)  # type: ignore[union-attr]
                        st.replay_size += sent
                    else:
                        st.replay = None
                credit = sent
                if st.credited:
                    skip = min(st.credited, sent)
                    st.credited -= skip
                    credit -= skip
                if credit:
                    app.passed_on(a, credit)
            if sent < len(data):
                if sent:
                    q[0] = (data[sent:], end)
                return
            q.pop(0)
        if st.trailers is not None:
            block, st.trailers = st.trailers, None
            st.replay = None
            up.send_headers(u, block, True)

    def to_app_headers(self, st: Stream, block: bytes, end: bool) -> None:
        if st.tap is not None:
            self._tap_headers(st.tap, block, end)
        if st.plan is not None:
            h2_idle.touch(st)
        app = st.app
        if app.closed:
            return
        if st.q_app:  # keep order behind queued data
            st.q_app.append((HEADERS, block, end))
            return
        app.send_headers(st.a, block, end)
        st.headers_sent_app = True
        if end:
            self._ended(st)

    def to_app(self, st: Stream, data: bytes, end: bool) -> None:
        size = st.msg_app.too_large(data, self.max_message)
        if size:
            if st.up is not None:
                st.up.consumed(len(data))
            self.fail(st, RESOURCE_EXHAUSTED,
                      f"weft: response message of {size} bytes is larger than the limit of {self.max_message}")
            return
        if st.tap is not None:
            st.tap.response_data(data)
        if st.plan is not None:
            h2_idle.touch(st)
        st.q_app.append((DATA, data, end))
        self.flush_to_app(st)

    def flush_to_app(self, st: Stream) -> None:
        app = st.app
        a = st.a
        up = st.up
        u = st.u
        q = st.q_app
        while q:
            kind, item, end = q[0]
            if kind == HEADERS:
                q.pop(0)
                app.send_headers(a, item, end)
                st.headers_sent_app = True
                if end:
                    self._ended(st)
                    return
                continue
            sent = app.send_data(a, item, end)
            if sent and up is not None:
                if u is not None:
                    up.passed_on(u, sent)
                else:
                    up.consumed(sent)
            if sent < len(item):
                if sent:
                    q[0] = (kind, item[sent:], end)
                return
            q.pop(0)
            if end:
                self._ended(st)
                return

    def _ended(self, st: Stream) -> None:
        """The upstream ended the stream (END_STREAM towards the app)."""
        st.app.close_stream(st.a)  # RST_STREAM NO_ERROR if the app's side is still open
        if st.q_up or st.trailers is not None:
            self.drop_queues(st)  # request data the upstream will never take: the app's window back
        up = st.up
        u = st.u
        if up is not None and u is not None:
            st.u = None
            up.close_stream(u)
            if up.soft_limit:  # a call done: try one more at once again (up to what the peer announced)
                up.soft_limit = 0 if up.soft_limit >= up.peer_max_concurrent else up.soft_limit + 1
            if up.waiting:
                up.start_waiting()
            self._close_if_done(up)
        self.finish(st, st.status if st.status is not None else 2)

    def cancel_up(self, st: Stream) -> None:
        """The call's upstream work stops now: RST_STREAM CANCEL, or it leaves the waiting line."""
        up = st.up
        if up is None:
            return
        u = st.u
        if u is not None:
            st.u = None
            if not up.closed:
                up.reset(u, E_CANCEL)
                up.start_waiting()
                self._close_if_done(up)
        elif st in up.waiting:
            up.waiting.remove(st)

    def _close_if_done(self, up: UpConn) -> None:
        """A retired connection closes once its last stream is done."""
        if (up.retired or self.ups.get(up.key) is not up) and not up.streams and not up.waiting \
                and up.transport is not None and not up.closed:
            up.transport.close()

    def drop_queues(self, st: Stream) -> None:
        """Data queued for a call that ends is given back to the connection windows it came through
        (else a shared upstream connection's window would shrink for good)."""
        if st.q_app:
            up = st.up
            for kind, item, _ in st.q_app:
                if kind == DATA and up is not None and not up.closed:
                    up.consumed(len(item))
            st.q_app.clear()
        if st.q_up:
            app = st.app
            if not app.closed:
                app.consumed(sum(len(d) for d, _ in st.q_up))
            st.q_up.clear()
        st.trailers = None

    def abandon(self, st: Stream, code: int) -> None:
        """The client reset the call, or its connection went: cancel upstream at once, free its queues."""
        self.cancel_up(st)
        self.drop_queues(st)
        self.finish(st, code)

    def fail(self, st: Stream, code: int, message: str) -> None:
        app = st.app
        a = st.a
        if st.tap is not None:
            self._tap_headers(st.tap, trailers_only(code, message, with_status=not st.headers_sent_app), True)
        if not app.closed and a.sid in app.streams and not app.dead:
            app.send_headers(a, trailers_only(code, message, with_status=not st.headers_sent_app), True)
            app.close_stream(a)
        self.cancel_up(st)
        self.drop_queues(st)
        self.finish(st, code)

    # -- lifecycle ---------------------------------------------------------------------------------
    def on_snapshot(self) -> None:
        """A new snapshot: connections to where calls no longer go close once their streams are done."""
        raise NotImplementedError

    async def close(self, grace: float = 5.0) -> None:
        """Drain: GOAWAY NO_ERROR (with the last stream id) to every client, so that they send new calls
        elsewhere; the streams in progress may finish within ``grace``; then every connection closes."""
        if self._server is not None:
            self._server.close()
        for app in list(self.apps):
            app.goaway()
        self.flush()
        deadline = time.monotonic() + grace
        while any(a.streams for a in self.apps) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for app in list(self.apps):
            if app.transport is not None:
                app.transport.close()
        for up in list(self.all_ups):
            up.goaway()
            up.flush()
            if up.transport is not None:
                up.transport.close()
        for task in list(self._tasks):
            task.cancel()


class H2Outbound(H2Proxy):
    """The outbound gRPC listener of one upstream, frame by frame (see the module docstring)."""

    def __init__(self, outbound: Direction, pool: UpstreamPool, gate: ListenerGate | None = None) -> None:
        self.pool = pool
        super().__init__(outbound, pool.name, gate)

    # a routed stream's response headers (UpConn) and lost connection (up_lost): retried, or passed on
    retry_answer = h2_traffic.retry_answer
    retry_lost = h2_traffic.retry_lost

    def open_stream(self, st: Stream, exclude: str = "") -> None:
        out = self._out
        if st.tries == 0 and out.telemetry.tap.active:
            self._tap_start(st, "outbound", out.snapshot().registration.service, self.pool.name)
        if out.draining:
            self.fail(st, UNAVAILABLE, "weft: the sidecar is shutting down")
            return
        if h2_traffic.routed(self.pool):  # through the upstream's discovery chain
            h2_traffic.open_routed(self, st, exclude)
            return
        st.tries += 1
        key = self.pool.pick(exclude=exclude)
        if key is None or (exclude and key == exclude):
            if key is not None:
                self.pool.release(key)
            self.fail(st, UNAVAILABLE, f"weft: no healthy endpoint of upstream {self.pool.name}")
            return
        st.endpoint = key
        self.route(st, self._up(key))

    def _up(self, key: str) -> UpConn:
        snap = self._out.snapshot()
        gen = snap.credentials.generation
        up = self.ups.get(key)
        if up is not None and (up.closed or up.retired or up.dead or up.generation != gen):
            self.forget(up)
            up = None
        if up is None:
            up = UpConn(self, key, gen)
            self.ups[key] = up
            self.all_ups.add(up)
            task = asyncio.ensure_future(self._connect(up, snap))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return up

    async def _connect(self, up: UpConn, snap: Snapshot) -> None:
        from sidecar.tls import PeerIdentityError, check_server_identity, expected_server_name, tls_error_reason

        ep = self.pool.endpoints.get(up.key)
        creds = snap.credentials
        limit = h2_circuit.connect_timeout(self.pool, up.key)  # 0: not routed, the sidecar's own bounds
        tls: TlsProtocolClient | None = None
        try:
            if ep is None:
                raise ConnectionRefusedError(f"endpoint {up.key} left the upstream")
            # TLS on memory BIOs (sidecar.tls_conn): no 256 KiB read buffer per connection as with ssl=
            tls = TlsProtocolClient(up, self._out.tls.client(creds, "grpc"), expected_server_name(
                h2_traffic.service_of(self.pool, up.key), creds.trust_domain), limit + 1 if limit else 10)
            await asyncio.wait_for(_open_tls(tls, ep.address, ep.port), limit or 15)
            sslobj = tls.sslobj
            check_server_identity(sslobj.getpeercert(binary_form=True) if sslobj else None,
                                  h2_traffic.service_of(self.pool, up.key), creds.trust_domain)
            if sslobj is not None and sslobj.selected_alpn_protocol() != "h2":
                raise ssl.SSLError(f"the upstream did not agree to ALPN h2 ({sslobj.selected_alpn_protocol()})")
        except (OSError, TimeoutError, ssl.SSLError, PeerIdentityError) as exc:
            if isinstance(exc, (ssl.SSLError, PeerIdentityError)):
                self._out.telemetry.tls_errors.labels("outbound", tls_error_reason(exc)).inc()
            elif isinstance(exc, TimeoutError) and limit:
                h2_circuit.connect_timed_out(self, up.key, limit)
            log.warning("upstream_connect_failed", upstream=self.pool.name, endpoint=up.key, error=str(exc)[:200])
            up.closed = True
            if tls is not None:
                tls.drop()
            self.up_lost(up)
            self.flush()
            return
        up.start()
        self.flush()

    def release(self, st: Stream, *, ok: bool) -> None:
        """The stream leaves its endpoint (for the balancer's in-flight count and latency)."""
        if st.endpoint:
            if st.plan is None:  # a routed stream's attempts go to its chain's pickers (h2_traffic.attempt_ended)
                self.pool.observe(st.endpoint, ok, time.perf_counter() - st.start)
            st.endpoint = ""

    def finish(self, st: Stream, code: int) -> None:
        if st.recorded:
            return
        st.recorded = True
        seconds = time.perf_counter() - st.start
        if st.plan is not None:
            h2_traffic.stream_done(st)
            h2_traffic.attempt_ended(self, st, status=status_name(code), failed=code == UNAVAILABLE)
        self.release(st, ok=code != UNAVAILABLE)
        out = self._out
        snap = out.snapshot()
        up = snap.upstreams.get(self.pool.name)
        name = STATUS_NAMES[code] if 0 <= code < 17 else "UNKNOWN"
        label = out.telemetry.method_label(self.pool.name, st.method, up.methods if up is not None else None)
        source = snap.registration.service
        out.telemetry.call_ended("outbound", source, self.pool.name, label, name, seconds, st.tap, st.method)

    def on_snapshot(self) -> None:
        """Endpoints that left: their idle connections close; busy ones finish their streams first."""
        for key, up in list(self.ups.items()):
            if key not in self.pool.endpoints:
                self.forget(up)


class H2Inbound(H2Proxy):
    """The inbound full path for gRPC services, frame by frame: every stream is authorized with the
    caller's identity (PERMISSION_DENIED naming the rule, or on to the app over plaintext h2c).

    It does not listen: ``sidecar.inbound`` hands it the decrypted connection of each caller that is
    not passed through, in this process, as an :class:`AppConn` made by :meth:`connection_for` with
    the identity the caller's certificate proved.
    """

    _out: InboundDirection

    def __init__(self, inbound: InboundDirection, gate: ListenerGate | None = None) -> None:
        super().__init__(inbound, "the local app", gate)
        self.max_message = int(inbound.max_message_bytes)

    def connection_for(self, caller: SpiffeId) -> AppConn:
        """The protocol of one caller's decrypted connection (its transport is the TLS connection's writer)."""
        return AppConn(self, caller)

    def open_stream(self, st: Stream, exclude: str = "") -> None:
        from sidecar import authz

        inbound = self._out
        if inbound.draining:
            self.fail(st, UNAVAILABLE, "weft: the sidecar is shutting down")
            return
        app = st.app
        ident = app.caller
        if ident is None:  # not a connection the public port handed over: nobody to authorize
            self.fail(st, UNAUTHENTICATED, "weft: the caller's identity is unknown")
            return
        st.source = ident.service
        snap = inbound.snapshot()
        if inbound.telemetry.tap.active:
            self._tap_start(st, "inbound", ident.service, snap.registration.service)
        try:
            headers = headers_of(st.request_block, self.limits.h2_max_header_list_size)
            check_request(headers)
        except HeaderListTooLarge as exc:
            app.counted("header_list_too_large")
            self.fail(st, RESOURCE_EXHAUSTED, f"weft: request headers of {exc.size} bytes or more are above the "
                                              f"limit of {exc.limit}")
            return
        except MalformedRequest as exc:  # RFC 9113 8.1.1: a stream error PROTOCOL_ERROR
            app.counted("malformed_request")
            log.debug("malformed_request", source=ident.service, error=str(exc))
            app.reset(st.a, E_PROTOCOL)
            self.finish(st, INTERNAL)
            return
        except ValueError as exc:
            self.fail(st, INTERNAL, f"weft: unreadable request headers: {exc}")
            return
        verdict = inbound.authorizer.check(snap.policy, ident, snap.registration.service,
                                           authz.GrpcRequest(st.method, authz.GrpcMetadata(headers)), st.method)
        if verdict.denial is not None:
            self.fail(st, PERMISSION_DENIED, verdict.denial)
            return
        if h2_traffic.inbound_controls(self, st, snap, lambda: self._to_app(st, snap)):
            return  # refused by a rate limit or a fault, or held by an injected delay
        self._to_app(st, snap)

    def _to_app(self, st: Stream, snap: Snapshot) -> None:
        h2_traffic.local_timeout(self, st, snap)
        st.tries += 1
        st.endpoint = "app"
        self.route(st, self._app_conn())

    def _app_conn(self) -> UpConn:
        reg = self._out.snapshot().registration
        key = f"{reg.local_service_address}:{reg.local_service_port}"
        up = self.ups.get(key)
        if up is not None and (up.closed or up.retired or up.dead):
            self.forget(up)
            up = None
        if up is None:
            up = UpConn(self, key, "")
            self.ups[key] = up
            self.all_ups.add(up)
            task = asyncio.ensure_future(self._connect_app(up, reg.local_service_address, reg.local_service_port))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return up

    async def _connect_app(self, up: UpConn, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: up, host, port), 15)
        except (OSError, TimeoutError) as exc:
            log.warning("app_connect_failed", app=up.key, error=str(exc)[:200])
            up.closed = True
            self.up_lost(up)
            self.flush()
            return
        up.start()
        self.flush()

    def up_lost(self, up: UpConn) -> None:
        # one app, nowhere else to go: waiting streams fail at once
        for st in up.waiting:
            st.tries = 99
        super().up_lost(up)

    def release(self, st: Stream, *, ok: bool) -> None:
        st.endpoint = ""

    def finish(self, st: Stream, code: int) -> None:
        if st.recorded:
            return
        st.recorded = True
        h2_traffic.stream_done(st)
        seconds = time.perf_counter() - st.start
        inbound = self._out
        snap = inbound.snapshot()
        dest = snap.registration.service
        name = status_name(code)
        label = inbound.telemetry.method_label(dest, st.method, snap.local_methods)
        source = st.source or "unknown"
        inbound.telemetry.call_ended("inbound", source, dest, label, name, seconds, st.tap, st.method)

    def on_snapshot(self) -> None:
        reg = self._out.snapshot().registration
        key = f"{reg.local_service_address}:{reg.local_service_port}"
        for k, up in list(self.ups.items()):
            if k != key:
                self.forget(up)


__all__ = ["AppConn", "H2Inbound", "H2Outbound", "H2Proxy", "Stream", "UpConn", "context_free", "frame",
           "headers_of", "scan", "status_of", "trailers_only"]
