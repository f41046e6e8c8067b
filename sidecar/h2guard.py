"""The pass-through guard: HTTP/2 frame headers read in both directions, frame-level limits enforced.

On a public-port connection passed through to the app (an L4-allowed caller of a gRPC service), the
sidecar does not decode HPACK or proxy streams: the bytes go to the app as they came. This guard
still reads every frame header (9 bytes) in both directions, and the few payloads it needs (SETTINGS
entries, WINDOW_UPDATE increments), so that an allowed peer cannot hand the app what the sidecar
would refuse on its own HTTP/2 paths. From the client (the caller), a connection error is raised for:

- a missing or wrong client preface, or a first frame that is not SETTINGS (PROTOCOL_ERROR);
- a frame longer than the app's advertised SETTINGS_MAX_FRAME_SIZE (FRAME_SIZE_ERROR), and control
  frames of the wrong length (RFC 9113 6.3-6.9, FRAME_SIZE_ERROR);
- stream ids: HEADERS on stream 0 or an even stream, DATA/RST_STREAM on an idle stream, frames of
  a stream on stream 0, PUSH_PROMISE from a client, a header block interrupted by another frame
  (PROTOCOL_ERROR);
- more open streams than ``min(the app's SETTINGS_MAX_CONCURRENT_STREAMS, limit)``
  (PROTOCOL_ERROR). The app's first SETTINGS frame is extended in place with
  SETTINGS_MAX_CONCURRENT_STREAMS so the client is told the bound before it is enforced; until the
  client acknowledges it, the sidecar's own limit applies;
- a header block (HEADERS + CONTINUATION, encoded bytes) over ``h2_max_header_block_size`` or
  with more than ``h2_max_continuation_frames`` CONTINUATION frames (ENHANCE_YOUR_CALM);
- control-frame floods: PINGs and SETTINGS the app has not answered yet (its ACKs are seen going
  back) above ``h2_max_outbound_control_frames``: a client that sends them without reading makes the
  app queue the answers (ENHANCE_YOUR_CALM); PRIORITY frames above
  ``10 + h2_max_priority_frames_per_stream * (1 + streams opened)``; WINDOW_UPDATE frames above
  ``10 + h2_max_window_updates_per_data_frame * (1 + DATA frames the app sent)``; more than
  ``h2_max_empty_frames`` consecutive DATA/HEADERS/CONTINUATION frames with an empty payload and no
  END_STREAM (all ENHANCE_YOUR_CALM);
- rapid reset: RST_STREAM of a stream the app has not answered (no HEADERS back yet) takes a token
  from a bucket of ``h2_reset_burst`` refilled at ``h2_reset_rate`` per second (ENHANCE_YOUR_CALM);
- SETTINGS values out of range (ENABLE_PUSH > 1 or MAX_FRAME_SIZE outside 2^14..2^24-1:
  PROTOCOL_ERROR; INITIAL_WINDOW_SIZE > 2^31-1: FLOW_CONTROL_ERROR); a connection WINDOW_UPDATE of 0
  (PROTOCOL_ERROR) or one that takes the connection window the client grants the app past 2^31-1
  (FLOW_CONTROL_ERROR; the window is tracked from the app's DATA frames).

- stream state: HEADERS or DATA after the client's END_STREAM, DATA on a closed stream
  (STREAM_CLOSED), HEADERS that open a stream id not above the last one (PROTOCOL_ERROR), except on
  the last ``APP_RESETS_KEPT`` streams the app reset, whose in-flight frames the app ignores (RFC
  9113 5.1). RFC 9113 5.4.1 lets an endpoint treat these stream errors as connection errors; the guard
  must, since it cannot drop a frame without desynchronising HPACK.

Other stream-level errors (a stream WINDOW_UPDATE of 0) are left to the app, which answers them with
RST_STREAM without harm to others. The app's own frames are parsed for state only.

Cost: no payload byte is copied; the guard keeps at most a partial frame header (9 bytes), a partial
SETTINGS entry or WINDOW_UPDATE increment (6 bytes) and one small record per open stream (bounded by
the concurrent-stream limit). Pure: no I/O; the clock is injected.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.limits import Limits

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4

NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
ENHANCE_YOUR_CALM = 0xB

SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5

MAX_WINDOW = 2**31 - 1
DEFAULT_MAX_FRAME_SIZE = 16384
_MAX_PENDING_SETTINGS = 32  # app SETTINGS awaiting the client's ACK; past it they apply at once

_HDR = struct.Struct(">IBI")  # length(24) + type(8) as one int, flags, stream id (with the reserved bit)
_SETTING = struct.Struct(">HI")
_U32 = struct.Struct(">I")

# what the payload of the current frame is parsed for (most frames are skipped unread)
_SKIP, _CLIENT_SETTINGS, _CLIENT_WINDOW_UPDATE, _SERVER_SETTINGS = range(4)

# per-stream state bits
_CLIENT_ENDED = 1
_SERVER_ENDED = 2
_ANSWERED = 4
APP_RESETS_KEPT = 256  # stream ids the app reset lately: the client's frames in flight on them are ignored


@dataclass(frozen=True, slots=True)
class Violation:
    """Why a client connection is closed: the metric reason, the GOAWAY error code, a detail for the log."""

    reason: str
    code: int
    detail: str


def goaway(last_stream_id: int, code: int) -> bytes:
    """A GOAWAY frame (no debug data)."""
    return _HDR.pack((8 << 8) | GOAWAY, 0, 0) + struct.pack(">II", last_stream_id & MAX_WINDOW, code)


class _Direction:
    """Framing state of one direction: a partial header, the rest of the current frame's payload."""

    __slots__ = ("hbuf", "kind", "pbuf", "remaining")

    def __init__(self) -> None:
        self.hbuf = bytearray()  # a frame header split across reads (< 9 bytes)
        self.pbuf = bytearray()  # a SETTINGS entry / WINDOW_UPDATE increment split across reads
        self.remaining = 0  # payload bytes of the current frame still to come
        self.kind = _SKIP  # what they are parsed for (back to _SKIP once parsed)

    def skip(self, i: int, n: int) -> int:
        """Pass over the payload of the current frame as far as this chunk goes (offset ``i`` of ``n``)."""
        take = min(self.remaining, n - i)
        self.remaining -= take
        return i + take

    def split_header(self, data: memoryview, i: int, n: int) -> tuple[int, tuple[int, int, int] | None]:
        """Gather a frame header that spans reads: (new offset, the header once all 9 bytes are in)."""
        take = min(9 - len(self.hbuf), n - i)
        self.hbuf += data[i:i + take]
        i += take
        if len(self.hbuf) < 9:
            return i, None
        header: tuple[int, int, int] = _HDR.unpack(self.hbuf)
        self.hbuf.clear()
        return i, header


