"""One HTTP/2 connection endpoint as an explicit state machine (RFC 9113), without I/O.

:class:`H2Connection` parses what a peer sends (:meth:`~H2Connection.receive`), validates every
frame against the protocol and against :class:`sidecar.limits.Limits`, keeps the connection's
state (settings both ways, stream ids and states, flow-control windows in both directions, header
block assembly, flood counters, the reset budget, GOAWAY), and reports what happened through hooks
that a subclass overrides (``on_request``, ``on_headers``, ``on_data``, ``on_reset``,
``on_writable``, ...). Frames it produces go to :meth:`~H2Connection.send`, which the I/O adapter
implements (``sidecar.h2_proxy``); tests implement it with a list.

Errors follow RFC 9113 section 5.4: a *stream error* resets that stream (RST_STREAM with the code)
and keeps the connection; a *connection error* sends GOAWAY with the code and the last stream id
processed, then the adapter closes the connection. A bug in a hook (an unexpected exception) while
handling one stream's frame resets that stream with INTERNAL_ERROR; on stream 0 it ends the
connection with GOAWAY INTERNAL_ERROR. Every refusal is reported once through :meth:`counted`
with a short fixed reason.

Bounds (each from ``Limits``): frame size (what we advertise: 16 KiB), header block size across
HEADERS + CONTINUATION (bytes past it are counted and discarded, never buffered), CONTINUATION
frames per block, concurrent streams (REFUSED_STREAM past it), queued control frames while the
peer does not read (ENHANCE_YOUR_CALM), consecutive empty frames, PRIORITY frames per stream,
WINDOW_UPDATEs per DATA frame sent, and the rapid-reset budget (a token bucket of streams reset or
refused before their response was complete).

The client side keeps the same budget from the other end (:meth:`H2Connection.peer_resets_low`):
the streams *we* reset before the peer finished answering, counted as a peer with our limits counts
them. A proxy's upstream connection carries the cancellations of many callers; when they have taken
half of that budget the owner retires the connection (``on_peer_resets_low``), so that what it
relays never looks like a rapid-reset attack to the peer, which would end every call on it.

Flow control: a stream's send window is kept relative to the peer's SETTINGS_INITIAL_WINDOW_SIZE
(``peer_initial_window + stream.send_delta``), so a settings change costs nothing per stream;
streams that wait for window are kept in :attr:`H2Connection.blocked` and only those are woken when
a window opens. Padding counts against windows and is given back at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sidecar.h2.frames import (
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    E_CALM,
    E_FLOW,
    E_FRAME_SIZE,
    E_INTERNAL,
    E_NO_ERROR,
    E_PROTOCOL,
    E_REFUSED,
    E_STREAM_CLOSED,
    F_ACK,
    F_END_HEADERS,
    F_END_STREAM,
    F_PADDED,
    F_PRIORITY,
    GOAWAY,
    GOAWAY_HEAD,
    HEADER,
    HEADERS,
    MAX_FRAME_LIMIT,
    MAX_STREAM_ID,
    MAX_WINDOW,
    PING,
    PREFACE,
    PRIORITY,
    PUSH_PROMISE,
    RST_STREAM,
    S_ENABLE_PUSH,
    S_HEADER_TABLE_SIZE,
    S_INITIAL_WINDOW,
    S_MAX_CONCURRENT,
    S_MAX_FRAME,
    S_MAX_HEADER_LIST,
    SETTING,
    SETTINGS,
    U32,
    WINDOW_UPDATE,
    frame,
    goaway,
    rst_stream,
    settings_frame,
    window_update,
)
from sidecar.limits import Limits

RECENT_RESETS = 256  # stream ids we reset lately, whose in-flight frames are ignored rather than refused
# a stream the client resets after this long (its response not complete) is a cancellation, not rapid
# reset (Envoy's premature-reset minimum stream lifetime): a burst of deadline expiries does not cost
# the budget
RAPID_RESET_WINDOW = 1.0


class ConnectionFault(Exception):
    """A connection error: GOAWAY with ``code``; ``reason`` is the metric label."""

    def __init__(self, code: int, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.code = code
        self.reason = reason
        self.detail = detail or reason


class StreamFault(Exception):
    """A stream error: RST_STREAM ``code`` on ``sid``."""

    def __init__(self, sid: int, code: int, reason: str) -> None:
        super().__init__(reason)
        self.sid = sid
        self.code = code
        self.reason = reason


class H2Stream:
    """One stream's state on one connection. ``call`` is the owner's object (the proxied call)."""

    __slots__ = ("call", "headers_in", "local_closed", "opened", "recv_unacked", "recv_window",
                 "remote_closed", "send_delta", "sid")

    def __init__(self, sid: int, recv_window: int, call: Any = None) -> None:
        self.sid = sid
        self.send_delta = 0  # our send window is the peer's initial window plus this
        self.recv_window = recv_window  # what the peer may still send us on this stream
        self.recv_unacked = 0  # passed on, not yet given back with WINDOW_UPDATE
        self.remote_closed = False  # the peer sent END_STREAM
        self.local_closed = False  # we sent END_STREAM (server side: the response is complete, a reset is free)
        self.headers_in = False  # the peer sent a header block on it (DATA may follow)
        self.opened = 0.0  # when the peer opened it (server side), for the rapid-reset budget
        self.call = call


class H2Connection:
    """The protocol state of one HTTP/2 connection (client or server side); see the module docstring."""

    def __init__(self, limits: Limits, *, client: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.client = client
        self.clock = clock
        # what we advertise
        self.local_max_frame = DEFAULT_MAX_FRAME
        self.local_initial_window = limits.h2_initial_stream_window
        self.local_max_concurrent = limits.h2_max_concurrent_streams
        self.max_block = limits.h2_max_header_block_size
        self.max_list = limits.h2_max_header_list_size
        self.conn_update_at = limits.h2_connection_window >> 2  # credit given back in WINDOW_UPDATEs this big
        self.stream_update_at = limits.h2_initial_stream_window >> 1
        # what the peer advertised
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_MAX_FRAME
        self.peer_max_concurrent = MAX_STREAM_ID
        self.peer_max_header_list = 0  # 0: unlimited
        self.settings_seen = False  # the peer's first SETTINGS arrived
        self.settings_acked = False  # the peer acknowledged ours
        # windows
        self.send_window = DEFAULT_WINDOW
        self.recv_window = DEFAULT_WINDOW  # raised by preamble()
        self.recv_unacked = 0
        # streams
        self.streams: dict[int, H2Stream] = {}
        self.blocked: dict[H2Stream, None] = {}  # streams with data queued for want of window, in order
        self.highest_peer_sid = 0
        self.next_local_sid = 1 if client else 2
        self.recent_resets: dict[int, None] = {}
        self.streams_opened = 0
        # header block assembly
        self._hdr_sid = 0
        self._hdr_flags = 0
        self._hdr_frags = bytearray()
        self._hdr_size = 0
        self._hdr_count = 0
        # flood and abuse counters
        self.control_queued = 0  # control frames written since the peer last drained our output
        self.empty_frames = 0
        self.priority_frames = 0
        self.window_updates = 0
        self.data_frames_sent = 0
        self.reset_tokens = float(limits.h2_reset_burst)
        self.reset_last = -1.0
        # client side: the same budget as the peer keeps it for the resets we send (see peer_resets_low)
        self.peer_reset_tokens = float(limits.h2_reset_burst)
        self.peer_reset_last = -1.0
        # lifecycle
        self.buf = bytearray()
        self.preface_needed = 0 if client else len(PREFACE)
        self.write_paused = False  # the peer does not read: no DATA is sent until it does
        self.max_burst = limits.h2_max_buffered_bytes
        self.data_queued = 0  # DATA bytes sent since the adapter last wrote its output out
        self.burst_blocked = False  # a stream waits because max_burst was reached, not for window
        self.goaway_sent = False
        self.goaway_received = False
        self.dead = False  # a connection error was sent: nothing more is read

    # -- output (the adapter implements send) -------------------------------------------------------
    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def preamble(self) -> bytes:
        """What we send first: the client preface (client side), our SETTINGS and connection window."""
        lim = self.limits
        pairs = [(S_HEADER_TABLE_SIZE, 0), (S_ENABLE_PUSH, 0), (S_INITIAL_WINDOW, lim.h2_initial_stream_window),
                 (S_MAX_HEADER_LIST, lim.h2_max_header_list_size)]
        if not self.client:
            pairs.insert(2, (S_MAX_CONCURRENT, lim.h2_max_concurrent_streams))
        self.recv_window = lim.h2_connection_window
        out = settings_frame(pairs) + window_update(0, lim.h2_connection_window - DEFAULT_WINDOW)
        return PREFACE + out if self.client else out

    def control_frame(self, data: bytes) -> None:
        """A frame we owe the peer (PING/SETTINGS ack, RST_STREAM): bounded while it does not read."""
        self.control_queued += 1
        if self.control_queued > self.limits.h2_max_outbound_control_frames:
            raise ConnectionFault(E_CALM, "control_frame_flood",
                                  f"more than {self.limits.h2_max_outbound_control_frames} control frames queued "
                                  "for a peer that does not read")
        self.send(data)

    def drained(self) -> None:
        """The adapter's output buffer is empty: the peer reads what we send."""
        self.control_queued = 0

    def written(self) -> bool:
        """The adapter wrote our output out; True when streams wait only for that (call
        :meth:`release_blocked` on a later turn, when the transport could push back)."""
        self.data_queued = 0
        if self.burst_blocked:
            self.burst_blocked = False
            return not self.write_paused
        return False

    # -- input ---------------------------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Parse and handle every whole frame in ``data`` (plus what was kept over); keeps a partial frame."""
        if self.dead:
            return
        buf: bytes | bytearray
        if self.buf:
            self.buf += data
            buf = self.buf
        else:
            buf = data
        i = 0
        if self.preface_needed:
            got = min(len(buf), len(PREFACE))
            if bytes(buf[:got]) != PREFACE[:got]:
                self.connection_error(E_PROTOCOL, "bad_preface", "the client preface is wrong")
                return
            if got < len(PREFACE):
                self.buf = bytearray(buf)
                return
            self.preface_needed = 0
            i = len(PREFACE)
        n = len(buf)
        max_frame = self.local_max_frame
        while n - i >= 9:
            hi, lo, typ, flags, sid = HEADER.unpack_from(buf, i)
            length = (hi << 16) | lo
            if length > max_frame:
                self.connection_error(E_FRAME_SIZE, "frame_size",
                                      f"a frame of {length} bytes is above the maximum frame size of {max_frame}")
                return
            end = i + 9 + length
            if end > n:
                break
            payload = bytes(buf[i + 9:end])
            i = end
            sid &= MAX_STREAM_ID
            try:
                if self._hdr_sid or not self.settings_seen:  # the uncommon states: checked in _frame
                    self._frame(typ, flags, sid, payload)
                elif typ == DATA:
                    self._data(flags, sid, payload)
                elif typ == HEADERS:
                    self._headers(flags, sid, payload)
                else:
                    self._frame(typ, flags, sid, payload)
            except StreamFault as fault:
                self.stream_error(fault.sid, fault.code, fault.reason)
            except ConnectionFault as fault:
                self.connection_error(fault.code, fault.reason, fault.detail)
            except Exception as exc:  # a bug in one stream's handling ends that stream, not the connection
                if sid and not self._hdr_sid and typ in (DATA, HEADERS, CONTINUATION, RST_STREAM, WINDOW_UPDATE):
                    self.stream_error(sid, E_INTERNAL, "internal_error", exc)
                else:
                    self.connection_error(E_INTERNAL, "internal_error", f"{type(exc).__name__}: {exc}")
            if self.dead:
                self.buf = bytearray()
                return
        self.buf = bytearray(buf[i:]) if i < n else bytearray()

    def _frame(self, typ: int, flags: int, sid: int, payload: bytes) -> None:
        if self._hdr_sid:
            if typ != CONTINUATION or sid != self._hdr_sid:
                raise ConnectionFault(E_PROTOCOL, "continuation_expected",
                                      "a header block was interrupted by another frame")
            self._continuation(flags, payload)
            return
        if not self.settings_seen and typ != SETTINGS:
            raise ConnectionFault(E_PROTOCOL, "settings_expected", "the peer's first frame is not SETTINGS")
        if typ == DATA:
            self._data(flags, sid, payload)
        elif typ == HEADERS:
            self._headers(flags, sid, payload)
        elif typ == WINDOW_UPDATE:
            self._window_update(sid, payload)
        elif typ == SETTINGS:
            self._settings(flags, sid, payload)
        elif typ == PING:
            if sid:
                raise ConnectionFault(E_PROTOCOL, "ping_on_stream", "PING on a stream")
            if len(payload) != 8:
                raise ConnectionFault(E_FRAME_SIZE, "frame_size", "PING payload is not 8 bytes")
            if not flags & F_ACK:
                self.control_frame(frame(PING, F_ACK, 0, payload))
        elif typ == RST_STREAM:
            self._rst_stream(sid, payload)
        elif typ == PRIORITY:
            self._priority(sid, payload)
        elif typ == GOAWAY:
            if sid:
                raise ConnectionFault(E_PROTOCOL, "goaway_on_stream", "GOAWAY on a stream")
            if len(payload) < 8:
                raise ConnectionFault(E_FRAME_SIZE, "frame_size", "GOAWAY payload shorter than 8 bytes")
            last, code = GOAWAY_HEAD.unpack_from(payload)
            self.goaway_received = True
            self.on_goaway(last & MAX_STREAM_ID, code)
        elif typ == CONTINUATION:
            raise ConnectionFault(E_PROTOCOL, "unexpected_continuation", "CONTINUATION without a header block")
        elif typ == PUSH_PROMISE:
            raise ConnectionFault(E_PROTOCOL, "push_promise", "PUSH_PROMISE while push is disabled")
        # unknown frame types are ignored (RFC 9113 5.5)

    def _idle(self, sid: int) -> bool:
        """Whether ``sid`` names a stream that was never opened (frames on it are a connection error)."""
        if sid & 1 == (1 if self.client else 0):  # one of ours
            return sid >= self.next_local_sid
        return sid > self.highest_peer_sid

    def _empty(self) -> None:
        self.empty_frames += 1
        if self.empty_frames > self.limits.h2_max_empty_frames:
            raise ConnectionFault(E_CALM, "empty_frame_flood",
                                  f"more than {self.limits.h2_max_empty_frames} consecutive empty frames")

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid:
            raise ConnectionFault(E_PROTOCOL, "data_on_stream_0", "DATA on stream 0")
        length = len(payload)
        if length > self.recv_window:
            raise ConnectionFault(E_FLOW, "connection_window_exceeded",
                                  f"DATA of {length} bytes beyond the connection window of {self.recv_window}")
        self.recv_window -= length
        data = payload
        pad = 0
        if flags & F_PADDED:
            if not length or payload[0] >= length:
                raise ConnectionFault(E_PROTOCOL, "bad_padding", "padding as long as the DATA frame")
            pad = payload[0] + 1
            data = payload[1:length - payload[0]]
        end = flags & F_END_STREAM
        if data or end:
            self.empty_frames = 0
        else:
            self._empty()
        s = self.streams.get(sid)
        if s is None:
            self.consumed(length)
            if self._idle(sid):
                raise ConnectionFault(E_PROTOCOL, "data_on_idle_stream", f"DATA on idle stream {sid}")
            return  # a stream that is closed or that we reset: its in-flight data is dropped
        if s.remote_closed:
            self.consumed(length)
            raise StreamFault(sid, E_STREAM_CLOSED, "data_after_end_stream")
        if length > s.recv_window:
            self.consumed(length)
            raise StreamFault(sid, E_FLOW, "stream_window_exceeded")
        if not s.headers_in:
            self.consumed(length)
            raise StreamFault(sid, E_PROTOCOL, "data_before_headers")
        s.recv_window -= length
        if pad:  # padding is never passed on: give its window back at once
            self.consumed(pad)
            self.stream_consumed(s, pad)
        if end:
            s.remote_closed = True
        self.on_data(s, end, data)

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        if not sid:
            raise ConnectionFault(E_PROTOCOL, "headers_on_stream_0", "HEADERS on stream 0")
        block = payload
        if flags & F_PADDED:
            if not payload or payload[0] >= len(payload):
                raise ConnectionFault(E_PROTOCOL, "bad_padding", "padding as long as the HEADERS frame")
            block = payload[1:len(payload) - payload[0]]
        if flags & F_PRIORITY:
            if len(block) < 5:
                raise ConnectionFault(E_FRAME_SIZE, "frame_size", "HEADERS priority fields truncated")
            if U32.unpack_from(block)[0] & MAX_STREAM_ID == sid:
                raise ConnectionFault(E_PROTOCOL, "self_dependency", f"stream {sid} depends on itself")
            block = block[5:]
        if block or flags & F_END_STREAM:
            self.empty_frames = 0
        else:
            self._empty()
        if flags & F_END_HEADERS:
            self._header_block(sid, flags, block, len(block))
            return
        self._hdr_sid = sid
        self._hdr_flags = flags
        self._hdr_size = len(block)
        self._hdr_count = 0
        self._hdr_frags = bytearray(block[:self.max_block])

    def _continuation(self, flags: int, payload: bytes) -> None:
        self._hdr_count += 1
        if self._hdr_count > self.limits.h2_max_continuation_frames:
            raise ConnectionFault(E_CALM, "continuation_flood",
                                  f"more than {self.limits.h2_max_continuation_frames} CONTINUATION frames in "
                                  "one header block")
        if payload:
            self.empty_frames = 0
        else:
            self._empty()
        self._hdr_size += len(payload)
        room = self.max_block - len(self._hdr_frags)
        if room > 0:  # past the limit bytes are counted, never kept
            self._hdr_frags += payload[:room]
        if flags & F_END_HEADERS:
            sid, self._hdr_sid = self._hdr_sid, 0
            block = bytes(self._hdr_frags)
            self._hdr_frags = bytearray()
            self._header_block(sid, self._hdr_flags, block, self._hdr_size)

    def _header_block(self, sid: int, flags: int, block: bytes, size: int) -> None:
        oversized = size > self.max_block
        s = self.streams.get(sid)
        if s is not None:
            if s.remote_closed:
                self.on_discarded_block(block, oversized)
                raise StreamFault(sid, E_STREAM_CLOSED, "headers_after_end_stream")
            if not flags & F_END_STREAM and not self.client:
                self.on_discarded_block(block, oversized)
                raise StreamFault(sid, E_PROTOCOL, "trailers_without_end_stream")
            if flags & F_END_STREAM:
                s.remote_closed = True
            s.headers_in = True
            if oversized:
                self.on_oversized(s, flags, block, size)
            else:
                self.on_headers(s, flags, block)
            return
        if self.client:
            if sid & 1 and sid < self.next_local_sid:  # a stream we closed or reset
                self.on_discarded_block(block, oversized)
                return
            raise ConnectionFault(E_PROTOCOL, "headers_on_idle_stream", f"HEADERS on stream {sid} we never opened")
        if not sid & 1:
            raise ConnectionFault(E_PROTOCOL, "even_stream_id", f"a client opened even stream {sid}")
        if sid <= self.highest_peer_sid:
            if sid in self.recent_resets:
                self.on_discarded_block(block, oversized)
                return
            raise ConnectionFault(E_PROTOCOL, "stream_id_reused",
                                  f"stream {sid} is not above the last opened stream {self.highest_peer_sid}")
        self.highest_peer_sid = sid
        if self.goaway_sent:  # after our GOAWAY: not processed, the client may retry it elsewhere
            self.on_discarded_block(block, oversized)
            return
        if len(self.streams) >= self.local_max_concurrent:
            self.on_discarded_block(block, oversized)
            self.counted("refused_stream")
            self._remember_reset(sid)
            self.control_frame(rst_stream(sid, E_REFUSED))
            self.spend_reset()
            return
        s = H2Stream(sid, self.local_initial_window)
        s.headers_in = True
        s.opened = self.clock()
        if flags & F_END_STREAM:
            s.remote_closed = True
        self.streams[sid] = s
        self.streams_opened += 1
        if oversized:
            self.on_oversized(s, flags, block, size)
        else:
            self.on_request(s, flags, block)

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionFault(E_FRAME_SIZE, "frame_size", "WINDOW_UPDATE payload is not 4 bytes")
        inc = U32.unpack(payload)[0] & MAX_WINDOW
        self.window_updates += 1
        lim = self.limits.h2_max_window_updates_per_data_frame
        if self.window_updates > lim * (self.data_frames_sent + 1) + 2 * self.streams_opened + 16:
            raise ConnectionFault(E_CALM, "window_update_flood",
                                  f"more than {lim} WINDOW_UPDATE frames per DATA frame sent")
        if not sid:
            if not inc:
                raise ConnectionFault(E_PROTOCOL, "zero_window_increment", "WINDOW_UPDATE of 0 on the connection")
            self.send_window += inc
            if self.send_window > MAX_WINDOW:
                raise ConnectionFault(E_FLOW, "window_overflow", "connection window above 2^31-1")
            if self.blocked:
                self.release_blocked()
            return
        s = self.streams.get(sid)
        if s is None:
            if self._idle(sid):
                raise ConnectionFault(E_PROTOCOL, "window_update_on_idle_stream",
                                      f"WINDOW_UPDATE on idle stream {sid}")
            return
        if not inc:
            raise StreamFault(sid, E_PROTOCOL, "zero_window_increment")
        s.send_delta += inc
        if self.peer_initial_window + s.send_delta > MAX_WINDOW:
            raise StreamFault(sid, E_FLOW, "window_overflow")
        if s in self.blocked and self.send_window > 0 and not self.write_paused:
            del self.blocked[s]
            self.on_writable(s)

    def _settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid:
            raise ConnectionFault(E_PROTOCOL, "settings_on_stream", "SETTINGS on a stream")
        if flags & F_ACK:
            if payload:
                raise ConnectionFault(E_FRAME_SIZE, "frame_size", "SETTINGS acknowledgement with a payload")
            self.settings_acked = True
            self.on_settings_ack()
            return
        if len(payload) % 6:
            raise ConnectionFault(E_FRAME_SIZE, "frame_size", "SETTINGS payload not a multiple of 6 bytes")
        opened = False
        for off in range(0, len(payload), 6):
            key, value = SETTING.unpack_from(payload, off)
            if key == S_INITIAL_WINDOW:
                if value > MAX_WINDOW:
                    raise ConnectionFault(E_FLOW, "bad_settings", f"SETTINGS_INITIAL_WINDOW_SIZE {value} above 2^31-1")
                opened = opened or value > self.peer_initial_window
                self.peer_initial_window = value
            elif key == S_MAX_FRAME:
                if not DEFAULT_MAX_FRAME <= value <= MAX_FRAME_LIMIT:
                    raise ConnectionFault(E_PROTOCOL, "bad_settings",
                                          f"SETTINGS_MAX_FRAME_SIZE {value} outside [16384, 2^24-1]")
                self.peer_max_frame = value
            elif key == S_ENABLE_PUSH:
                if value > 1 or (value and self.client):  # a server must not enable push (RFC 9113 6.5.2)
                    raise ConnectionFault(E_PROTOCOL, "bad_settings", f"SETTINGS_ENABLE_PUSH {value} is not allowed")
            elif key == S_MAX_CONCURRENT:
                opened = opened or value > self.peer_max_concurrent
                self.peer_max_concurrent = value
            elif key == S_MAX_HEADER_LIST:
                self.peer_max_header_list = value
        # the acknowledgement goes out before any frame that relies on the new values (a peer applies
        # a raised initial window to what it receives only once it has our ACK)
        self.control_frame(frame(SETTINGS, F_ACK, 0))
        first = not self.settings_seen
        self.settings_seen = True
        self.on_peer_settings(first)
        if opened and self.blocked:
            self.release_blocked()

    def _rst_stream(self, sid: int, payload: bytes) -> None:
        if not sid:
            raise ConnectionFault(E_PROTOCOL, "rst_on_stream_0", "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise ConnectionFault(E_FRAME_SIZE, "frame_size", "RST_STREAM payload is not 4 bytes")
        s = self.streams.pop(sid, None)
        if s is None:
            if self._idle(sid):
                raise ConnectionFault(E_PROTOCOL, "rst_on_idle_stream", f"RST_STREAM on idle stream {sid}")
            return
        self.blocked.pop(s, None)
        self.on_reset(s, U32.unpack(payload)[0])
        # every stream reset before its response was complete counts (answered with HEADERS or not: the
        # work it started is cancelled all the same), unless it lived past RAPID_RESET_WINDOW
        if not self.client and not s.local_closed and self.clock() - s.opened < RAPID_RESET_WINDOW:
            self.spend_reset()

    def _priority(self, sid: int, payload: bytes) -> None:
        if not sid:
            raise ConnectionFault(E_PROTOCOL, "priority_on_stream_0", "PRIORITY on stream 0")
        if len(payload) != 5:
            raise StreamFault(sid, E_FRAME_SIZE, "frame_size")
        self.priority_frames += 1
        lim = self.limits.h2_max_priority_frames_per_stream
        if self.priority_frames > lim * (self.streams_opened + 1):
            raise ConnectionFault(E_CALM, "priority_flood", f"more than {lim} PRIORITY frames per stream")
        if U32.unpack_from(payload)[0] & MAX_STREAM_ID == sid:
            raise StreamFault(sid, E_PROTOCOL, "self_dependency")

    # -- budgets ---------------------------------------------------------------------------------------
    def spend_reset(self) -> None:
        """One stream reset or refused before its response was complete: past the budget, ENHANCE_YOUR_CALM."""
        now = self.clock()
        if self.reset_last >= 0:
            self.reset_tokens = min(float(self.limits.h2_reset_burst),
                                    self.reset_tokens + (now - self.reset_last) * self.limits.h2_reset_rate)
        self.reset_last = now
        if self.reset_tokens < 1.0:
            raise ConnectionFault(E_CALM, "rapid_reset",
                                  f"more than {self.limits.h2_reset_burst} streams reset before an answer")
        self.reset_tokens -= 1.0

    def _spend_peer_reset(self, s: H2Stream) -> None:
        """Client side: we reset ``s``; if the peer had not finished answering, that costs its budget."""
        if not self.client or s.remote_closed:
            return
        now = self.clock()
        burst = float(self.limits.h2_reset_burst)
        if self.peer_reset_last >= 0:
            self.peer_reset_tokens = min(burst, self.peer_reset_tokens
                                         + (now - self.peer_reset_last) * self.limits.h2_reset_rate)
        self.peer_reset_last = now
        self.peer_reset_tokens -= 1.0
        if self.peer_resets_low():
            self.on_peer_resets_low()

    def peer_resets_low(self) -> bool:
        """Client side: whether our resets took half of the rapid-reset budget the peer keeps for us
        (assumed to be ours: the mesh's sidecars share the defaults). The other half is left for the
        streams still open when the owner stops opening new ones here (at most the peer's
        SETTINGS_MAX_CONCURRENT_STREAMS, 256 for a sidecar, under half of the default burst of 1000)."""
        return self.peer_reset_tokens < self.limits.h2_reset_burst / 2

    # -- windows ---------------------------------------------------------------------------------------
    def consumed(self, n: int) -> None:
        """``n`` bytes received on the connection were passed on (or dropped): give the window back."""
        self.recv_unacked += n
        if self.recv_unacked >= self.conn_update_at:
            self.send(window_update(0, self.recv_unacked))
            self.recv_window += self.recv_unacked
            self.recv_unacked = 0

    def stream_consumed(self, s: H2Stream, n: int) -> None:
        """``n`` bytes received on stream ``s`` were passed on: give the stream's window back."""
        s.recv_unacked += n
        if s.recv_unacked >= self.stream_update_at and s.sid in self.streams and not s.remote_closed:
            self.send(window_update(s.sid, s.recv_unacked))
            s.recv_window += s.recv_unacked
            s.recv_unacked = 0

    def passed_on(self, s: H2Stream, n: int) -> None:
        """:meth:`consumed` and :meth:`stream_consumed` in one call (the proxy's per-DATA path)."""
        unacked = self.recv_unacked + n
        if unacked >= self.conn_update_at:
            self.send(window_update(0, unacked))
            self.recv_window += unacked
            unacked = 0
        self.recv_unacked = unacked
        unacked = s.recv_unacked + n
        if unacked >= self.stream_update_at and s.sid in self.streams and not s.remote_closed:
            self.send(window_update(s.sid, unacked))
            s.recv_window += unacked
            unacked = 0
        s.recv_unacked = unacked

    def send_window_of(self, s: H2Stream) -> int:
        return self.peer_initial_window + s.send_delta

    def release_blocked(self) -> None:
        """A window opened (or the peer reads again): let waiting streams send, in the order they waited."""
        for s in list(self.blocked):
            if self.send_window <= 0 or self.write_paused or self.dead or self.data_queued >= self.max_burst:
                return
            if self.peer_initial_window + s.send_delta > 0:
                del self.blocked[s]
                self.on_writable(s)

    # -- sending ---------------------------------------------------------------------------------------
    def send_data(self, s: H2Stream, data: bytes, end: bool) -> int:
        """Send as much of ``data`` as the windows allow (nothing while the peer does not read);
        returns the bytes sent. A stream left with data is added to :attr:`blocked`."""
        n = len(data)
        if self.write_paused or self.data_queued >= self.max_burst:
            allowed = 0
            self.burst_blocked = not self.write_paused
        else:
            allowed = min(self.peer_initial_window + s.send_delta, self.send_window, n)
        if allowed <= 0:
            if n:
                self.blocked[s] = None
                return 0
            allowed = 0
        sent = 0
        mf = self.peer_max_frame
        sid = s.sid
        while sent < allowed:
            chunk = data[sent:sent + min(mf, allowed - sent)]
            sent += len(chunk)
            self.send(frame(DATA, F_END_STREAM if (end and sent == n) else 0, sid, chunk))
            self.data_frames_sent += 1
        if not n and end:
            self.send(frame(DATA, F_END_STREAM, sid))
            self.data_frames_sent += 1
        self.send_window -= sent
        s.send_delta -= sent
        self.data_queued += sent
        if sent < n:
            self.blocked[s] = None
        elif end:
            s.local_closed = True
        return sent

    def send_headers(self, s: H2Stream, block: bytes, end_stream: bool) -> None:
        """A header block on ``s``, split into HEADERS + CONTINUATION by the peer's maximum frame size."""
        if end_stream:
            s.local_closed = True
        sid = s.sid
        mf = self.peer_max_frame
        if len(block) <= mf:
            self.send(frame(HEADERS, F_END_HEADERS | (F_END_STREAM if end_stream else 0), sid, block))
            return
        self.send(frame(HEADERS, F_END_STREAM if end_stream else 0, sid, block[:mf]))
        for off in range(mf, len(block), mf):
            part = block[off:off + mf]
            self.send(frame(CONTINUATION, F_END_HEADERS if off + mf >= len(block) else 0, sid, part))

    def open_stream(self, call: Any = None) -> H2Stream:
        """A new stream of ours (client side); check :meth:`can_open` first."""
        sid = self.next_local_sid
        self.next_local_sid += 2
        s = H2Stream(sid, self.local_initial_window, call)
        self.streams[sid] = s
        self.streams_opened += 1
        return s

    def can_open(self) -> bool:
        """Whether a new stream may open now: under the peer's concurrency limit, ids left, no GOAWAY."""
        return (len(self.streams) < self.peer_max_concurrent and self.next_local_sid <= MAX_STREAM_ID
                and not self.goaway_received and not self.goaway_sent and not self.dead)

    def _remember_reset(self, sid: int) -> None:
        recent = self.recent_resets
        recent[sid] = None
        if len(recent) > RECENT_RESETS:
            del recent[next(iter(recent))]

    def reset(self, s: H2Stream, code: int) -> None:
        """End stream ``s`` with RST_STREAM ``code`` (its in-flight frames are then ignored)."""
        if self.streams.pop(s.sid, None) is None:
            return
        self.blocked.pop(s, None)
        self._remember_reset(s.sid)
        if not self.dead:  # ours to send (one per stream): not a reply the peer can make us queue
            self.send(rst_stream(s.sid, code))
            self._spend_peer_reset(s)

    def close_stream(self, s: H2Stream) -> None:
        """We are done with ``s``: forget it, resetting it (NO_ERROR) if the peer's side is still open."""
        if s.remote_closed:
            if self.streams.pop(s.sid, None) is not None:
                self.blocked.pop(s, None)
        else:
            self.reset(s, E_NO_ERROR)

    # -- errors --------------------------------------------------------------------------------------
    def stream_error(self, sid: int, code: int, reason: str, exc: BaseException | None = None) -> None:
        """RFC 9113 5.4.2: reset one stream, keep the connection."""
        self.counted(reason)
        s = self.streams.pop(sid, None)
        if s is not None:
            self.blocked.pop(s, None)
        self._remember_reset(sid)
        try:
            self.control_frame(rst_stream(sid, code))
            if s is not None:
                self._spend_peer_reset(s)
                self.on_stream_error(s, code, reason, exc)
        except ConnectionFault as fault:
            self.connection_error(fault.code, fault.reason, fault.detail)
        except Exception as bug:
            self.connection_error(E_INTERNAL, "internal_error", f"{type(bug).__name__}: {bug}")

    def connection_error(self, code: int, reason: str, detail: str = "") -> None:
        """RFC 9113 5.4.1: GOAWAY with ``code`` and the last stream processed; nothing more is read."""
        if self.dead:
            return
        self.dead = True
        self.counted(reason)
        self.send(goaway(self.highest_peer_sid, code, detail.encode("utf-8", "replace")[:256]))
        self.on_connection_error(code, reason, detail)

    def goaway(self) -> None:
        """Graceful shutdown: GOAWAY NO_ERROR with the last stream processed; open streams may finish."""
        if self.goaway_sent or self.dead:
            return
        self.goaway_sent = True
        self.send(goaway(self.highest_peer_sid, E_NO_ERROR))

    # -- hooks (a subclass overrides them) -------------------------------------------------------------
    def counted(self, reason: str) -> None:
        """A protocol error or a limit was hit (metrics and a rate-limited log in the adapter)."""

    def on_request(self, s: H2Stream, flags: int, block: bytes) -> None:
        """A peer opened stream ``s`` with this (whole, bounded) header block."""

    def on_headers(self, s: H2Stream, flags: int, block: bytes) -> None:
        """A header block on an open stream (response headers, or trailers)."""

    def on_oversized(self, s: H2Stream, flags: int, prefix: bytes, size: int) -> None:
        """A header block above the limit on ``s``: ``prefix`` is its first bytes, ``size`` its length."""
        self.reset(s, E_REFUSED)

    def on_discarded_block(self, block: bytes, truncated: bool) -> None:
        """A header block that will not be processed (a refused or closed stream): an adapter with a
        stateful HPACK decoder decodes it to keep in step."""

    def on_data(self, s: H2Stream, end: int, data: bytes) -> None:
        """DATA on ``s`` (padding removed); ``end`` is the END_STREAM flag."""

    def on_reset(self, s: H2Stream, code: int) -> None:
        """The peer reset ``s`` (already forgotten here)."""

    def on_writable(self, s: H2Stream) -> None:
        """``s`` had data waiting and may send again."""

    def on_goaway(self, last_sid: int, code: int) -> None:
        """The peer is going away: our streams above ``last_sid`` were not processed."""

    def on_peer_settings(self, first: bool) -> None:
        """The peer's SETTINGS were applied (and acknowledged)."""

    def on_settings_ack(self) -> None:
        """The peer acknowledged our SETTINGS."""

    def on_peer_resets_low(self) -> None:
        """Client side: our resets took half of the peer's rapid-reset budget (see :meth:`peer_resets_low`);
        called on each reset past that point. An owner that shares the connection stops opening streams on it."""

    def on_stream_error(self, s: H2Stream, code: int, reason: str, exc: BaseException | None) -> None:
        """We reset ``s`` for a protocol error or a bug in its handling (already forgotten here)."""

    def on_connection_error(self, code: int, reason: str, detail: str) -> None:
        """GOAWAY was sent for a connection error: the adapter closes the connection."""


__all__ = ["ConnectionFault", "H2Connection", "H2Stream", "StreamFault"]
