"""The outbound gRPC listener as a frame-level HTTP/2 proxy (``--grpc-engine h2``, the default).

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
  as is; blocks an app sent before acknowledging (its first call or two) are decoded with a full
  HPACK decoder and re-encoded without the dynamic table;
- the method (``:path``) and the final ``grpc-status`` are read for metrics by a small scanner over
  the block (Huffman-coded strings are decoded once and cached), not by decoding every header.

Flow control is per connection and per stream on both legs: data the peer has no window for is
queued, and window updates to a sender are only given for data already passed on (back-pressure).
PINGs and SETTINGS are answered locally. A stream whose upstream connection fails before anything
was sent is retried once on another endpoint; later failures end it with UNAVAILABLE (or the
upstream's RST_STREAM), as a direct client would see.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import time
from typing import Any

import structlog
from hpack import Decoder, Encoder
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman
from hpack.struct import NeverIndexedHeaderTuple

from sidecar.tap import HeaderBlock

log = structlog.get_logger("weft.sidecar.h2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
F_END_STREAM = 0x1
F_ACK = 0x1
F_END_HEADERS = 0x4
F_PADDED = 0x8
F_PRIORITY = 0x20
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT, S_INITIAL_WINDOW, S_MAX_FRAME = 1, 2, 3, 4, 5
E_NO_ERROR, E_PROTOCOL, E_INTERNAL, E_FLOW, E_REFUSED, E_CANCEL = 0, 1, 2, 3, 7, 8

_FH = struct.Struct(">BHBBI")
_SETTING = struct.Struct(">HI")
_U32 = struct.Struct(">I")

STREAM_WINDOW = 4 * 1024 * 1024
CONN_WINDOW = 16 * 1024 * 1024
MAX_FRAME = 16384

STATUS_NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
                "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
                "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")
UNAVAILABLE = 14
RESOURCE_EXHAUSTED = 8


def frame(typ: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FH.pack(n >> 16, n & 0xFFFF, typ, flags, sid) + payload


def settings_frame(pairs: list[tuple[int, int]]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in pairs))


# -- HPACK scanning ---------------------------------------------------------------------------------

_huff = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
_strings: dict[bytes, bytes] = {}


def _int(block: bytes, i: int, prefix: int) -> tuple[int, int]:
    mask = (1 << prefix) - 1
    v = block[i] & mask
    i += 1
    if v < mask:
        return v, i
    shift = 0
    while True:
        b = block[i]
        i += 1
        v += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, i


def _string(block: bytes, i: int) -> tuple[bytes, int]:
    huff = block[i] & 0x80
    n, i = _int(block, i, 7)
    raw = block[i:i + n]
    i += n
    if not huff:
        return raw, i
    s = _strings.get(raw)
    if s is None:
        s = decode_huffman(raw)
        if len(_strings) > 4096:
            _strings.clear()
        _strings[raw] = s
    return s, i


_STATIC_NAMES = {1: b":authority", 2: b":method", 3: b":method", 4: b":path", 5: b":path", 6: b":scheme",
                 7: b":scheme", 8: b":status", 9: b":status", 10: b":status", 11: b":status", 12: b":status",
                 13: b":status", 14: b":status", 31: b"content-type"}


def scan(block: bytes, want: bytes) -> bytes | None:
    """The value of header ``want`` in a context-free header block, or None (no dynamic-table lookups)."""
    i, n = 0, len(block)
    while i < n:
        b = block[i]
        if b & 0x80:  # indexed field: static entries only carry names we do not look for, except :path
            idx, i = _int(block, i, 7)
            if want == b":path" and idx in (4, 5):
                return b"/" if idx == 4 else b"/index.html"
            continue
        if b & 0xE0 == 0x20:  # dynamic table size update
            _, i = _int(block, i, 5)
            continue
        prefix = 6 if b & 0xC0 == 0x40 else 4
        idx, i = _int(block, i, prefix)
        if idx:
            name = _STATIC_NAMES.get(idx, b"")
        else:
            name, i = _string(block, i)
        value, i = _string(block, i)
        if name == want:
            return value
    return None


def context_free(block: bytes) -> bool:
    """True when a block references no dynamic-table entry (only static indices below 62)."""
    i, n = 0, len(block)
    while i < n:
        b = block[i]
        if b & 0x80:
            idx, i = _int(block, i, 7)
            if idx > 61:
                return False
            continue
        if b & 0xE0 == 0x20:
            _, i = _int(block, i, 5)
            continue
        prefix = 6 if b & 0xC0 == 0x40 else 4
        idx, i = _int(block, i, prefix)
        if idx > 61:
            return False
        if not idx:
            _, i = _string(block, i)
        _, i = _string(block, i)
    return True


def encode_plain(headers: list[tuple[bytes, bytes]]) -> bytes:
    """A context-free block (never-indexed literals): safe on any connection."""
    enc = Encoder()
    return bytes(enc.encode([NeverIndexedHeaderTuple(k, v) for k, v in headers], huffman=False))


def trailers_only(code: int, message: str, *, with_status: bool) -> bytes:
    headers: list[tuple[bytes, bytes]] = []
    if with_status:
        headers += [(b":status", b"200"), (b"content-type", b"application/grpc")]
    headers += [(b"grpc-status", str(code).encode()), (b"grpc-message", _percent(message))]
    return encode_plain(headers)


def _percent(text: str) -> bytes:
    out = bytearray()
    for ch in text.encode():
        if 0x20 <= ch <= 0x7E and ch != 0x25:
            out.append(ch)
        else:
            out += b"%%%02X" % ch
    return bytes(out)


def headers_of(block: bytes) -> list[tuple[bytes, bytes]]:
    """Every header of a context-free block (static table and literals; no dynamic-table lookups)."""
    from hpack.table import HeaderTable

    static = HeaderTable.STATIC_TABLE
    out: list[tuple[bytes, bytes]] = []
    i, n = 0, len(block)
    while i < n:
        b = block[i]
        if b & 0x80:
            idx, i = _int(block, i, 7)
            if not 0 < idx <= len(static):
                raise ValueError(f"header block references dynamic entry {idx}")
            out.append(static[idx - 1])
            continue
        if b & 0xE0 == 0x20:
            _, i = _int(block, i, 5)
            continue
        prefix = 6 if b & 0xC0 == 0x40 else 4
        idx, i = _int(block, i, prefix)
        if idx:
            if idx > len(static):
                raise ValueError(f"header block references dynamic entry {idx}")
            name = static[idx - 1][0]
        else:
            name, i = _string(block, i)
        value, i = _string(block, i)
        out.append((name, value))
    return out


_status_cache: dict[bytes, int] = {}


def status_of(block: bytes) -> int | None:
    code = _status_cache.get(block)
    if code is not None:
        return code
    value = scan(block, b"grpc-status")
    if value is None:
        return None
    try:
        code = int(value)
    except ValueError:
        return None
    if len(_status_cache) > 1024:
        _status_cache.clear()
    _status_cache[block] = code
    return code


# -- streams and connections ----------------------------------------------------------------------

class Stream:
    __slots__ = (
        "app",
        "app_done",
        "app_sid",
        "data_sent",
        "endpoint",
        "headers_sent_app",
        "method",
        "msg_app",
        "msg_up",
        "pending_frames",
        "q_app",
        "q_up",
        "recorded",
        "recv_app",
        "recv_up",
        "request_block",
        "source",
        "start",
        "status",
        "tap",
        "tries",
        "up",
        "up_done",
        "up_sid",
        "win_app",
        "win_up",
    )

    def __init__(self, app: AppConn, app_sid: int, method: str) -> None:
        self.app = app
        self.app_sid = app_sid
        self.up: UpConn | None = None
        self.up_sid = 0
        self.win_up = 0  # what we may still send to the upstream on this stream
        self.win_app = app.peer_initial_window
        self.q_up: list[tuple[bytes, bool]] = []
        self.q_app: list[tuple[bytes, bool]] = []
        self.method = method
        self.start = time.perf_counter()
        self.endpoint = ""
        self.app_done = False  # the app ended its side
        self.up_done = False  # the upstream ended its side
        self.headers_sent_app = False
        self.status: int | None = None
        self.request_block = b""
        self.tries = 0
        self.recv_up = 0
        self.recv_app = 0
        self.recorded = False
        self.pending_frames: list[tuple[int, int, bytes]] = []  # kinds of what q_app holds, in order
        self.data_sent = False  # request DATA went out: the stream can no longer move elsewhere
        self.msg_up = _Messages()  # gRPC message framing, app -> upstream (for the size limit)
        self.msg_app = _Messages()  # upstream -> app
        self.source = ""  # the caller's service (inbound full path)
        self.tap: Any = None  # a sidecar.tap.CallRecord while a tap that may match this call is open


class _Messages:
    """Follows gRPC's length-prefixed messages across DATA frames; reports one over the limit."""

    __slots__ = ("head", "rest")

    def __init__(self) -> None:
        self.rest = 0  # bytes of the current message still to come
        self.head = b""  # a prefix split across frames

    def too_large(self, data: bytes, limit: int) -> int:
        """The length of the first message in ``data`` above ``limit``, else 0."""
        i, n = 0, len(data)
        while i < n:
            if self.rest:
                take = min(self.rest, n - i)
                self.rest -= take
                i += take
                continue
            need = 5 - len(self.head)
            self.head += data[i:i + need]
            i += need
            if len(self.head) == 5:
                length = int.from_bytes(self.head[1:5], "big")
                self.head = b""
                if length > limit:
                    return length
                self.rest = length
        return 0


