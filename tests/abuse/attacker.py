"""A hand-built HTTP/2 client for attacking sidecars: frames as bytes, the answers recorded.

The attacker needs to send what a conforming client library refuses to send (endless CONTINUATION,
oversized or padded frames, bad stream ids, floods), so frames are built here with ``struct`` and
written to a plain or TLS socket; what comes back is parsed frame by frame and recorded (GOAWAY,
RST_STREAM, response headers, DATA, WINDOW_UPDATEs, SETTINGS), so a test can check which HTTP/2
error the sidecar answered with. Header blocks are HPACK-encoded with literals that never enter
the dynamic table (every block context-free) and decoded with one decoder per connection.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hpack import Decoder, Encoder
from hpack.struct import NeverIndexedHeaderTuple

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = \
    1, 2, 3, 4, 5, 6

# RFC 9113 section 7 error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT, STREAM_CLOSED, FRAME_SIZE_ERROR, \
    REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, CONNECT_ERROR, ENHANCE_YOUR_CALM = range(12)
ERROR_NAMES = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR",
               4: "SETTINGS_TIMEOUT", 5: "STREAM_CLOSED", 6: "FRAME_SIZE_ERROR", 7: "REFUSED_STREAM", 8: "CANCEL",
               9: "COMPRESSION_ERROR", 10: "CONNECT_ERROR", 11: "ENHANCE_YOUR_CALM", 12: "INADEQUATE_SECURITY",
               13: "HTTP_1_1_REQUIRED"}
MAX_WINDOW = 2**31 - 1

_FH = struct.Struct(">BHBBI")
_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")


def error_name(code: int) -> str:
    return ERROR_NAMES.get(code, f"0x{code:x}")


# -- frames -------------------------------------------------------------------------------------------

def frame(typ: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FH.pack(n >> 16, n & 0xFFFF, typ, flags, sid & 0x7FFFFFFF) + payload


def settings(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in pairs))


def window_update(sid: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, sid, _U32.pack(increment & 0x7FFFFFFF))


def rst_stream(sid: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, sid, _U32.pack(code))


def ping(data: bytes = b"\0" * 8) -> bytes:
    return frame(PING, 0, 0, data)


def priority(sid: int, depends_on: int = 0, weight: int = 15) -> bytes:
    return frame(PRIORITY, 0, sid, _U32.pack(depends_on) + bytes([weight]))


def data(sid: int, payload: bytes, *, end: bool = False, pad: int | None = None) -> bytes:
    if pad is None:
        return frame(DATA, END_STREAM if end else 0, sid, payload)
    return frame(DATA, (END_STREAM if end else 0) | PADDED, sid, bytes([pad]) + payload + b"\0" * pad)


def grpc_message(body: bytes) -> bytes:
    return b"\0" + _U32.pack(len(body)) + body


def encode_headers(headers: Sequence[tuple[str, str]]) -> bytes:
    """A context-free header block: static-table hits or literals never indexed."""
    return bytes(Encoder().encode([NeverIndexedHeaderTuple(k, v) for k, v in headers], huffman=False))


def request_headers(path: str, authority: str, *, scheme: str = "http",
                    extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    return [(":method", "POST"), (":scheme", scheme), (":path", path), (":authority", authority),
            ("content-type", "application/grpc"), ("te", "trailers"), *extra]


def header_frames(sid: int, block: bytes, *, end_stream: bool = False, max_frame: int = 16384) -> bytes:
    """HEADERS, then CONTINUATION frames for what does not fit in one frame."""
    flags = END_STREAM if end_stream else 0
    if len(block) <= max_frame:
        return frame(HEADERS, flags | END_HEADERS, sid, block)
    out = [frame(HEADERS, flags, sid, block[:max_frame])]
    rest = block[max_frame:]
    while rest:
        part, rest = rest[:max_frame], rest[max_frame:]
        out.append(frame(CONTINUATION, 0 if rest else END_HEADERS, sid, part))
    return b"".join(out)


# -- a connection ---------------------------------------------------------------------------------------

@dataclass
class Stream:
    headers: list[list[tuple[str, str]]] = field(default_factory=list)
    data: int = 0
    ended: bool = False
    reset: int | None = None
    window: int = 65535


class Peer:
    """One attacking HTTP/2 connection over ``sock`` (plain or TLS, blocking with timeouts).

    ``auto_ack``: answer the server's SETTINGS and PINGs (a well-behaved peer; off for attacks that
    must not read or answer). ``credit``: give back flow-control window for DATA received.
    """

    def __init__(self, sock: socket.socket, *, auto_ack: bool = True, credit: bool = True) -> None:
        self.sock = sock
        self.auto_ack = auto_ack
        self.credit = credit
        self.buf = bytearray()
        self.decoder = Decoder()
        self.decoder.max_header_list_size = 1 << 24
        self.goaway: tuple[int, int] | None = None  # (last stream id, error code)
        self.streams: dict[int, Stream] = {}
        self.server_settings: dict[int, int] = {}
        self.got_settings = False
        self.settings_acks = 0
        self.ping_acks = 0
        self.send_window = 65535           # the server's connection window for what we send
        self.closed = False                # EOF or reset from the server
        self.close_reason = ""
        self.blocked = False               # a write timed out: the server stopped reading from us
        self.bytes_sent = 0
        self.bytes_read = 0
        self._hdr: tuple[int, int, bytearray] | None = None
        self._out: list[bytes] = []

    # -- writing ---------------------------------------------------------------------------------
    def send(self, payload: bytes, timeout: float = 3.0) -> bool:
        """Write it all; False when the server closed or stopped reading (the write timed out)."""
        if self.closed or self.blocked:
            return False
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(payload)
        except TimeoutError:
            self.blocked = True
            return False
        except (OSError, ssl.SSLError) as exc:
            self._lost(f"write: {exc!r}")
            return False
        self.bytes_sent += len(payload)
        return True

    def start(self, *pairs: tuple[int, int], timeout: float = 5.0) -> bool:
        """Preface and SETTINGS; waits for the server's SETTINGS (True when they came)."""
        self.send(PREFACE + settings(*pairs))
        self.pump(timeout, until=lambda: self.got_settings)
        return self.got_settings

    @property
    def max_frame(self) -> int:
        return self.server_settings.get(MAX_FRAME_SIZE, 16384)

    @property
    def initial_window(self) -> int:
        return self.server_settings.get(INITIAL_WINDOW_SIZE, 65535)

    def request(self, sid: int, path: str, authority: str, *, body: bytes | None = None, end: bool = True,
                extra: Sequence[tuple[str, str]] = (), scheme: str = "http", fragment: int | None = None) -> bool:
        """A gRPC request on stream ``sid``: HEADERS (+ CONTINUATION, in ``fragment``-byte pieces when
        given, else as large as the server allows), and the message when given."""
        self.streams.setdefault(sid, Stream(window=self.initial_window))
        block = encode_headers(request_headers(path, authority, scheme=scheme, extra=extra))
        out = header_frames(sid, block, end_stream=end and body is None, max_frame=fragment or self.max_frame)
        if body is not None:
            out += data(sid, grpc_message(body), end=end)
        return self.send(out)

    # -- reading ---------------------------------------------------------------------------------
    def pump(self, seconds: float, until: Callable[[], bool] | None = None, max_bytes: int = 256 << 20) -> None:
        """Read and record frames for up to ``seconds``, or until ``until()`` holds or the connection ends."""
        deadline = time.monotonic() + seconds
        start = self.bytes_read
        while not self.closed and self.bytes_read - start < max_bytes:
            if until is not None and until():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.sock.settimeout(min(left, 0.5))
            try:
                chunk = self.sock.recv(262144)
            except TimeoutError:
                continue
            except ssl.SSLWantReadError:
                continue
            except (OSError, ssl.SSLError) as exc:
                self._lost(f"read: {exc!r}")
                return
            if not chunk:
                self._lost("EOF")
                return
            self.bytes_read += len(chunk)
            self.buf += chunk
            self._parse()
            if self._out:
                out, self._out = b"".join(self._out), []
                self.send(out, timeout=1.0)

    def settle(self, seconds: float = 3.0) -> None:
        """Read until the server says GOAWAY or closes (the usual end of an attack), at most ``seconds``."""
        self.pump(seconds, until=lambda: self.goaway is not None)
        if self.goaway is not None:  # and see the close that should follow
            self.pump(0.3)

    def _lost(self, why: str) -> None:
        self.closed = True
        self.close_reason = self.close_reason or why

    def _parse(self) -> None:
        buf = self.buf
        i = 0
        n = len(buf)
        while n - i >= 9:
            hi, lo, typ, flags, sid = _FH.unpack_from(buf, i)
            length = (hi << 16) | lo
            if n - i - 9 < length:
                break
            payload = bytes(buf[i + 9:i + 9 + length])
            i += 9 + length
            self._frame(typ, flags, sid & 0x7FFFFFFF, payload)
        del buf[:i]

    def _frame(self, typ: int, flags: int, sid: int, payload: bytes) -> None:
        if self._hdr is not None and typ == CONTINUATION and sid == self._hdr[0]:
            self._hdr[2].extend(payload)
            if flags & END_HEADERS:
                hsid, hflags, fragments = self._hdr
                self._hdr = None
                self._headers(hsid, hflags, bytes(fragments))
            return
        if typ == DATA:
            st = self.streams.setdefault(sid, Stream())
            st.data += len(payload)
            if flags & END_STREAM:
                st.ended = True
            if self.credit and payload:
                self._out.append(window_update(0, len(payload)))
                if not st.ended:
                    self._out.append(window_update(sid, len(payload)))
        elif typ == HEADERS:
            block = payload
            if flags & PADDED:
                block = block[1:len(block) - block[0]]
            if flags & 0x20:
                block = block[5:]
            if flags & END_HEADERS:
                self._headers(sid, flags, block)
            else:
                self._hdr = (sid, flags, bytearray(block))
        elif typ == SETTINGS:
            if flags & ACK:
                self.settings_acks += 1
                return
            for off in range(0, len(payload) - 5, 6):
                key, value = _SETTING.unpack_from(payload, off)
                if key == INITIAL_WINDOW_SIZE:
                    delta = value - self.server_settings.get(INITIAL_WINDOW_SIZE, 65535)
                    for st in self.streams.values():
                        st.window += delta
                self.server_settings[key] = value
            self.got_settings = True
            if self.auto_ack:
                self._out.append(frame(SETTINGS, ACK, 0))
        elif typ == PING:
            if flags & ACK:
                self.ping_acks += 1
            elif self.auto_ack:
                self._out.append(frame(PING, ACK, 0, payload))
        elif typ == RST_STREAM and len(payload) >= 4:
            self.streams.setdefault(sid, Stream()).reset = _U32.unpack_from(payload)[0]
        elif typ == GOAWAY and len(payload) >= 8:
            last, code = struct.unpack_from(">II", payload)
            if self.goaway is None or code != NO_ERROR:
                self.goaway = (last & 0x7FFFFFFF, code)
        elif typ == WINDOW_UPDATE and len(payload) >= 4:
            inc = _U32.unpack_from(payload)[0] & 0x7FFFFFFF
            if sid == 0:
                self.send_window += inc
            else:
                self.streams.setdefault(sid, Stream(window=self.initial_window)).window += inc

    def _headers(self, sid: int, flags: int, block: bytes) -> None:
        st = self.streams.setdefault(sid, Stream())
        try:
            decoded = [(str(k.decode() if isinstance(k, bytes) else k), str(v.decode() if isinstance(v, bytes) else v))
                       for k, v in self.decoder.decode(block)]
        except Exception as exc:  # an undecodable block is recorded as such; the test decides
            decoded = [("x-attacker-undecodable", repr(exc))]
        st.headers.append(decoded)
        if flags & END_STREAM:
            st.ended = True

    # -- what happened ---------------------------------------------------------------------------
    def grpc_status(self, sid: int) -> int | None:
        st = self.streams.get(sid)
        if st is None:
            return None
        for block in reversed(st.headers):
            for k, v in block:
                if k == "grpc-status":
                    return int(v) if v.isdigit() else -1
        return None

    def http_status(self, sid: int) -> str | None:
        st = self.streams.get(sid)
        for block in (st.headers if st else []):
            for k, v in block:
                if k == ":status":
                    return v
        return None

    def answered(self, sid: int) -> bool:
        st = self.streams.get(sid)
        return st is not None and (st.ended or st.reset is not None)

    def goaway_code(self) -> int | None:
        return None if self.goaway is None else self.goaway[1]

    def resets(self, code: int | None = None) -> list[int]:
        return [sid for sid, st in self.streams.items() if st.reset is not None and (code is None or st.reset == code)]

    def describe(self) -> str:
        ga = "none" if self.goaway is None else f"last_stream={self.goaway[0]} {error_name(self.goaway[1])}"
        rst: dict[str, int] = {}
        for st in self.streams.values():
            if st.reset is not None:
                rst[error_name(st.reset)] = rst.get(error_name(st.reset), 0) + 1
        return (f"GOAWAY {ga}; RST_STREAM {rst or 'none'}; closed={self.closed} ({self.close_reason or '-'}); "
                f"blocked={self.blocked}; sent {self.bytes_sent} B, read {self.bytes_read} B")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def refused_with(peer: Peer, goaway: Sequence[int] = (), rst: Sequence[int] = (),
                 sids: Sequence[int] | None = None) -> bool:
    """True when the server ended the connection with a GOAWAY code in ``goaway``, or a stream (of ``sids``
    when given) with a RST_STREAM code in ``rst``."""
    if peer.goaway is not None and peer.goaway[1] in goaway:
        return True
    for sid, st in peer.streams.items():
        if st.reset is not None and st.reset in rst and (sids is None or sid in sids):
            return True
    return False
