"""The asyncio side of the frame-level HTTP/2 proxy: one adapter per connection and the proxied call.

:class:`Conn` puts the pure state machine (:class:`sidecar.h2.connection.H2Connection`) on an
asyncio transport: output batched per event-loop turn, back-pressure (a peer that does not read is
not read from, and gets no DATA until it drains), the SETTINGS timeout, errors counted in
``weft_h2_protocol_errors_total`` and logged once per connection, and the reading of header blocks
(forwarded as they are when context-free, else decoded and re-encoded, within the header-list
limit). :class:`AppConn` is a client's connection to the sidecar, :class:`UpConn` the sidecar's
connection to an upstream; :class:`Stream` is one proxied call across the two. What they do with
frames is the proxy's (``sidecar.h2_proxy``): they call it through ``self.proxy``, typed with
:class:`FrameProxy`, the protocol below, so that this module does not import the proxy's.

:class:`OutboundFrameProxy` and :class:`InboundFrameProxy` are what the proxy's helpers
(``sidecar.h2_traffic``, ``sidecar.h2_circuit``, ``sidecar.h2_idle``) use of it, and
:class:`DeadlineGroup` the timer the routed and local timeouts of streams share. They are here
because their members speak of :class:`Stream` and :class:`UpConn`; the other seams of the data
path are in ``sidecar.seams``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from hpack import Decoder
from hpack.exceptions import HPACKError, OversizedHeaderListError

from sidecar.h2.connection import ConnectionFault, H2Connection, H2Stream
from sidecar.h2.frames import (
    E_CANCEL,
    E_COMPRESSION,
    E_REFUSED,
    E_SETTINGS_TIMEOUT,
    F_END_STREAM,
    MAX_STREAM_ID,
    error_name,
)
from sidecar.h2.grpc import (
    CANCELLED,
    INTERNAL,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    Messages,
    http_answer,
    is_grpc,
    status_of,
    trailers_only,
)
from sidecar.h2.hpack import (
    HeaderListTooLarge,
    HpackError,
    context_free,
    context_free_cached,
    encode_plain,
    headers_of,
    list_size,
    scan,
)
from sidecar.h2.hpack import known_context_free as _known_context_free
from sidecar.limits import DEFAULT as DEFAULT_LIMITS
from sidecar.limits import Limits

if TYPE_CHECKING:
    from ca.identity import SpiffeId
    from sidecar.gate import ListenerGate
    from sidecar.seams import Direction, InboundDirection, UpstreamPool
    from sidecar.tap import CallRecord
    from sidecar.telemetry import Telemetry
    from sidecar.traffic import CallPlan

log = structlog.get_logger("weft.sidecar.h2")

# a block whose decoded list cannot exceed the limit needs no decoding to check it: one encoded
# byte decodes to at most this many bytes of RFC 9113 list size (a static entry of 28 bytes + 32)
_MAX_EXPANSION = 60
REPLAY_LIMIT = 64 * 1024  # request bytes kept per call for a transparent retry after REFUSED_STREAM
_MAX_REFUSALS = 8
_CLOSE_GRACE = 2.0  # seconds a connection closed for an error has to take its GOAWAY before it is aborted


def _linger(transport: Any) -> None:
    """Close after a connection error without losing the GOAWAY: a socket closed with unread input
    sends RST, and the peer's kernel then drops what it had not read yet (the GOAWAY that says why).
    So the write side is shut after the buffered bytes, reading resumes (what arrives is discarded),
    and the socket closes on the peer's EOF or is aborted after ``_CLOSE_GRACE``."""
    try:
        if transport.can_write_eof():
            transport.write_eof()
            transport.resume_reading()
            return
    except (OSError, RuntimeError, NotImplementedError, AttributeError):
        pass
    transport.close()


# -- streams and connections ----------------------------------------------------------------------