class _Conn(asyncio.Protocol):
    def __init__(self, proxy: H2Outbound) -> None:
        self.proxy = proxy
        self.transport: Any = None
        self.buf = bytearray()
        self.wq: list[bytes] = []
        self.peer_initial_window = 65535
        self.peer_max_frame = MAX_FRAME
        self.send_window = 65535
        self.recv_unacked = 0
        self.closed = False
        self._hdr: tuple[int, int, bytearray] | None = None  # (sid, flags, fragments) awaiting CONTINUATION
        self._preface_needed = 0

    def send(self, data: bytes) -> None:
        if not self.wq:
            self.proxy.dirty.append(self)
        self.wq.append(data)

    def flush(self) -> None:
        if self.wq and self.transport is not None and not self.closed:
            self.transport.write(b"".join(self.wq) if len(self.wq) > 1 else self.wq[0])
        self.wq.clear()

    def data_received(self, data: bytes) -> None:
        # parse straight from what arrived; only a partial frame is kept over (in a small buffer, so
        # that an idle connection does not hold on to the capacity of its largest read)
        buf: bytes | bytearray
        if self.buf:
            self.buf += data
            buf = self.buf
        else:
            buf = data
        i = self._preface_needed
        if i:
            if len(buf) < i:
                if buf is data:
                    self.buf = bytearray(data)
                return
            if bytes(buf[:i]) != PREFACE:
                self.transport.abort()
                return
            self._preface_needed = 0
        n = len(buf)
        try:
            while n - i >= 9:
                hi, lo, typ, flags, sid = _FH.unpack_from(buf, i)
                length = (hi << 16) | lo
                end = i + 9 + length
                if end > n:
                    break
                payload = bytes(buf[i + 9:end])
                i = end
                self._frame(typ, flags, sid & 0x7FFFFFFF, payload)
        except Exception:  # a malformed peer ends its own connection only
            log.exception("h2_frame_failed", side=type(self).__name__)
            if self.transport is not None:
                self.transport.abort()
        self.buf = bytearray(buf[i:]) if i < len(buf) else bytearray()
        self.proxy.flush()

    def _frame(self, typ: int, flags: int, sid: int, payload: bytes) -> None:
        if self._hdr is not None:
            hsid, hflags, frags = self._hdr
            if typ != CONTINUATION or sid != hsid:
                raise ValueError("expected CONTINUATION")
            frags += payload
            if flags & F_END_HEADERS:
                self._hdr = None
                self.on_headers(hsid, hflags, bytes(frags))
            return
        if typ == DATA:
            if flags & F_PADDED:
                pad = payload[0]
                payload = payload[1:len(payload) - pad]
            self.on_data(sid, flags & F_END_STREAM, payload)
        elif typ == HEADERS:
            block = payload
            if flags & F_PADDED:
                pad = block[0]
                block = block[1:len(block) - pad]
            if flags & F_PRIORITY:
                block = block[5:]
            if flags & F_END_HEADERS:
                self.on_headers(sid, flags, block)
            else:
                self._hdr = (sid, flags, bytearray(block))
        elif typ == SETTINGS:
            if flags & F_ACK:
                self.on_settings_ack()
                return
            for off in range(0, len(payload) - 5, 6):
                key, value = _SETTING.unpack_from(payload, off)
                self.on_setting(key, value)
            self.send(frame(SETTINGS, F_ACK, 0))
        elif typ == WINDOW_UPDATE:
            inc = _U32.unpack_from(payload)[0] & 0x7FFFFFFF
            self.on_window(sid, inc)
        elif typ == PING:
            if not flags & F_ACK:
                self.send(frame(PING, F_ACK, 0, payload))
        elif typ == RST_STREAM:
            self.on_rst(sid, _U32.unpack_from(payload)[0])
        elif typ == GOAWAY:
            self.on_goaway(_U32.unpack_from(payload)[0] & 0x7FFFFFFF)
        # PRIORITY, PUSH_PROMISE (push is disabled), unknown types: ignored

    def on_setting(self, key: int, value: int) -> None:
        if key == S_INITIAL_WINDOW:
            delta = value - self.peer_initial_window
            self.peer_initial_window = value
            self.adjust_stream_windows(delta)
        elif key == S_MAX_FRAME:
            self.peer_max_frame = value

    def adjust_stream_windows(self, delta: int) -> None:
        pass

    def on_settings_ack(self) -> None:
        pass

    def consumed(self, n: int) -> None:
        """``n`` bytes of DATA received here were passed on: give the sender its window back."""
        self.recv_unacked += n
        if self.recv_unacked >= CONN_WINDOW // 4:
            self.send(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.recv_unacked)))
            self.recv_unacked = 0

    def send_data(self, sid: int, data: bytes, end: bool, window: int) -> int:
        """Send as much of ``data`` as the windows allow; returns bytes sent (all, or less)."""
        allowed = min(window, self.send_window, len(data))
        sent = 0
        mf = self.peer_max_frame
        while sent < allowed:
            chunk = data[sent:sent + min(mf, allowed - sent)]
            sent += len(chunk)
            last = sent == len(data)
            self.send(frame(DATA, F_END_STREAM if (end and last) else 0, sid, chunk))
        if not data and end:
            self.send(frame(DATA, F_END_STREAM, sid))
        self.send_window -= sent
        return sent

    def headers_frames(self, sid: int, block: bytes, end_stream: bool) -> None:
        mf = self.peer_max_frame
        if len(block) <= mf:
            self.send(frame(HEADERS, F_END_HEADERS | (F_END_STREAM if end_stream else 0), sid, block))
            return
        self.send(frame(HEADERS, F_END_STREAM if end_stream else 0, sid, block[:mf]))
        rest = block[mf:]
        while rest:
            part, rest = rest[:mf], rest[mf:]
            self.send(frame(CONTINUATION, 0 if rest else F_END_HEADERS, sid, part))

    # overridden
    def on_headers(self, sid: int, flags: int, block: bytes) -> None: ...
    def on_data(self, sid: int, end: int, data: bytes) -> None: ...
    def on_window(self, sid: int, inc: int) -> None: ...
    def on_rst(self, sid: int, code: int) -> None: ...
    def on_goaway(self, last_sid: int) -> None: ...


