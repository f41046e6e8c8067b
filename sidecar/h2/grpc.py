"""What the HTTP/2 proxy knows of gRPC: status names, trailers-only answers, message framing.

Pure: no I/O.
"""

from __future__ import annotations

from sidecar.h2.hpack import encode_plain, scan

STATUS_NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
                "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
                "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")
CANCELLED = 1
UNKNOWN = 2
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16


def status_name(code: int) -> str:
    return STATUS_NAMES[code] if 0 <= code < len(STATUS_NAMES) else "UNKNOWN"


def trailers_only(code: int, message: str, *, with_status: bool) -> bytes:
    headers: list[tuple[bytes, bytes]] = []
    if with_status:
        headers += [(b":status", b"200"), (b"content-type", b"application/grpc")]
    headers += [(b"grpc-status", str(code).encode()), (b"grpc-message", percent(message))]
    return encode_plain(headers)


def http_answer(status: int, text: str) -> bytes:
    """The header block of a plain HTTP answer (for a stream that is not gRPC)."""
    return encode_plain([(b":status", str(status).encode()), (b"content-type", b"text/plain; charset=utf-8"),
                         (b"content-length", str(len(text.encode())).encode())])


def percent(text: str) -> bytes:
    out = bytearray()
    for ch in text.encode():
        if 0x20 <= ch <= 0x7E and ch != 0x25:
            out.append(ch)
        else:
            out += b"%%%02X" % ch
    return bytes(out)


def is_grpc(block_prefix: bytes) -> bool:
    """Whether a (possibly truncated) request block says ``content-type: application/grpc...``.

    Used for a block too large to keep whole: its first bytes decide how the refusal is worded.
    """
    try:
        ctype = scan(block_prefix, b"content-type")
    except ValueError:
        return True  # unreadable: gRPC is what this listener serves
    return ctype is None or ctype.startswith(b"application/grpc")


_status_cache: dict[bytes, int] = {}


def status_of(block: bytes) -> int | None:
    """``grpc-status`` of a context-free trailers block (cached: a few distinct blocks are common)."""
    code = _status_cache.get(block)
    if code is not None:
        return code
    try:
        value = scan(block, b"grpc-status")
    except ValueError:
        return None
    if value is None:
        return None
    try:
        code = int(value)
    except ValueError:
        return None
    if len(block) <= 256:
        if len(_status_cache) >= 1024:
            _status_cache.clear()
        _status_cache[block] = code
    return code


class Messages:
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
            if not self.head and n - i >= 5:  # a whole prefix in this frame: the common case, no copy kept
                length = int.from_bytes(data[i + 1:i + 5], "big")
                i += 5
            else:
                need = 5 - len(self.head)
                self.head += data[i:i + need]
                i += need
                if len(self.head) < 5:
                    continue
                length = int.from_bytes(self.head[1:5], "big")
                self.head = b""
            if length > limit:
                return length
            self.rest = length
        return 0