class H2Guard:
    """Frame-level limits on one pass-through connection: feed it the bytes of each direction as they pass.

    :meth:`feed_client` returns a :class:`Violation` when the client must be disconnected (send it
    :func:`goaway` with ``last_stream_id`` and ``code``, then close both sides), else None.
    :meth:`feed_server` returns None, or an insertion ``(offset, bytes)`` into the chunk just fed
    (the app's first SETTINGS frame extended with SETTINGS_MAX_CONCURRENT_STREAMS; its length is
    already patched in the chunk): the caller writes ``chunk[:offset] + bytes + chunk[offset:]``.
    """

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._c = _Direction()
        self._s = _Direction()
        self._preface = 0  # bytes of the client preface matched so far
        self._first_frame = True  # the client's first frame must be SETTINGS
        self.failed: Violation | None = None
        # streams: id -> state bits; the limits below bound its size
        self.streams: dict[int, int] = {}
        self.last_client_stream = 0
        self.streams_opened = 0
        # streams the app reset lately (RFC 9113 5.1: frames the client sent before it saw the RST_STREAM
        # are ignored by the app, so they are no violation); bounded FIFO
        self._app_resets: set[int] = set()
        self._app_reset_order: deque[int] = deque()
        self._our_max_streams = limits.h2_max_concurrent_streams
        self.max_streams = limits.h2_max_concurrent_streams  # in force (acknowledged by the client)
        self._pending_server_settings: list[int] = []  # max streams each unacknowledged app SETTINGS carries
        self._server_settings_seen = False
        self._frame_max_streams = -1  # MAX_CONCURRENT_STREAMS within the app SETTINGS frame being parsed
        self._insert_at_end = False  # the app SETTINGS frame being parsed gets our entry appended
        self.client_max_frame = DEFAULT_MAX_FRAME_SIZE  # the app's SETTINGS_MAX_FRAME_SIZE
        # header blocks
        self._cont_sid = 0
        # a HEADERS frame that may be checked inline: no longer than the block limit nor the frame size
        self._inline_headers_max = min(limits.h2_max_header_block_size, DEFAULT_MAX_FRAME_SIZE)
        self._cont_frames = 0
        self._block = 0
        # floods
        self._unanswered_control = 0
        self._priority_frames = 0
        self._window_updates = 0
        self._server_data_frames = 0
        self._empty = 0
        self._reset_tokens = float(limits.h2_reset_burst)
        self._reset_time: float | None = None
        # the connection window the client grants the app
        self.client_window = 65535

    # -- state for the I/O side ----------------------------------------------------------------
    @property
    def open_streams(self) -> int:
        return len(self.streams)

    def server_at_frame_boundary(self) -> bool:
        """True when a frame of our own (GOAWAY) can be written to the client without cutting one of the app's."""
        s = self._s
        return not s.remaining and not s.hbuf

    # -- client -> app -------------------------------------------------------------------------
    def feed_client(self, data: memoryview) -> Violation | None:
        if self.failed is not None:
            return self.failed
        n = len(data)
        i = 0
        if self._preface < 24:
            take = min(24 - self._preface, n)
            if data[:take] != PREFACE[self._preface:self._preface + take]:
                return self._fail("preface", PROTOCOL_ERROR, "the client did not send the HTTP/2 preface")
            self._preface += take
            i = take
        d = self._c
        unpack = _HDR.unpack_from
        while i < n:
            if d.remaining:
                if d.kind == _SKIP:
                    i = d.skip(i, n)
                    continue
                i, v = self._client_payload(data, i, n)
                if v is not None:
                    return v
                continue
            if not self._cont_sid and not self._first_frame and not d.hbuf and n - i >= 9:
                j = self._client_run(data, i, n)
                if j != i:
                    i = j
                    continue
            if d.hbuf or n - i < 9:
                i, header = d.split_header(data, i, n)
                if header is None:
                    return None
                lt, flags, sid = header
            else:
                lt, flags, sid = unpack(data, i)
                i += 9
            length = lt >> 8
            v = self._client_frame(length, lt & 0xFF, flags, sid & MAX_WINDOW)
            if v is not None:
                return v
            if d.kind == _SKIP:  # the payload is not read: pass over what of it is in this chunk
                i += length
                if i > n:
                    d.remaining = i - n
                    i = n
            elif length:
                d.remaining = length
            else:
                d.kind = _SKIP
        return None

    def _client_run(self, data: memoryview, i: int, n: int) -> int:
        """Pass over the frames every call sends, from offset ``i`` (at a frame header, past the first frame and
        outside a header block): a request's HEADERS opening a stream in one frame, and its last DATA frame. Returns
        the offset of the first frame that is anything else (for :meth:`_client_frame`), or of the chunk's
        end. Each frame taken here meets the checks :meth:`_client_frame` would make, which it would pass:
        its conditions are those checks, with the limits read once per chunk."""
        unpack = _HDR.unpack_from
        streams = self.streams
        last = self.last_client_stream
        max_streams = self.max_streams
        headers_max = self._inline_headers_max
        max_frame = self.client_max_frame
        start = i
        opened = 0
        while n - i >= 9:
            lt, flags, sid = unpack(data, i)
            ftype = lt & 0xFF
            length = lt >> 8
            sid &= MAX_WINDOW
            if ftype == HEADERS:
                if not (flags & FLAG_END_HEADERS and sid & 1 and length and sid > last
                        and len(streams) < max_streams and length <= headers_max):
                    break
                last = sid
                opened += 1
                streams[sid] = _CLIENT_ENDED if flags & FLAG_END_STREAM else 0
            elif ftype == DATA:
                if not (flags & FLAG_END_STREAM and length <= max_frame
                        and streams.get(sid, _CLIENT_ENDED) & _CLIENT_ENDED == 0):
                    break
                state = streams[sid]
                if state & _SERVER_ENDED:
                    del streams[sid]
                else:
                    streams[sid] = state | _CLIENT_ENDED
            else:
                break
            i += 9 + length
            if i > n:  # its payload goes on in the next chunk, passed over unread
                self._c.remaining = i - n
                self._c.kind = _SKIP
                i = n
        if i != start:
            self._empty = 0  # every frame taken had a payload or END_STREAM
            if opened:
                self.last_client_stream = last
                self.streams_opened += opened
        return i

    def _client_frame(self, length: int, ftype: int, flags: int, sid: int) -> Violation | None:
        """Check one client frame header; sets ``self._c.kind`` when its payload must be parsed."""
        if length > self.client_max_frame:
            return self._fail("frame_size", FRAME_SIZE_ERROR,
                              f"frame of {length} bytes over the max frame size {self.client_max_frame}")
        if self._first_frame:
            self._first_frame = False
            if ftype != SETTINGS or flags & FLAG_ACK:
                return self._fail("preface", PROTOCOL_ERROR, "the client's first frame is not SETTINGS")
        if self._cont_sid and (ftype != CONTINUATION or sid != self._cont_sid):
            return self._fail("continuation_expected", PROTOCOL_ERROR,
                              f"frame type {ftype} inside the header block of stream {self._cont_sid}")
        if ftype == DATA:
            if sid == 0 or sid > self.last_client_stream:
                return self._fail("stream_id", PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            streams = self.streams
            state = streams.get(sid)
            if state is None:
                if sid not in self._app_resets:
                    return self._fail("data_on_closed_stream", STREAM_CLOSED, f"DATA on closed stream {sid}")
            elif state & _CLIENT_ENDED:
                return self._fail("data_after_end_stream", STREAM_CLOSED, f"DATA after END_STREAM on stream {sid}")
            if flags & FLAG_END_STREAM:
                self._empty = 0
                if state is not None:  # _end, inline: this is every call's last request frame
                    if state & _SERVER_ENDED:
                        del streams[sid]
                    else:
                        streams[sid] = state | _CLIENT_ENDED
                return None
            if length == 0:
                return self._empty_frame()
            self._empty = 0
            return None
        check = _CLIENT_CHECKS.get(ftype)
        if check is None:
            return None  # an extension frame: RFC 9113 says ignore it; the app does
        return check(self, length, flags, sid)

    def _check_headers(self, length: int, flags: int, sid: int) -> Violation | None:
        """A request's headers (a new stream, below the concurrent-stream limit) or its trailers."""
        if sid == 0 or not sid & 1:
            return self._fail("stream_id", PROTOCOL_ERROR, f"HEADERS on stream {sid}")
        if sid > self.last_client_stream:
            if len(self.streams) >= self.max_streams:
                return self._fail("concurrent_streams", PROTOCOL_ERROR,
                                  f"stream {sid} over the {self.max_streams} concurrent streams allowed")
            self.last_client_stream = sid
            self.streams_opened += 1
            self.streams[sid] = 0
        else:  # trailers on an open stream, or a stream id used again
            state = self.streams.get(sid)
            if state is None and sid not in self._app_resets:
                return self._fail("stream_id_reused", PROTOCOL_ERROR,
                                  f"HEADERS on stream {sid}, not above the last opened stream "
                                  f"{self.last_client_stream}")
            if state is not None and state & _CLIENT_ENDED:
                return self._fail("headers_after_end_stream", STREAM_CLOSED,
                                  f"HEADERS after END_STREAM on stream {sid}")
        if length > self.limits.h2_max_header_block_size:
            return self._fail("header_block_size", ENHANCE_YOUR_CALM,
                              f"header block over {self.limits.h2_max_header_block_size} bytes")
        if not flags & FLAG_END_HEADERS:
            self._cont_sid = sid
            self._cont_frames = 0
            self._block = length
        if length == 0 and not flags & FLAG_END_STREAM:
            v = self._empty_frame()
            if v is not None:
                return v
        else:
            self._empty = 0
        if flags & FLAG_END_STREAM:
            self._end(sid, _CLIENT_ENDED)
        return None

    def _check_continuation(self, length: int, flags: int, sid: int) -> Violation | None:
        """The rest of a header block: counted and bounded like the block itself."""
        if not self._cont_sid:
            return self._fail("stream_id", PROTOCOL_ERROR, f"CONTINUATION outside a header block on stream {sid}")
        self._cont_frames += 1
        if self._cont_frames > self.limits.h2_max_continuation_frames:
            return self._fail("continuation_flood", ENHANCE_YOUR_CALM,
                              f"more than {self.limits.h2_max_continuation_frames} CONTINUATION frames")
        self._block += length
        if self._block > self.limits.h2_max_header_block_size:
            return self._fail("header_block_size", ENHANCE_YOUR_CALM,
                              f"header block over {self.limits.h2_max_header_block_size} bytes")
        if flags & FLAG_END_HEADERS:
            self._cont_sid = 0
        if length == 0 and not flags & FLAG_END_HEADERS:
            return self._empty_frame()
        self._empty = 0
        return None

    def _check_window_update(self, length: int, flags: int, sid: int) -> Violation | None:
        """Bounded by the DATA the app sends (a flood of them costs the app work for nothing)."""
        if length != 4:
            return self._fail("frame_size", FRAME_SIZE_ERROR, f"WINDOW_UPDATE of {length} bytes")
        self._window_updates += 1
        allowed = 10 + self.limits.h2_max_window_updates_per_data_frame * (1 + self._server_data_frames)
        if self._window_updates > allowed:
            return self._fail("window_update_flood", ENHANCE_YOUR_CALM,
                              f"{self._window_updates} WINDOW_UPDATE frames for {self._server_data_frames} "
                              "DATA frames")
        if sid == 0:
            self._c.kind = _CLIENT_WINDOW_UPDATE
        return None

    def _check_rst_stream(self, length: int, flags: int, sid: int) -> Violation | None:
        """A reset of a stream the app has not answered spends the rapid-reset budget."""
        if length != 4:
            return self._fail("frame_size", FRAME_SIZE_ERROR, f"RST_STREAM of {length} bytes")
        if sid == 0 or (sid & 1 and sid > self.last_client_stream):
            return self._fail("stream_id", PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        state = self.streams.pop(sid, None)
        if state is not None and not state & _ANSWERED:
            return self._reset_unanswered()
        return None

    def _check_settings(self, length: int, flags: int, sid: int) -> Violation | None:
        """An ACK puts our announced MAX_CONCURRENT_STREAMS in force; entries are parsed from the payload."""
        if sid != 0:
            return self._fail("stream_id", PROTOCOL_ERROR, f"SETTINGS on stream {sid}")
        if flags & FLAG_ACK:
            if length:
                return self._fail("frame_size", FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            if self._pending_server_settings:
                self.max_streams = self._pending_server_settings.pop(0)
            return None
        if length % 6:
            return self._fail("frame_size", FRAME_SIZE_ERROR, f"SETTINGS of {length} bytes")
        self._c.kind = _CLIENT_SETTINGS
        return self._control_frame("settings_flood")

    def _check_ping(self, length: int, flags: int, sid: int) -> Violation | None:
        """Bounded like SETTINGS: control frames the app must answer."""
        if length != 8:
            return self._fail("frame_size", FRAME_SIZE_ERROR, f"PING of {length} bytes")
        if sid != 0:
            return self._fail("stream_id", PROTOCOL_ERROR, f"PING on stream {sid}")
        if flags & FLAG_ACK:
            return None
        return self._control_frame("ping_flood")

    def _check_priority(self, length: int, flags: int, sid: int) -> Violation | None:
        """Bounded per stream opened (the app does work for each)."""
        if length != 5:
            return self._fail("frame_size", FRAME_SIZE_ERROR, f"PRIORITY of {length} bytes")
        if sid == 0:
            return self._fail("stream_id", PROTOCOL_ERROR, "PRIORITY on stream 0")
        self._priority_frames += 1
        if self._priority_frames > 10 + self.limits.h2_max_priority_frames_per_stream * (1 + self.streams_opened):
            return self._fail("priority_flood", ENHANCE_YOUR_CALM,
                              f"{self._priority_frames} PRIORITY frames for {self.streams_opened} streams")
        return None

    def _check_goaway(self, length: int, flags: int, sid: int) -> Violation | None:
        """Only its shape is checked; the app acts on it."""
        if sid != 0:
            return self._fail("stream_id", PROTOCOL_ERROR, f"GOAWAY on stream {sid}")
        if length < 8:
            return self._fail("frame_size", FRAME_SIZE_ERROR, f"GOAWAY of {length} bytes")
        return None

    def _check_push_promise(self, length: int, flags: int, sid: int) -> Violation | None:
        """Never from a client (RFC 9113 8.4)."""
        return self._fail("stream_id", PROTOCOL_ERROR, "PUSH_PROMISE from a client")

    def _client_payload(self, data: memoryview, i: int, n: int) -> tuple[int, Violation | None]:
        """Parse the SETTINGS entries / WINDOW_UPDATE increment of the current client frame."""
        d = self._c
        unit = 6 if d.kind == _CLIENT_SETTINGS else 4
        while d.remaining and i < n:
            if not d.pbuf and n - i >= unit:
                value = data[i:i + unit]
                i += unit
                d.remaining -= unit
            else:
                take = min(unit - len(d.pbuf), n - i)
                d.pbuf += data[i:i + take]
                i += take
                d.remaining -= take
                if len(d.pbuf) < unit:
                    return i, None
                value = memoryview(bytes(d.pbuf))
                d.pbuf.clear()
            v = self._client_setting(value) if unit == 6 else self._client_window_update(value)
            if v is not None:
                return i, v
        if not d.remaining:
            d.kind = _SKIP
        return i, None

    def _client_setting(self, entry: memoryview) -> Violation | None:
        key, value = _SETTING.unpack(entry)
        if key == SETTINGS_ENABLE_PUSH and value > 1:
            return self._fail("settings", PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH {value}")
        if key == SETTINGS_INITIAL_WINDOW_SIZE and value > MAX_WINDOW:
            return self._fail("settings", FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value}")
        if key == SETTINGS_MAX_FRAME_SIZE and not DEFAULT_MAX_FRAME_SIZE <= value <= 2**24 - 1:
            return self._fail("settings", PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value}")
        return None

    def _client_window_update(self, raw: memoryview) -> Violation | None:
        increment = _U32.unpack(raw)[0] & MAX_WINDOW
        if increment == 0:
            return self._fail("window_update", PROTOCOL_ERROR, "connection WINDOW_UPDATE of 0")
        self.client_window += increment
        if self.client_window > MAX_WINDOW:
            return self._fail("window_overflow", FLOW_CONTROL_ERROR, "connection window over 2^31-1")
        return None

    def _control_frame(self, reason: str) -> Violation | None:
        self._unanswered_control += 1
        if self._unanswered_control > self.limits.h2_max_outbound_control_frames:
            return self._fail(reason, ENHANCE_YOUR_CALM,
                              f"{self._unanswered_control} PING/SETTINGS frames the app has not answered yet")
        return None

    def _empty_frame(self) -> Violation | None:
        self._empty += 1
        if self._empty > self.limits.h2_max_empty_frames:
            return self._fail("empty_frames", ENHANCE_YOUR_CALM, f"{self._empty} consecutive empty frames")
        return None

    def _reset_unanswered(self) -> Violation | None:
        now = self._clock()
        burst = float(self.limits.h2_reset_burst)
        if self._reset_time is not None:
            self._reset_tokens = min(burst, self._reset_tokens + (now - self._reset_time) * self.limits.h2_reset_rate)
        self._reset_time = now
        if self._reset_tokens < 1.0:
            return self._fail("rapid_reset", ENHANCE_YOUR_CALM, "streams reset before an answer over the budget")
        self._reset_tokens -= 1.0
        return None

    def _app_reset(self, sid: int) -> None:
        self._app_resets.add(sid)
        self._app_reset_order.append(sid)
        if len(self._app_reset_order) > APP_RESETS_KEPT:
            self._app_resets.discard(self._app_reset_order.popleft())

    def _end(self, sid: int, bit: int) -> None:
        state = self.streams.get(sid)
        if state is None:
            return
        state |= bit
        if state & _CLIENT_ENDED and state & _SERVER_ENDED:
            del self.streams[sid]
        else:
            self.streams[sid] = state

    def _fail(self, reason: str, code: int, detail: str) -> Violation:
        v = Violation(reason, code, detail)
        self.failed = v
        return v

    # -- app -> client -------------------------------------------------------------------------
    def feed_server(self, data: memoryview) -> tuple[int, bytes] | None:
        """Track the app's frames; returns an insertion into this chunk (see the class doc) or None."""
        d = self._s
        n = len(data)
        i = 0
        insert: tuple[int, bytes] | None = None
        while i < n:
            if d.remaining:
                if d.kind == _SKIP:
                    i = d.skip(i, n)
                    continue
                i = self._server_settings(data, i, n)
                if not d.remaining and self._insert_at_end:
                    insert = (i, self._end_server_settings())
                continue
            if not d.hbuf and n - i >= 9:
                j = self._server_run(data, i, n)
                if j != i:
                    i = j
                    continue
            if d.hbuf or n - i < 9:
                i, header = d.split_header(data, i, n)
                if header is None:
                    return insert
                lt, flags, sid = header
                header_at = -1  # not in this chunk: cannot be patched
            else:
                lt, flags, sid = _HDR.unpack_from(data, i)
                header_at = i
                i += 9
            length = lt >> 8
            ftype = lt & 0xFF
            sid &= MAX_WINDOW
            if ftype <= HEADERS:
                # DATA or HEADERS whose header was split across reads (whole ones went through _server_run):
                # the header alone through _server_run, which leaves its payload to pass over
                self._server_run(memoryview(_HDR.pack(lt, flags, sid)), 0, 9)
                continue
            d.remaining = length
            d.kind = _SKIP
            if ftype == RST_STREAM:
                if self.streams.pop(sid, None) is not None:
                    self._app_reset(sid)
            elif ftype == PING:
                if flags & FLAG_ACK and self._unanswered_control:
                    self._unanswered_control -= 1
            elif ftype == SETTINGS:
                if flags & FLAG_ACK:
                    if self._unanswered_control:
                        self._unanswered_control -= 1
                else:
                    self._frame_max_streams = -1
                    d.kind = _SERVER_SETTINGS
                    if not self._server_settings_seen:
                        self._server_settings_seen = True
                        if header_at >= 0 and length % 6 == 0 and length + 6 <= DEFAULT_MAX_FRAME_SIZE:
                            # tell the client our bound: one more entry at the end of the app's first SETTINGS
                            data[header_at:header_at + 3] = (length + 6).to_bytes(3, "big")
                            self._insert_at_end = True
                    if length == 0:
                        if self._insert_at_end:
                            insert = (i, self._end_server_settings())
                        else:
                            self._end_server_settings()
        return insert

    def _server_run(self, data: memoryview, i: int, n: int) -> int:
        """Pass over the app's HEADERS and DATA frames from offset ``i`` (at a frame header), their counts kept
        in locals: the usual chunk is whole responses. Returns the offset of the first other frame, or of
        the chunk's end."""
        unpack = _HDR.unpack_from
        streams = self.streams
        data_frames = 0
        data_bytes = 0
        while n - i >= 9:
            lt, flags, sid = unpack(data, i)
            ftype = lt & 0xFF
            if ftype > HEADERS:
                break
            length = lt >> 8
            if ftype == DATA:
                data_frames += 1
                data_bytes += length
                if flags & FLAG_END_STREAM:
                    self._end(sid & MAX_WINDOW, _SERVER_ENDED)
            else:
                sid &= MAX_WINDOW
                state = streams.get(sid)
                if state is not None:  # answered; _end inline when it also ends the stream
                    if not flags & FLAG_END_STREAM:
                        streams[sid] = state | _ANSWERED
                    elif state & _CLIENT_ENDED:
                        del streams[sid]
                    else:
                        streams[sid] = state | _ANSWERED | _SERVER_ENDED
            i += 9 + length
            if i > n:  # its payload goes on in the next chunk, passed over unread
                self._s.remaining = i - n
                self._s.kind = _SKIP
                i = n
        self._server_data_frames += data_frames
        self.client_window -= data_bytes
        return i

    def _server_settings(self, data: memoryview, i: int, n: int) -> int:
        d = self._s
        while d.remaining and i < n:
            if d.remaining < 6 and not d.pbuf:  # a malformed tail: skipped (the client refuses the frame)
                skip = min(d.remaining, n - i)
                d.remaining -= skip
                i += skip
                break
            if not d.pbuf and n - i >= 6:
                key, value = _SETTING.unpack_from(data, i)
                if key == SETTINGS_MAX_CONCURRENT_STREAMS and value > self._our_max_streams:
                    value = self._our_max_streams
                    data[i + 2:i + 6] = _U32.pack(value)  # rewritten in place: the client is told our bound
                i += 6
                d.remaining -= 6
            else:
                take = min(6 - len(d.pbuf), n - i)
                d.pbuf += data[i:i + take]
                i += take
                d.remaining -= take
                if len(d.pbuf) < 6:
                    return i
                key, value = _SETTING.unpack(d.pbuf)
                d.pbuf.clear()
            if key == SETTINGS_MAX_CONCURRENT_STREAMS:
                self._frame_max_streams = min(value, self._our_max_streams)
            elif key == SETTINGS_MAX_FRAME_SIZE and DEFAULT_MAX_FRAME_SIZE <= value <= 2**24 - 1:
                self.client_max_frame = value
        if not d.remaining and not self._insert_at_end:
            self._end_server_settings()
        return i

    def _end_server_settings(self) -> bytes:
        """The app's SETTINGS frame ended: queue what the client's ACK makes binding; our entry if appended."""
        value = self._frame_max_streams
        if value < 0:  # not in this frame: the value in force after the frames before it
            value = self._pending_server_settings[-1] if self._pending_server_settings else self.max_streams
        entry = b""
        if self._insert_at_end:
            self._insert_at_end = False
            entry = _SETTING.pack(SETTINGS_MAX_CONCURRENT_STREAMS, value)
        if len(self._pending_server_settings) >= _MAX_PENDING_SETTINGS:
            self.max_streams = self._pending_server_settings.pop(0)
        self._pending_server_settings.append(value)
        return entry


__all__ = ["PREFACE", "H2Guard", "Violation", "goaway"]


# the check of each client frame type other than DATA (checked inline: most frames are DATA)
_CLIENT_CHECKS: dict[int, Callable[[H2Guard, int, int, int], Violation | None]] = {
    HEADERS: H2Guard._check_headers,
    CONTINUATION: H2Guard._check_continuation,
    WINDOW_UPDATE: H2Guard._check_window_update,
    RST_STREAM: H2Guard._check_rst_stream,
    SETTINGS: H2Guard._check_settings,
    PING: H2Guard._check_ping,
    PRIORITY: H2Guard._check_priority,
    GOAWAY: H2Guard._check_goaway,
    PUSH_PROMISE: H2Guard._check_push_promise,
}