class AppConn(_Conn):
    """The app's plaintext HTTP/2 connection to the outbound listener."""

    def __init__(self, proxy: H2Outbound) -> None:
        super().__init__(proxy)
        self.streams: dict[int, Stream] = {}
        self.decoder = Decoder()
        self.acked = False  # the app acknowledged our HEADER_TABLE_SIZE=0
        self._preface_needed = len(PREFACE)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.send(settings_frame([(S_HEADER_TABLE_SIZE, 0), (S_MAX_CONCURRENT, 1 << 20),
                                  (S_INITIAL_WINDOW, STREAM_WINDOW), (S_ENABLE_PUSH, 0)]))
        self.send(frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONN_WINDOW - 65535)))
        self.proxy.apps.add(self)
        self.proxy.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy.apps.discard(self)
        for st in list(self.streams.values()):
            if st.up is not None and st.up_sid and not st.up.closed:
                st.up.send(frame(RST_STREAM, 0, st.up_sid, _U32.pack(E_CANCEL)))
                st.up.streams.pop(st.up_sid, None)
            self.proxy.finish(st, 1)  # CANCELLED
        self.streams.clear()
        self.proxy.flush()

    def on_settings_ack(self) -> None:
        self.acked = True

    def adjust_stream_windows(self, delta: int) -> None:
        for st in self.streams.values():
            st.win_app += delta
        if delta > 0:
            self.on_window(0, 0)

    def on_headers(self, sid: int, flags: int, block: bytes) -> None:
        st = self.streams.get(sid)
        if st is not None:  # trailers from the client (rare in gRPC): pass on
            self.proxy.client_trailers(st, block, bool(flags & F_END_STREAM))
            return
        if self.acked and context_free(block):
            # once the peer acknowledged HEADER_TABLE_SIZE=0 its encoder can no longer refer to the
            # dynamic table: a block without such references is forwarded as it is
            raw = block
        else:
            headers = self.decoder.decode(block, raw=True)
            raw = encode_plain([(bytes(k), bytes(v)) for k, v in headers])
        path = scan(raw, b":path")
        st = Stream(self, sid, path.decode("latin-1") if path else "")
        st.request_block = raw
        st.app_done = bool(flags & F_END_STREAM)
        self.streams[sid] = st
        self.proxy.open_stream(st)

    def on_data(self, sid: int, end: int, data: bytes) -> None:
        st = self.streams.get(sid)
        if st is None:
            self.consumed(len(data))
            return
        if end:
            st.app_done = True
        self.proxy.to_upstream(st, data, bool(end))

    def on_window(self, sid: int, inc: int) -> None:
        if sid == 0:
            self.send_window += inc
            for st in list(self.streams.values()):
                if st.q_app:
                    self.proxy.flush_to_app(st)
        else:
            one = self.streams.get(sid)
            if one is not None:
                one.win_app += inc
                if one.q_app:
                    self.proxy.flush_to_app(one)

    def on_rst(self, sid: int, code: int) -> None:
        st = self.streams.pop(sid, None)
        if st is None:
            return
        if st.up is not None and st.up_sid:
            st.up.send(frame(RST_STREAM, 0, st.up_sid, _U32.pack(code)))
            st.up.streams.pop(st.up_sid, None)
        self.proxy.finish(st, 1)

    def on_goaway(self, last_sid: int) -> None:
        pass