class Stream:
    """One proxied call: its stream on the app's connection (``a``) and on the upstream's (``u``)."""

    __slots__ = (
        "a",
        "app",
        "attempt_start",
        "credited",
        "data_sent",
        "deadline",
        "endpoint",
        "headers_sent_app",
        "method",
        "msg_app",
        "msg_up",
        "original_path",
        "plan",
        "q_app",
        "q_up",
        "recorded",
        "refusals",
        "replay",
        "replay_size",
        "request_block",
        "retries",
        "source",
        "start",
        "status",
        "tap",
        "timer",
        "trailers",
        "tries",
        "u",
        "up",
    )

    def __init__(self, app: AppConn, a: H2Stream, method: str) -> None:
        self.app = app
        self.a = a
        a.call = self
        self.up: UpConn | None = None  # the upstream connection carrying (or about to carry) the call
        self.u: H2Stream | None = None  # its stream there, once opened
        self.q_up: list[tuple[bytes, bool]] = []  # request data waiting for the upstream's window
        self.q_app: list[tuple[int, bytes, bool]] = []  # (DATA or HEADERS, payload, end) waiting for the app
        self.trailers: bytes | None = None  # the client's trailers, sent after q_up
        self.method = method
        self.start = time.perf_counter()
        self.endpoint = ""
        self.headers_sent_app = False
        self.status: int | None = None
        self.request_block = b""
        self.tries = 0
        self.recorded = False
        self.data_sent = False  # request DATA went out
        # request data sent but not yet answered, kept (up to REPLAY_LIMIT) so that a stream the
        # upstream refuses unprocessed (REFUSED_STREAM) can be sent again; None once not replayable
        # () until something is sent, then the one chunk sent (most calls), then a list of chunks
        self.replay: bytes | list[bytes] | tuple[()] | None = ()
        self.replay_size = 0
        self.credited = 0  # bytes at the head of q_up already given back to the app (a replay)
        self.refusals = 0
        self.msg_up = Messages()  # gRPC message framing, app -> upstream (for the size limit)
        self.msg_app = Messages()  # upstream -> app
        self.source = ""  # the caller's service (inbound full path)
        self.tap: CallRecord | None = None  # while a tap that may match this call is open
        # traffic management (see sidecar.h2_traffic): the call's plan through the upstream's chain,
        # its timeout timer and deadline, retries made, when the current attempt started
        self.plan: CallPlan[str] | None = None
        self.timer: DeadlineGroup | None = None  # its deadline's group while one is armed
        self.deadline: float | None = None
        self.retries = 0
        self.attempt_start: float | None = None
        self.original_path = ""


def _decoder(limits: Limits) -> Decoder:
    # what a block within the block-size limit can decode to at most: a whole block is always decoded
    # (the HPACK table stays in step) and the list limit is checked after, so that only the stream fails
    decoder = Decoder(max_header_list_size=limits.h2_max_header_block_size * _MAX_EXPANSION)
    decoder.max_allowed_table_size = 4096
    return decoder


def decode_plain(decoder: Decoder, block: bytes, limit: int) -> bytes:
    """A block decoded with the connection's HPACK decoder, re-encoded context-free, within ``limit``."""
    try:
        headers = [(bytes(k), bytes(v)) for k, v in decoder.decode(block, raw=True)]
    except OversizedHeaderListError:
        raise ConnectionFault(E_COMPRESSION, "header_list_too_large", "a header block decoding past any bound") \
            from None
    except HPACKError as exc:
        raise ConnectionFault(E_COMPRESSION, "hpack_error", f"HPACK: {exc}") from None
    size = list_size(headers)
    if size > limit:
        raise HeaderListTooLarge(size, limit)
    return encode_plain(headers)


