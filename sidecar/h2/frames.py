"""HTTP/2 frames (RFC 9113 section 4 and 6): type, flag, setting and error-code numbers, and builders.

Pure: bytes in, bytes out. Parsing and validation of what a peer sends live in
:mod:`sidecar.h2.connection`, which reads the 9-byte frame header with :data:`HEADER`.
"""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
FRAME_NAMES = ("DATA", "HEADERS", "PRIORITY", "RST_STREAM", "SETTINGS", "PUSH_PROMISE", "PING", "GOAWAY",
               "WINDOW_UPDATE", "CONTINUATION")

F_END_STREAM = 0x1
F_ACK = 0x1
F_END_HEADERS = 0x4
F_PADDED = 0x8
F_PRIORITY = 0x20

S_HEADER_TABLE_SIZE = 1
S_ENABLE_PUSH = 2
S_MAX_CONCURRENT = 3
S_INITIAL_WINDOW = 4
S_MAX_FRAME = 5
S_MAX_HEADER_LIST = 6

E_NO_ERROR = 0x0
E_PROTOCOL = 0x1
E_INTERNAL = 0x2
E_FLOW = 0x3
E_SETTINGS_TIMEOUT = 0x4
E_STREAM_CLOSED = 0x5
E_FRAME_SIZE = 0x6
E_REFUSED = 0x7
E_CANCEL = 0x8
E_COMPRESSION = 0x9
E_CONNECT = 0xA
E_CALM = 0xB
E_INADEQUATE_SECURITY = 0xC
E_HTTP_1_1_REQUIRED = 0xD

MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**31 - 1
DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
MAX_FRAME_LIMIT = 2**24 - 1

HEADER = struct.Struct(">BHBBI")  # length (24 bits as 8 + 16), type, flags, stream id (with the reserved bit)
SETTING = struct.Struct(">HI")
U32 = struct.Struct(">I")
GOAWAY_HEAD = struct.Struct(">II")


def frame(typ: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return HEADER.pack(n >> 16, n & 0xFFFF, typ, flags, sid) + payload


def settings_frame(pairs: list[tuple[int, int]]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(SETTING.pack(k, v) for k, v in pairs))


def rst_stream(sid: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, sid, U32.pack(code))


def window_update(sid: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, sid, U32.pack(increment))


def goaway(last_sid: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, GOAWAY_HEAD.pack(last_sid & MAX_STREAM_ID, code) + debug)


def error_name(code: int) -> str:
    names = ("NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT",
             "STREAM_CLOSED", "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR",
             "CONNECT_ERROR", "ENHANCE_YOUR_CALM", "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED")
    return names[code] if 0 <= code < len(names) else f"0x{code:x}"