class UpConn(_Conn):
    """One mTLS HTTP/2 connection to an endpoint of the upstream."""

    def __init__(self, proxy: H2Outbound, key: str, generation: str) -> None:
        super().__init__(proxy)
        self.key = key
        self.generation = generation
        self.streams: dict[int, Stream] = {}
        self.next_sid = 1
        self.ready = False
        self.goaway = False
        self.waiting: list[Stream] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        # the client preface first: nothing else may precede it (a SETTINGS ack included)
        transport.write(PREFACE + settings_frame([(S_HEADER_TABLE_SIZE, 0), (S_ENABLE_PUSH, 0),  # type: ignore[attr-defined]
                                                  (S_INITIAL_WINDOW, STREAM_WINDOW)])
                        + frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONN_WINDOW - 65535)))

    def start(self) -> None:
        self.ready = True
        waiting, self.waiting = self.waiting, []
        for st in waiting:
            if not st.app.closed:
                self.proxy.send_request(st, self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy.up_lost(self)

    def adjust_stream_windows(self, delta: int) -> None:
        for st in self.streams.values():
            st.win_up += delta
        if delta > 0:
            self.on_window(0, 0)

    def open(self, st: Stream) -> int:
        sid = self.next_sid
        self.next_sid += 2
        self.streams[sid] = st
        st.win_up = self.peer_initial_window
        return sid

    def on_headers(self, sid: int, flags: int, block: bytes) -> None:
        st = self.streams.get(sid)
        if st is None:
            return
        end = bool(flags & F_END_STREAM)
        if end:
            st.status = status_of(block)
        self.proxy.to_app_headers(st, block, end)

    def on_data(self, sid: int, end: int, data: bytes) -> None:
        st = self.streams.get(sid)
        if st is None:
            self.consumed(len(data))
            return
        self.proxy.to_app(st, data, bool(end))

    def on_window(self, sid: int, inc: int) -> None:
        if sid == 0:
            self.send_window += inc
            for st in list(self.streams.values()):
                if st.q_up:
                    self.proxy.flush_to_up(st)
        else:
            one = self.streams.get(sid)
            if one is not None:
                one.win_up += inc
                if one.q_up:
                    self.proxy.flush_to_up(one)

    def on_rst(self, sid: int, code: int) -> None:
        st = self.streams.pop(sid, None)
        if st is None:
            return
        if code == E_REFUSED and st.tries < 2 and not st.headers_sent_app and not st.data_sent:
            self.proxy.release(st, ok=True)
            st.up = None
            st.up_sid = 0
            self.proxy.open_stream(st, exclude=self.key)
            return
        if not st.app.closed:
            st.app.send(frame(RST_STREAM, 0, st.app_sid, _U32.pack(code)))
            st.app.streams.pop(st.app_sid, None)
        self.proxy.finish(st, 1 if code == E_CANCEL else 14)

    def on_goaway(self, last_sid: int) -> None:
        self.goaway = True
        self.proxy.forget(self)
        for sid in [s for s in self.streams if s > last_sid]:
            st = self.streams.pop(sid)
            if st.data_sent or st.headers_sent_app or st.app.closed:
                if not st.app.closed:  # never processed upstream: the client may retry it transparently
                    st.app.send(frame(RST_STREAM, 0, st.app_sid, _U32.pack(E_REFUSED)))
                    st.app.streams.pop(st.app_sid, None)
                self.proxy.finish(st, UNAVAILABLE)
                continue
            self.proxy.release(st, ok=True)
            st.up = None
            st.up_sid = 0
            self.proxy.open_stream(st, exclude=self.key)


class H2Outbound:
    """The outbound gRPC listener of one upstream, frame by frame (see the module docstring)."""

    def __init__(self, outbound: Any, pool: Any) -> None:
        self._out = outbound  # sidecar.outbound.Outbound
        self.pool = pool  # sidecar.outbound.EndpointPool
        self._server: asyncio.AbstractServer | None = None
        self.apps: set[AppConn] = set()
        self.ups: dict[str, UpConn] = {}
        self.all_ups: set[UpConn] = set()
        self.dirty: list[_Conn] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.max_message = int(getattr(outbound, "max_message_bytes", 4 * 1024 * 1024))
        self.name = pool.name if pool is not None else "the local app"

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: AppConn(self), host, port, reuse_address=True, backlog=1024)

    def flush(self) -> None:
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            conn.flush()

    # -- streams -----------------------------------------------------------------------------------
    def open_stream(self, st: Stream, exclude: str = "") -> None:
        out = self._out
        if st.tries == 0 and out.telemetry.tap.active:
            self._tap_start(st, "outbound", out.snapshot().registration.service, self.name)
        if out.draining:
            self.fail(st, UNAVAILABLE, "weft: the sidecar is shutting down")
            return
        st.tries += 1
        key = self.pool.pick(exclude=exclude)
        if key is None or (exclude and key == exclude):
            if key is not None:
                self.pool.release(key)
            self.fail(st, UNAVAILABLE, f"weft: no healthy endpoint of upstream {self.pool.name}")
            return
        st.endpoint = key
        up = self._up(key)
        if up.ready:
            self.send_request(st, up)
        else:
            up.waiting.append(st)

    def _tap_start(self, st: Stream, direction: str, source: str, destination: str) -> None:
        """Only while a tap is open: a record for this call, with its request headers."""
        rec = self._out.telemetry.tap.start(direction, source, destination, st.method)
        if rec is not None:
            rec.request_headers = HeaderBlock(headers_of, st.request_block)  # decoded by the tap's reader
            st.tap = rec

    def _up(self, key: str) -> UpConn:
        snap = self._out.snapshot()
        gen = snap.credentials.generation
        up = self.ups.get(key)
        if up is not None and (up.closed or up.goaway or up.generation != gen):
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

    def forget(self, up: UpConn) -> None:
        if self.ups.get(up.key) is up:
            del self.ups[up.key]
        if not up.streams and not up.waiting and up.transport is not None and not up.closed:
            up.transport.close()

    async def _connect(self, up: UpConn, snap: Any) -> None:
        from sidecar.tls import PeerIdentityError, check_server_identity, expected_server_name, tls_error_reason

        ep = self.pool.endpoints.get(up.key)
        creds = snap.credentials
        loop = asyncio.get_running_loop()
        try:
            if ep is None:
                raise ConnectionRefusedError(f"endpoint {up.key} left the upstream")
            ctx = self._out.tls.client(creds, "grpc")
            transport, _ = await asyncio.wait_for(loop.create_connection(
                lambda: up, ep.address, ep.port, ssl=ctx,
                server_hostname=expected_server_name(self.pool.name, creds.trust_domain),
                ssl_handshake_timeout=10), 15)
            sslobj = transport.get_extra_info("ssl_object")
            check_server_identity(sslobj.getpeercert(binary_form=True) if sslobj else None, self.pool.name,
                                  creds.trust_domain)
            if sslobj is not None and sslobj.selected_alpn_protocol() != "h2":
                raise ssl.SSLError(f"the upstream did not agree to ALPN h2 ({sslobj.selected_alpn_protocol()})")
        except (OSError, TimeoutError, ssl.SSLError, PeerIdentityError) as exc:
            if isinstance(exc, (ssl.SSLError, PeerIdentityError)):
                self._out.telemetry.tls_errors.labels("outbound", tls_error_reason(exc)).inc()
            log.warning("upstream_connect_failed", upstream=self.pool.name, endpoint=up.key, error=str(exc)[:200])
            up.closed = True
            if up.transport is not None:
                up.transport.abort()
            self.up_lost(up)
            self.flush()
            return
        up.start()
        self.flush()

    def up_lost(self, up: UpConn) -> None:
        self.all_ups.discard(up)
        if self.ups.get(up.key) is up:
            del self.ups[up.key]
        waiting, up.waiting = up.waiting, []
        for st in waiting:  # nothing was sent: another endpoint may take it
            self.release(st, ok=False)
            if not st.app.closed:
                if st.tries < 2:
                    self._out.telemetry.retries.labels(self.name).inc()
                    self.open_stream(st, exclude=up.key)
                else:
                    self.fail(st, UNAVAILABLE, f"weft: cannot reach {self.name} at {up.key}")
        for st in list(up.streams.values()):
            if not st.app.closed:
                self.fail(st, UNAVAILABLE, f"weft: the connection to {self.name} was lost")
        up.streams.clear()
        self.flush()

    def send_request(self, st: Stream, up: UpConn) -> None:
        st.up = up
        st.up_sid = up.open(st)
        up.headers_frames(st.up_sid, st.request_block, st.app_done and not st.q_up)
        if st.q_up:
            self.flush_to_up(st)

    def client_trailers(self, st: Stream, block: bytes, end: bool) -> None:
        if end:
            st.app_done = True
        if st.up is not None and st.up.ready and not st.q_up:
            st.up.headers_frames(st.up_sid, block, end)

    def to_upstream(self, st: Stream, data: bytes, end: bool) -> None:
        size = st.msg_up.too_large(data, self.max_message)
        if size:
            st.app.consumed(len(data))
            self.fail(st, RESOURCE_EXHAUSTED,
                      f"weft: request message of {size} bytes is larger than the limit of {self.max_message}")
            return
        if st.tap is not None:
            st.tap.request_data(data)
        st.q_up.append((data, end))
        if st.up is not None and st.up.ready:
            self.flush_to_up(st)

    def flush_to_up(self, st: Stream) -> None:
        up = st.up
        assert up is not None
        q = st.q_up
        while q:
            data, end = q[0]
            sent = up.send_data(st.up_sid, data, end, st.win_up)
            st.win_up -= sent
            st.data_sent = True
            st.app.consumed(sent)
            st.recv_app += sent
            if st.recv_app >= STREAM_WINDOW // 2:
                st.app.send(frame(WINDOW_UPDATE, 0, st.app_sid, _U32.pack(st.recv_app)))
                st.recv_app = 0
            if sent < len(data):
                q[0] = (data[sent:], end)
                return
            q.pop(0)

    def to_app_headers(self, st: Stream, block: bytes, end: bool) -> None:
        if st.tap is not None:
            self._tap_headers(st, block, end)
        app = st.app
        if app.closed:
            return
        if st.q_app:  # keep order behind queued data
            st.q_app.append((block, end))
            st.pending_frames.append((HEADERS, 0, b""))
            return
        app.headers_frames(st.app_sid, block, end)
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
        st.q_app.append((data, end))
        st.pending_frames.append((DATA, 0, b""))
        self.flush_to_app(st)

    def flush_to_app(self, st: Stream) -> None:
        app = st.app
        up = st.up
        q = st.q_app
        kinds = st.pending_frames
        while q:
            item, end = q[0]
            if kinds[0][0] == HEADERS:
                app.headers_frames(st.app_sid, item, end)
                st.headers_sent_app = True
                q.pop(0)
                kinds.pop(0)
                if end:
                    self._ended(st)
                continue
            sent = app.send_data(st.app_sid, item, end, st.win_app)
            st.win_app -= sent
            if up is not None:
                up.consumed(sent)
                st.recv_up += sent
                if st.recv_up >= STREAM_WINDOW // 2 and not up.closed:
                    up.send(frame(WINDOW_UPDATE, 0, st.up_sid, _U32.pack(st.recv_up)))
                    st.recv_up = 0
            if sent < len(item):
                q[0] = (item[sent:], end)
                return
            q.pop(0)
            kinds.pop(0)
            if end:
                self._ended(st)

    def _ended(self, st: Stream) -> None:
        """The upstream ended the stream (END_STREAM towards the app)."""
        st.up_done = True
        st.app.streams.pop(st.app_sid, None)
        if st.up is not None:
            st.up.streams.pop(st.up_sid, None)
            if st.app_done is False and not st.up.closed:
                st.up.send(frame(RST_STREAM, 0, st.up_sid, _U32.pack(E_NO_ERROR)))
            up = st.up
            if (up.goaway or self.ups.get(up.key) is not up) and not up.streams and not up.waiting \
                    and up.transport is not None:
                up.transport.close()  # a retired connection closes once its last stream is done
        self.finish(st, st.status if st.status is not None else 2)

    def _tap_headers(self, st: Stream, block: bytes, end: bool) -> None:
        headers = HeaderBlock(headers_of, block)  # decoded by the tap's reader
        if end:
            st.tap.trailers = headers
        else:
            st.tap.response_headers = headers

    def fail(self, st: Stream, code: int, message: str) -> None:
        app = st.app
        if st.tap is not None:
            self._tap_headers(st, trailers_only(code, message, with_status=not st.headers_sent_app), True)
        if not app.closed:
            app.headers_frames(st.app_sid, trailers_only(code, message, with_status=not st.headers_sent_app), True)
            app.streams.pop(st.app_sid, None)
        if st.up is not None and st.up_sid and not st.up.closed:
            st.up.send(frame(RST_STREAM, 0, st.up_sid, _U32.pack(E_CANCEL)))
            st.up.streams.pop(st.up_sid, None)
        self.finish(st, code)

    def release(self, st: Stream, *, ok: bool) -> None:
        """The stream leaves its endpoint (for the balancer's in-flight count and latency)."""
        if st.endpoint:
            self.pool.observe(st.endpoint, ok, time.perf_counter() - st.start)
            st.endpoint = ""

    def finish(self, st: Stream, code: int) -> None:
        if st.recorded:
            return
        st.recorded = True
        seconds = time.perf_counter() - st.start
        self.release(st, ok=code != UNAVAILABLE)
        out = self._out
        snap = out.snapshot()
        up = snap.upstreams.get(self.pool.name)
        name = STATUS_NAMES[code] if 0 <= code < len(STATUS_NAMES) else "UNKNOWN"
        label = out.telemetry.method_label(self.pool.name, st.method, up.methods if up is not None else None)
        source = snap.registration.service
        out.telemetry.request("outbound", source, self.pool.name, label, name, seconds)
        if st.tap is not None:
            out.telemetry.tap.finish(st.tap, name, seconds)
        out.telemetry.access.line(time.monotonic(), direction="outbound", source=source, destination=self.pool.name,
                                  method=st.method, status=name, duration_ms=round(seconds * 1000, 3))

    # -- lifecycle ---------------------------------------------------------------------------------
    def on_snapshot(self) -> None:
        """Endpoints that left: their idle connections close; busy ones finish their streams first."""
        for key, up in list(self.ups.items()):
            if key not in self.pool.endpoints:
                self.forget(up)

    async def close(self, grace: float = 5.0) -> None:
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace
        while any(a.streams for a in self.apps) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for app in list(self.apps):
            if app.transport is not None:
                app.transport.close()
        for up in list(self.all_ups):
            if up.transport is not None:
                up.transport.close()
        for task in list(self._tasks):
            task.cancel()