class Conn(H2Connection, asyncio.Protocol):
    """The asyncio adapter of one HTTP/2 connection: output batched per event-loop turn, back-pressure,
    settings timeout, and errors counted and logged once per connection."""

    kind = "h2"
    is_context_free = staticmethod(context_free)

    def __init__(self, proxy: ConnOwner, limits: Limits | None = None, telemetry: Telemetry | None = None, *,
                 client: bool) -> None:
        H2Connection.__init__(self, limits or DEFAULT_LIMITS, client=client)
        self.proxy = proxy
        self.telemetry = telemetry
        self.transport: Any = None
        self.wq: list[bytes] = []
        self.closed = False
        self.logged = False
        self.bug_logged = False
        self._timer: asyncio.TimerHandle | None = None
        self.decoder = _decoder(self.limits)

    # output
    def send(self, data: bytes) -> None:
        if not self.wq:
            self.proxy.dirty.append(self)
        self.wq.append(data)

    def flush(self) -> None:
        wq = self.wq
        if wq and self.transport is not None and not self.closed:
            self.transport.write(b"".join(wq) if len(wq) > 1 else wq[0])
            if self.control_queued and not self.transport.get_write_buffer_size():
                self.control_queued = 0  # the peer takes what we write
            if self.data_queued:
                self.data_queued = 0
                if self.burst_blocked:  # a burst was cut at max_burst: more on the next turn
                    self.burst_blocked = False
                    if not self.write_paused:
                        asyncio.get_running_loop().call_soon(self._more)
        wq.clear()

    def _more(self) -> None:
        if not self.write_paused and not self.closed and self.blocked:
            self.release_blocked()
            self.proxy.flush()

    def begin(self, transport: Any) -> None:
        """connection_made's common part: limits on the write buffer, our preamble, the settings timer."""
        self.transport = transport
        high = self.limits.h2_max_buffered_bytes
        transport.set_write_buffer_limits(high=high, low=high // 4)
        self.send(self.preamble())
        self._timer = asyncio.get_running_loop().call_later(self.limits.h2_settings_timeout, self._settings_late)

    def _settings_late(self) -> None:
        self._timer = None
        if not self.settings_acked and not self.closed:
            self.connection_error(E_SETTINGS_TIMEOUT, "settings_timeout",
                                  f"SETTINGS not acknowledged within {self.limits.h2_settings_timeout} s")
            self.proxy.flush()

    def on_settings_ack(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # lingering after a connection error: read and discarded (see _linger)
        self.receive(data)
        self.proxy.flush()

    def pause_writing(self) -> None:
        # the peer does not read: stop reading it, and send it no DATA until it drains
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.control_queued = 0
        if self.transport is not None and not self.closed and not self.dead:
            self.transport.resume_reading()
        if self.blocked:
            self.release_blocked()
        self.proxy.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # errors
    def counted(self, reason: str) -> None:
        tel = self.telemetry
        if tel is None:
            return
        tel.h2_protocol_error(reason)
        if not self.logged:  # once per connection, and the log itself is rate-limited
            self.logged = True
            peer = self.transport.get_extra_info("peername") if self.transport is not None else None
            tel.peer_log.warning(time.monotonic(), "h2_peer_refused", reason=reason, side=self.kind,
                                 peer=f"{peer[0]}:{peer[1]}" if peer else "")

    def on_connection_error(self, code: int, reason: str, detail: str) -> None:
        log.debug("h2_connection_error", side=self.kind, code=error_name(code), reason=reason, detail=detail[:200])
        self.proxy.flush()
        transport = self.transport
        if transport is not None and not self.closed:
            _linger(transport)
            asyncio.get_running_loop().call_later(_CLOSE_GRACE, transport.abort)
        self.closed = True  # nothing more is written to it, and what it still sends is discarded

    def on_stream_error(self, s: H2Stream, code: int, reason: str, exc: BaseException | None) -> None:
        if exc is not None and not self.bug_logged:  # a bug of ours: logged once per connection
            self.bug_logged = True
            log.error("h2_stream_failed", side=self.kind, sid=s.sid, error=f"{type(exc).__name__}: {exc}"[:300])
        call = s.call
        if isinstance(call, Stream):
            self.stream_failed(call, reason)

    def stream_failed(self, st: Stream, reason: str) -> None: ...

    # header blocks
    def _plain(self, block: bytes) -> bytes:
        """A context-free copy of a peer's header block, within the header-list limit (or a fault)."""
        limit = self.max_list
        if self.settings_acked and self.is_context_free(block):
            # once the peer acknowledged HEADER_TABLE_SIZE=0 its encoder can no longer refer to the
            # dynamic table: a block without such references is forwarded as it is
            if len(block) * _MAX_EXPANSION > limit:
                headers_of(block, limit)  # raises HeaderListTooLarge
            return block
        return decode_plain(self.decoder, block, limit)

    def on_discarded_block(self, block: bytes, truncated: bool) -> None:
        if not self.settings_acked:  # keep the HPACK decoder in step
            if truncated:
                raise ConnectionFault(E_COMPRESSION, "header_block_too_large",
                                      "a header block above the limit before HEADER_TABLE_SIZE=0 was acknowledged")
            try:
                self.decoder.decode(block, raw=True)
            except HPACKError as exc:
                raise ConnectionFault(E_COMPRESSION, "hpack_error", f"HPACK: {exc}") from None


class AppConn(Conn):
    """A client's plaintext HTTP/2 connection: the app's to the outbound listener, or a caller's
    decrypted one to the inbound full path."""

    kind = "app"
    is_context_free = staticmethod(context_free)
    proxy: FrameProxy

    def __init__(self, proxy: FrameProxy, caller: SpiffeId | None = None) -> None:
        super().__init__(proxy, proxy.limits, proxy.telemetry, client=False)
        self.caller = caller  # on the inbound full path: the identity the caller's certificate proved

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        gate = self.proxy.gate
        if gate is not None and not gate.admit(transport):
            self.closed = True
            return
        self.begin(transport)
        self.proxy.apps.add(self)
        self.proxy.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        super().connection_lost(exc)
        proxy = self.proxy
        if self not in proxy.apps and was_closed:
            return  # refused at the gate
        proxy.apps.discard(self)
        if proxy.gate is not None:
            proxy.gate.release()
        for s in list(self.streams.values()):
            if isinstance(s.call, Stream):
                proxy.abandon(s.call, CANCELLED)
        self.streams.clear()
        self.blocked.clear()
        proxy.flush()

    def on_request(self, s: H2Stream, flags: int, block: bytes) -> None:
        proxy = self.proxy
        try:
            raw = self._plain(block)
            path = scan(raw, b":path")
        except HeaderListTooLarge as exc:
            self.refuse_headers(s, block, f"request headers of {exc.size} bytes or more are above the limit "
                                          f"of {exc.limit}")
            return
        except HpackError as exc:
            raise ConnectionFault(E_COMPRESSION, "hpack_error", f"HPACK: {exc}") from None
        st = Stream(self, s, path.decode("latin-1") if path else "")
        st.request_block = raw
        proxy.open_stream(st)

    def on_oversized(self, s: H2Stream, flags: int, prefix: bytes, size: int) -> None:
        if not self.settings_acked:  # our HPACK decoder can no longer keep in step with the peer
            raise ConnectionFault(E_COMPRESSION, "header_block_too_large",
                                  f"a header block of {size} bytes before HEADER_TABLE_SIZE=0 was acknowledged")
        call = s.call
        if isinstance(call, Stream):  # trailers above the limit: the call ends
            self.proxy.fail(call, RESOURCE_EXHAUSTED, f"weft: request trailers of {size} bytes are above the limit "
                                                      f"of {self.max_block}")
            self.counted("header_block_too_large")
            return
        self.refuse_headers(s, prefix, f"request headers of {size} bytes are above the limit of {self.max_block}")

    def refuse_headers(self, s: H2Stream, prefix: bytes, message: str) -> None:
        """Headers above the limits: gRPC gets RESOURCE_EXHAUSTED, HTTP 431; the connection stays."""
        self.counted("header_block_too_large")
        if is_grpc(prefix):
            self.send_headers(s, trailers_only(RESOURCE_EXHAUSTED, "weft: " + message, with_status=True), True)
        else:
            text = message + "\n"
            self.send_headers(s, http_answer(431, text), False)
            self.send_data(s, text.encode(), True)
        self.close_stream(s)

    def on_headers(self, s: H2Stream, flags: int, block: bytes) -> None:
        call = s.call
        if not isinstance(call, Stream):
            return
        try:
            raw = self._plain(block)
        except HeaderListTooLarge:
            self.proxy.fail(call, RESOURCE_EXHAUSTED, "weft: request trailers above the header-list limit")
            return
        except HpackError as exc:
            raise ConnectionFault(E_COMPRESSION, "hpack_error", f"HPACK: {exc}") from None
        self.proxy.client_trailers(call, raw)

    def on_data(self, s: H2Stream, end: int, data: bytes) -> None:
        call = s.call
        if call is None:
            self.consumed(len(data))
            return
        self.proxy.to_upstream(call, data, bool(end))

    def on_writable(self, s: H2Stream) -> None:
        if s.call is not None:
            self.proxy.flush_to_app(s.call)

    def on_reset(self, s: H2Stream, code: int) -> None:
        if isinstance(s.call, Stream):
            self.proxy.abandon(s.call, CANCELLED)

    def stream_failed(self, st: Stream, reason: str) -> None:
        self.proxy.abandon(st, INTERNAL)


class UpConn(Conn):
    """One HTTP/2 connection to an upstream: an endpoint's sidecar (mTLS) or the local app (h2c)."""

    kind = "upstream"
    is_context_free = staticmethod(context_free_cached)  # responses repeat the same few blocks
    proxy: FrameProxy

    def __init__(self, proxy: FrameProxy, key: str, generation: str) -> None:
        super().__init__(proxy, proxy.limits, proxy.telemetry, client=True)
        self.key = key
        self.generation = generation
        self.connected = False  # transport up and the peer's identity checked
        self.ready = False  # ... and its SETTINGS received: streams may open
        self.retired = False  # no new streams (GOAWAY received, ids running out, endpoint left)
        self.waiting: list[Stream] = []  # calls for this connection that have no stream yet
        self.sid_limit = MAX_STREAM_ID - 2  # past it the connection is retired (tests lower it)
        self.soft_limit = 0  # streams the peer really takes at once, learnt from its refusals (0: as announced)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.begin(transport)
        self.flush()  # the client preface first: nothing else may precede it

    def start(self) -> None:
        """The transport is up and the peer checked."""
        self.connected = True
        self.maybe_ready()

    def maybe_ready(self) -> None:
        if self.connected and self.settings_seen and not self.ready and not self.dead:
            self.ready = True
        if self.ready:
            self.start_waiting()

    def start_waiting(self) -> None:
        """Open streams for waiting calls while the peer's SETTINGS_MAX_CONCURRENT_STREAMS allows."""
        waiting = self.waiting
        while waiting and self.can_open():
            st = waiting.pop(0)
            if not st.app.closed and st.a.sid in st.app.streams:
                self.proxy.send_request(st, self)

    def on_peer_settings(self, first: bool) -> None:
        self.maybe_ready()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.blocked.clear()
        self.proxy.up_lost(self)

    def on_headers(self, s: H2Stream, flags: int, block: bytes) -> None:
        st = s.call
        if st is None:
            return
        try:
            if self.settings_acked and block in _known_context_free and len(block) * _MAX_EXPANSION <= self.max_list:
                raw = block  # a block seen before (responses repeat): no need to read it again
            else:
                raw = self._plain(block)
        except HeaderListTooLarge as exc:
            self.counted("header_list_too_large")
            self.proxy.fail(st, RESOURCE_EXHAUSTED, f"weft: response headers of {exc.size} bytes or more are above "
                                                    f"the limit of {exc.limit}")
            return
        except HpackError as exc:
            raise ConnectionFault(E_COMPRESSION, "hpack_error", f"HPACK: {exc}") from None
        end = bool(flags & F_END_STREAM)
        if end:
            st.status = status_of(raw)
        if st.plan is not None and self.proxy.retry_answer(self, st, raw, end):
            return
        st.replay = None  # answered: no retry any more
        self.proxy.to_app_headers(st, raw, end)

    def on_oversized(self, s: H2Stream, flags: int, prefix: bytes, size: int) -> None:
        if not self.settings_acked:
            raise ConnectionFault(E_COMPRESSION, "header_block_too_large",
                                  f"a header block of {size} bytes before HEADER_TABLE_SIZE=0 was acknowledged")
        self.counted("header_block_too_large")
        if s.call is not None:
            self.proxy.fail(s.call, RESOURCE_EXHAUSTED, f"weft: response headers of {size} bytes are above the "
                                                        f"limit of {self.max_block}")

    def on_data(self, s: H2Stream, end: int, data: bytes) -> None:
        st = s.call
        if st is None:
            self.consumed(len(data))
            return
        self.proxy.to_app(st, data, bool(end))

    def on_writable(self, s: H2Stream) -> None:
        if s.call is not None:
            self.proxy.flush_to_up(s.call)

    def on_reset(self, s: H2Stream, code: int) -> None:
        st: Stream | None = s.call
        proxy = self.proxy
        if st is None:
            return
        st.u = None
        if code == E_REFUSED and self.requeue(st):
            self.start_waiting()
            return
        self.start_waiting()
        app = st.app
        if not app.closed and st.a.sid in app.streams:
            app.reset(st.a, code)
        proxy.drop_queues(st)
        proxy.finish(st, CANCELLED if code == E_CANCEL else UNAVAILABLE)

    def requeue(self, st: Stream) -> bool:
        """A stream the peer refused unprocessed (RST_STREAM REFUSED_STREAM) waits for a slot on this
        connection again, with the request data it had sent; the peer had fewer slots than it announced
        (a server may count streams a little longer than we do), so no more streams than now open."""
        if st.headers_sent_app or st.refusals >= _MAX_REFUSALS or st.app.closed or st.a.sid not in st.app.streams:
            return False
        replay = st.replay
        if st.data_sent and replay is None:
            return False  # sent more than we kept: it cannot be sent again
        st.refusals += 1
        self.soft_limit = max(1, len(self.streams))
        if replay:
            items = [(d, False) for d in ([replay] if isinstance(replay, bytes) else replay)]
            if not st.q_up and st.a.remote_closed and st.trailers is None:
                items[-1] = (items[-1][0], True)
            st.q_up[:0] = items
            st.credited += st.replay_size
        st.replay = ()
        st.replay_size = 0
        st.data_sent = False
        self.waiting.insert(0, st)
        return True

    def can_open(self) -> bool:
        n = len(self.streams)
        return (n < self.peer_max_concurrent and (not self.soft_limit or n < self.soft_limit)
                and self.next_local_sid <= MAX_STREAM_ID and not self.goaway_received and not self.goaway_sent
                and not self.dead)

    def stream_failed(self, st: Stream, reason: str) -> None:
        st.u = None
        self.start_waiting()
        self.proxy.fail(st, INTERNAL, f"weft: the upstream broke HTTP/2 on this call ({reason})")

    def on_goaway(self, last_sid: int, code: int) -> None:
        proxy = self.proxy
        self.retired = True
        proxy.forget(self)
        moved = [s for sid, s in self.streams.items() if sid > last_sid]
        for s in moved:
            del self.streams[s.sid]
            self.blocked.pop(s, None)
            st: Stream = s.call
            st.u = None
            if st.data_sent or st.headers_sent_app or st.app.closed:
                if not st.app.closed and st.a.sid in st.app.streams:
                    # never processed upstream: the client may retry it transparently
                    st.app.reset(st.a, E_REFUSED)
                proxy.drop_queues(st)
                proxy.finish(st, UNAVAILABLE)
                continue
            proxy.release(st, ok=True)
            st.up = None
            proxy.open_stream(st, exclude=self.key)
        self.reroute_waiting(exclude=self.key)

    def reroute_waiting(self, exclude: str = "") -> None:
        """Calls waiting for a stream here (nothing sent yet) go to another connection."""
        proxy = self.proxy
        waiting, self.waiting = self.waiting, []
        for st in waiting:
            proxy.release(st, ok=True)
            st.up = None
            if not st.app.closed and st.a.sid in st.app.streams:
                proxy.open_stream(st, exclude=exclude)

    def on_peer_resets_low(self) -> None:
        # the cancellations this shared connection relayed took half of the peer's rapid-reset budget:
        # new calls go to a fresh connection before the peer ends this one, with every call on it
        if self.retired:
            return
        self.retired = True
        log.info("upstream_retired_for_resets", upstream=self.proxy.name, endpoint=self.key)
        self.proxy.forget(self)
        self.reroute_waiting()

    def on_connection_error(self, code: int, reason: str, detail: str) -> None:
        self.retired = True
        self.proxy.forget(self)
        super().on_connection_error(code, reason, detail)


# -- what the connections and the proxy's helpers use of the proxy ---------------------------------

class ConnOwner(Protocol):
    """What :class:`Conn` needs of whoever owns it: a list of connections with output queued in this
    event-loop turn, and ``flush``, which writes it.

    Implemented by :class:`FrameProxy`'s implementations and by ``sidecar.grpc_client``'s
    connection owner; used by :class:`Conn`.
    """

    @property
    def dirty(self) -> list[Conn]: ...
    def flush(self) -> None: ...


class FrameProxy(ConnOwner, Protocol):
    """What the connections ask of the frame-level proxy that owns them: where a new stream goes, and
    what is done with each frame of a call; also what ``sidecar.h2_idle`` and the shared parts of
    ``sidecar.h2_traffic`` use (``fail``, ``flush``, the deadline groups).

    Implemented by ``sidecar.h2_proxy.H2Outbound`` and ``sidecar.h2_proxy.H2Inbound``; used by
    :class:`Conn`, :class:`AppConn`, :class:`UpConn`, :class:`DeadlineGroup`, ``sidecar.h2_idle``
    and ``sidecar.h2_traffic``.
    """

    @property
    def name(self) -> str:
        """The upstream's name (inbound: "the local app"), for messages and logs."""
    @property
    def limits(self) -> Limits: ...
    @property
    def telemetry(self) -> Telemetry | None: ...
    @property
    def gate(self) -> ListenerGate | None: ...
    @property
    def apps(self) -> set[AppConn]: ...
    @property
    def _traffic_deadlines(self) -> dict[tuple[float, Expiry], DeadlineGroup]:
        """The deadline groups of this proxy's streams, by timeout and expiry (``sidecar.h2_traffic``)."""
    def open_stream(self, st: Stream, exclude: str = "") -> None: ...
    def send_request(self, st: Stream, up: UpConn) -> None: ...
    def client_trailers(self, st: Stream, block: bytes) -> None: ...
    def to_upstream(self, st: Stream, data: bytes, end: bool) -> None: ...
    def flush_to_up(self, st: Stream) -> None: ...
    def retry_answer(self, up: UpConn, st: Stream, raw: bytes, end: bool) -> bool:
        """Response headers of a stream with a plan: True when a retry (or a failure) consumed them."""
    def to_app_headers(self, st: Stream, block: bytes, end: bool) -> None: ...
    def to_app(self, st: Stream, data: bytes, end: bool) -> None: ...
    def flush_to_app(self, st: Stream) -> None: ...
    def drop_queues(self, st: Stream) -> None: ...
    def abandon(self, st: Stream, code: int) -> None: ...
    def fail(self, st: Stream, code: int, message: str) -> None: ...
    def release(self, st: Stream, *, ok: bool) -> None: ...
    def finish(self, st: Stream, code: int) -> None: ...
    def forget(self, up: UpConn) -> None: ...
    def up_lost(self, up: UpConn) -> None: ...
    def retry_lost(self, st: Stream) -> bool:
        """A stream with a plan lost its connection: True when it is being retried."""


class OutboundFrameProxy(FrameProxy, Protocol):
    """The outbound proxy of one upstream, as its routed streams' helpers see it: the upstream's pool,
    its connections, and how a planned stream is sent to an endpoint.

    Implemented by ``sidecar.h2_proxy.H2Outbound``; used by ``sidecar.h2_traffic`` (routing, timeouts,
    retries) and ``sidecar.h2_circuit`` (limits, connect timeouts).
    """

    @property
    def _out(self) -> Direction: ...
    @property
    def pool(self) -> UpstreamPool: ...
    @property
    def ups(self) -> dict[str, UpConn]:
        """The connection new calls to each endpoint go to."""
    @property
    def all_ups(self) -> set[UpConn]:
        """Every open upstream connection, retired ones included."""
    def route(self, st: Stream, up: UpConn) -> None: ...
    def _up(self, key: str) -> UpConn: ...


class InboundFrameProxy(FrameProxy, Protocol):
    """The inbound full path's proxy, as ``sidecar.h2_traffic``'s inbound hooks (the caller's rate
    limits and faults) see it.

    Implemented by ``sidecar.h2_proxy.H2Inbound``; used by ``sidecar.h2_traffic.inbound_controls``.
    """

    @property
    def _out(self) -> InboundDirection: ...


Expiry = Callable[[FrameProxy, Stream, float], None]  # what a deadline group calls for a stream past its timeout


class DeadlineGroup:
    """The streams of one proxy that share a timeout, in the order they started (so in the order of
    their deadlines), with one timer for the earliest: a stream costs a dict insert and delete
    instead of a timer of its own, and a call that ends in time touches no timer. Armed and disarmed
    by ``sidecar.h2_traffic``."""

    __slots__ = ("expire", "handle", "loop", "proxy", "streams", "timeout")

    def __init__(self, proxy: FrameProxy, timeout: float, expire: Expiry, loop: asyncio.AbstractEventLoop) -> None:
        self.proxy = proxy
        self.timeout = timeout
        self.expire = expire  # expire(proxy, stream, timeout)
        self.loop = loop
        self.streams: dict[Stream, float] = {}  # stream -> deadline (loop time)
        self.handle: asyncio.TimerHandle | None = None

    def add(self, st: Stream) -> None:
        deadline = self.loop.time() + self.timeout
        self.streams[st] = deadline
        st.timer = self
        if self.handle is None:
            self.handle = self.loop.call_at(deadline, self._fire)

    def cancel_for(self, st: Stream) -> None:
        self.streams.pop(st, None)

    def _fire(self) -> None:
        self.handle = None
        due = self.loop.time() + 0.001  # timers fire at millisecond resolution
        streams = self.streams
        expired = []
        for st, deadline in streams.items():
            if deadline > due:
                self.handle = self.loop.call_at(deadline, self._fire)
                break
            expired.append(st)
        for st in expired:
            del streams[st]
            if st.timer is self:
                st.timer = None
            self.expire(self.proxy, st, self.timeout)


__all__ = ["REPLAY_LIMIT", "AppConn", "Conn", "ConnOwner", "DeadlineGroup", "Expiry", "FrameProxy", "InboundFrameProxy",
           "OutboundFrameProxy", "Stream", "UpConn", "decode_plain"]
