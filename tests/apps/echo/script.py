"""How a call to the echo app behaves, read from its request metadata (pure: no I/O, no grpc).

Request metadata keys (all optional):

- `x-echo-status: CODE[:message]` ends the call with that status instead of OK. CODE is a gRPC
  status name (`PERMISSION_DENIED`, case-insensitive) or number (`7`). Unary and ClientStream abort
  at once (ClientStream without reading); ServerStream after sending its `x-echo-count` responses;
  Bidi after answering `x-echo-status-after` requests (default 0: at once). The abort carries the
  trailers `x-echo-trailer: <message>` and `x-echo-detail-bin: <message as UTF-8 bytes>`.
- `x-echo-delay-ms: N` waits N ms before each response (and before an abort).
- `x-echo-count: N` ServerStream sends N responses (default 1); Bidi answers each request N times
  (default 1).
- `x-echo-status-after: N` see above.

Every other request metadata entry (not `grpc-*`, not pseudo-headers, not transport headers) is sent
back as initial metadata, together with `x-echo-instance: <--name>`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# gRPC status codes by name (the numbering is fixed by the gRPC spec).
STATUS_CODES: dict[str, int] = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9,
    "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14,
    "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}
STATUS_NAMES: dict[int, str] = {v: k for k, v in STATUS_CODES.items()}

STATUS_KEY = "x-echo-status"
DELAY_KEY = "x-echo-delay-ms"
COUNT_KEY = "x-echo-count"
STATUS_AFTER_KEY = "x-echo-status-after"
INSTANCE_KEY = "x-echo-instance"
TRAILER_KEY = "x-echo-trailer"
DETAIL_BIN_KEY = "x-echo-detail-bin"

MAX_COUNT = 1_000_000
MAX_DELAY_MS = 600_000

# Request headers that belong to the transport, not to the caller: never echoed back.
_NOT_ECHOED = frozenset({"user-agent", "te", "content-type", "host", "connection", "accept-encoding"})


class ScriptError(ValueError):
    """A control header has a value the echo app cannot use; the call fails with INVALID_ARGUMENT."""


@dataclass(frozen=True)
class Status:
    code: int
    message: str

    @property
    def name(self) -> str:
        return STATUS_NAMES[self.code]


@dataclass(frozen=True)
class Script:
    status: Status | None = None
    delay_ms: int = 0
    count: int = 1
    status_after: int = 0


def parse_status(value: str) -> Status:
    """Parse `CODE[:message]`, CODE a status name or number."""
    code_text, _, message = value.partition(":")
    code_text = code_text.strip()
    if code_text.isdigit():
        code = int(code_text)
        if code not in STATUS_NAMES:
            raise ScriptError(f"{STATUS_KEY}: unknown gRPC status number {code} (0..16)")
    else:
        name = code_text.upper()
        if name not in STATUS_CODES:
            raise ScriptError(f"{STATUS_KEY}: unknown gRPC status name {code_text!r}")
        code = STATUS_CODES[name]
    return Status(code, message or f"echo: {STATUS_NAMES[code]} as requested")


def _int(key: str, value: str, maximum: int) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise ScriptError(f"{key}: expected a whole number, got {value!r}") from None
    if not 0 <= number <= maximum:
        raise ScriptError(f"{key}: {number} is outside 0..{maximum}")
    return number


def parse(metadata: Iterable[tuple[str, str | bytes]]) -> Script:
    """Read the script from request metadata; the last value of a repeated key wins."""
    status: Status | None = None
    delay_ms, count, status_after = 0, 1, 0
    for key, raw in metadata:
        if not key.startswith("x-echo-"):
            continue
        value = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if key == STATUS_KEY:
            status = parse_status(value)
        elif key == DELAY_KEY:
            delay_ms = _int(key, value, MAX_DELAY_MS)
        elif key == COUNT_KEY:
            count = _int(key, value, MAX_COUNT)
        elif key == STATUS_AFTER_KEY:
            status_after = _int(key, value, MAX_COUNT)
    if status is not None and status.code == 0:
        status = None  # "OK" means: end normally
    return Script(status=status, delay_ms=delay_ms, count=count, status_after=status_after)


def echoed(metadata: Iterable[tuple[str, str | bytes]]) -> list[tuple[str, str | bytes]]:
    """The request metadata entries sent back as initial metadata."""
    return [(k, v) for k, v in metadata
            if not k.startswith((":", "grpc-")) and k not in _NOT_ECHOED and k != INSTANCE_KEY]


def text_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> dict[str, str]:
    """The text (non `-bin`) request metadata, for the response's `metadata` field."""
    return {k: v for k, v in metadata if isinstance(v, str) and not k.endswith("-bin")}