class H2Inbound(H2Outbound):
    """The inbound full path for gRPC services, frame by frame: every stream is authorized with the
    caller's identity (PERMISSION_DENIED naming the rule, or on to the app over plaintext h2c).

    It listens on loopback and receives the decrypted connections of callers that are not passed
    through (see ``sidecar.inbound``), whose identity it finds by the connection's source port.
    """

    def __init__(self, inbound: Any) -> None:
        super().__init__(inbound, None)
        self.max_message = int(inbound.max_message_bytes)
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        await super().start(host, port)
        assert self._server is not None
        self.port = int(self._server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    def open_stream(self, st: Stream, exclude: str = "") -> None:
        from sidecar import authz

        inbound = self._out
        if inbound.draining:
            self.fail(st, UNAVAILABLE, "weft: the sidecar is shutting down")
            return
        peer = st.app.transport.get_extra_info("peername") if st.app.transport is not None else None
        ident = inbound.identities.get(int(peer[1])) if peer else None
        if ident is None:
            self.fail(st, 16, "weft: the caller's identity is unknown")
            return
        st.source = ident.service
        snap = inbound.snapshot()
        if inbound.telemetry.tap.active:
            self._tap_start(st, "inbound", ident.service, snap.registration.service)
        try:
            metadata = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers_of(st.request_block)
                        if not k.startswith(b":") and not k.endswith(b"-bin")}
        except (ValueError, IndexError) as exc:
            self.fail(st, 13, f"weft: unreadable request headers: {exc}")
            return
        decision = authz.decide(snap.policy, ident.uri, authz.GrpcRequest(st.method, metadata))
        inbound.telemetry.decision(authz.decision_label(decision), decision.rule_label)
        if not decision.allowed:
            log.info("denied", source=ident.service, destination=snap.registration.service, method=st.method,
                     rule=decision.rule_label, reason=decision.reason)
            self.fail(st, 7, authz.denial_message(decision, ident.service, snap.registration.service, st.method))
            return
        if decision.audited:
            log.warning("audit_would_deny", source=ident.service, destination=snap.registration.service,
                        method=st.method, rule=decision.rule_label, reason=decision.reason)
        st.tries += 1
        st.endpoint = "app"
        up = self._app_conn()
        if up.ready:
            self.send_request(st, up)
        else:
            up.waiting.append(st)

    def _app_conn(self) -> UpConn:
        reg = self._out.snapshot().registration
        key = f"{reg.local_service_address}:{reg.local_service_port}"
        up = self.ups.get(key)
        if up is not None and (up.closed or up.goaway):
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
        seconds = time.perf_counter() - st.start
        inbound = self._out
        snap = inbound.snapshot()
        dest = snap.registration.service
        name = STATUS_NAMES[code] if 0 <= code < len(STATUS_NAMES) else "UNKNOWN"
        label = inbound.telemetry.method_label(dest, st.method, snap.local_methods)
        source = st.source or "unknown"
        inbound.telemetry.request("inbound", source, dest, label, name, seconds)
        if st.tap is not None:
            inbound.telemetry.tap.finish(st.tap, name, seconds)
        inbound.telemetry.access.line(time.monotonic(), direction="inbound", source=source, destination=dest,
                                      method=st.method, status=name, duration_ms=round(seconds * 1000, 3))

    def on_snapshot(self) -> None:
        reg = self._out.snapshot().registration
        key = f"{reg.local_service_address}:{reg.local_service_port}"
        for k, up in list(self.ups.items()):
            if k != key:
                self.forget(up)


__all__ = ["H2Inbound", "H2Outbound", "context_free", "headers_of", "scan", "status_of", "trailers_only"]
