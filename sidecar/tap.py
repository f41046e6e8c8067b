"""Live tap of a sidecar's calls (pure: no I/O): filters, settings, records, redaction, previews, the hub.

A tap is a subscriber to the calls one sidecar proxies, in both directions. The data path asks the
:class:`TapHub` at the start of a call whether anybody listens (``hub.active``: one attribute check,
the whole cost when nobody taps); only then does it get a :class:`CallRecord` to fill (headers,
the first ``MaxBytes`` of each direction's payload when payloads are on) and hands it back when the
call completes. The hub offers it to every matching subscriber's bounded queue; a full queue drops
the record and counts the drop (``weft_tap_dropped_total``) instead of slowing the call.

Turning a record into the JSON line a tap sees (:func:`render`) happens on the reader's side, off the
call's path, and redacts before anything leaves the sidecar: the values of ``authorization``,
``cookie``, ``set-cookie``, ``x-consul-token``, ``proxy-authorization``, every ``-bin`` key not
allowed by the settings, and every header, query parameter or JSON field whose name contains one of
the settings' ``Redact`` patterns (case-insensitively) become ``[redacted]``. What that takes is built
once per settings (a :class:`Redactor`) and reused for every call rendered under them.

Payload previews: gRPC messages (5-byte length prefix) are decoded to JSON when the method's
descriptor is known (a :data:`Decoder` supplied by the caller), shown as text when textual, base64
otherwise; HTTP bodies as redacted JSON when they parse, text when textual, base64 otherwise.

Per-service settings come from KV ``weft/tap/<service>``: ``{"Payload": true, "MaxBytes": 1024,
"Redact": ["x-api-key", "password"], "AllowBinary": ["grpc-status-details-bin"]}``.
"""

from __future__ import annotations

import base64
import codecs
import json
import math
import re
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote

import orjson

REDACTED = "[redacted]"
ALWAYS_REDACTED = frozenset({"authorization", "cookie", "set-cookie", "x-consul-token", "proxy-authorization"})
DIRECTIONS = ("inbound", "outbound")
DEFAULT_MAX_BYTES = 1024
MAX_MAX_BYTES = 64 * 1024
MAX_PATTERNS = 64
MAX_LIMIT = 1_000_000
QUEUE_SIZE = 256  # records per tap waiting for its reader; beyond: dropped and counted
MAX_TAPS = 16  # open taps per sidecar
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_STATUS = re.compile(r"^([A-Z_]{1,40}|[1-5][0-9]{2}|[1-5]xx|closed|denied)$")
FILTER_KEYS = ("direction", "source", "destination", "method", "path", "status", "min_ms", "limit", "payload",
               "max_rps")
# calls per second one tap records at most (as linkerd's tap): what a tap costs is bounded by what it
# asks for, not by the traffic; the calls above it are counted and reported as skipped. 0: no cap.
DEFAULT_MAX_RPS = 100.0
MAX_MAX_RPS = 100_000.0

# (method path, is_request, one message's bytes) -> its JSON form, or None when the type is unknown
Decoder = Callable[[str, bool, bytes], Any]


class TapError(ValueError):
    """A tap filter or a ``weft/tap/<service>`` document that cannot be used; the message names it."""


# ---------------------------------------------------------------------------------------------------
# Settings: KV weft/tap/<service>


@dataclass(frozen=True, slots=True)
class TapSettings:
    payload: bool = False
    max_bytes: int = DEFAULT_MAX_BYTES
    redact: tuple[str, ...] = ()  # lower-case name fragments
    allow_binary: frozenset[str] = frozenset()  # -bin keys shown anyway (lower case)


OFF = TapSettings()
TAP_PREFIX = "weft/tap/"


def tap_key(service: str) -> str:
    return TAP_PREFIX + service


def parse_settings(raw: bytes | str | None, *, key: str = "tap settings") -> TapSettings:
    """The settings of a ``weft/tap/<service>`` value (absent or empty: payloads off).

    Raises TapError naming the field that is wrong; unknown fields are errors too (a typo such as
    ``"Paylaod"`` must not silently leave payloads off, or ``"Redcat"`` leave secrets visible)."""
    if raw is None or raw in (b"", ""):
        return OFF
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TapError(f"{key}: not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise TapError(f"{key}: expected a JSON object like {{\"Payload\": true, \"MaxBytes\": 1024}}")
    known = {"Payload", "MaxBytes", "Redact", "AllowBinary"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise TapError(f"{key}: unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
    payload = doc.get("Payload", False)
    if not isinstance(payload, bool):
        raise TapError(f"{key}: Payload must be true or false, not {payload!r}")
    max_bytes = doc.get("MaxBytes", DEFAULT_MAX_BYTES)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or not 1 <= max_bytes <= MAX_MAX_BYTES:
        raise TapError(f"{key}: MaxBytes must be an integer from 1 to {MAX_MAX_BYTES}, not {max_bytes!r}")
    redact = _names(doc.get("Redact", []), f"{key}: Redact")
    allow = _names(doc.get("AllowBinary", []), f"{key}: AllowBinary")
    for name in allow:
        if not name.endswith("-bin"):
            raise TapError(f"{key}: AllowBinary entry {name!r} is not a -bin key")
    return TapSettings(payload=payload, max_bytes=max_bytes, redact=redact, allow_binary=frozenset(allow))


def _names(raw: Any, what: str) -> tuple[str, ...]:
    if not isinstance(raw, list):
        raise TapError(f"{what} must be a list of names, not {raw!r}")
    if len(raw) > MAX_PATTERNS:
        raise TapError(f"{what} has {len(raw)} entries; at most {MAX_PATTERNS}")
    out: list[str] = []
    for item in raw:
        if not isinstance(item, str) or not item.strip() or len(item) > 128:
            raise TapError(f"{what}: {item!r} is not a non-empty name of at most 128 characters")
        out.append(item.strip().lower())
    return tuple(out)


# ---------------------------------------------------------------------------------------------------
# Filters: the query parameters of /tap


@dataclass(frozen=True, slots=True)
class TapFilter:
    direction: str | None = None
    source: str | None = None
    destination: str | None = None
    method: str | None = None  # prefix of the gRPC method path, the HTTP path, or "GET /path"
    status: str | None = None  # gRPC status name, HTTP code, or a class such as 5xx
    min_ms: float = 0.0
    limit: int | None = None
    payload: bool = False
    max_rps: float = DEFAULT_MAX_RPS

    def could_match(self, direction: str, source: str, destination: str) -> bool:
        """Whether a call between these parties may match (decided before its method and status)."""
        return ((self.direction is None or self.direction == direction)
                and (self.source is None or self.source == source)
                and (self.destination is None or self.destination == destination))

    def could_match_call(self, direction: str, source: str, destination: str, method: str, path: str) -> bool:
        """Whether a call starting now may match (everything but its status and duration)."""
        return self.could_match(direction, source, destination) and (
            self.method is None or method.startswith(self.method) or path.startswith(self.method))

    def matches(self, rec: CallRecord) -> bool:
        if not self.could_match(rec.direction, rec.source, rec.destination):
            return False
        if self.method is not None and not (rec.method.startswith(self.method) or rec.path.startswith(self.method)):
            return False
        if self.status is not None:
            if self.status.endswith("xx"):
                if not (rec.status.isdigit() and rec.status[0] == self.status[0]):
                    return False
            elif rec.status != self.status:
                return False
        return rec.seconds * 1000.0 >= self.min_ms


def parse_filter(query: str | Mapping[str, Sequence[str]]) -> TapFilter:
    """A filter from /tap's query string (or parsed parameters); raises TapError naming the bad one."""
    if isinstance(query, str):
        if len(query) > 4096:
            raise TapError(f"tap query of {len(query)} characters; at most 4096")
        try:
            params: Mapping[str, Sequence[str]] = parse_qs(query, keep_blank_values=True, max_num_fields=32)
        except ValueError as exc:  # more fields than max_num_fields
            raise TapError(f"tap query: {exc}") from None
    else:
        params = query
    got: dict[str, str] = {}
    for name, values in params.items():
        if name not in FILTER_KEYS:
            raise TapError(f"unknown tap parameter {name[:40]!r}; known: {', '.join(FILTER_KEYS)}")
        if len(values) != 1:
            raise TapError(f"tap parameter {name} given {len(values)} times; give it once")
        got[name] = values[0]
    direction = got.get("direction") or None
    if direction is not None and direction not in DIRECTIONS:
        raise TapError(f"direction {direction[:40]!r} is not inbound or outbound")
    names: dict[str, str | None] = {}
    for key in ("source", "destination"):
        value = got.get(key) or None
        if value is not None and not _NAME.match(value):
            raise TapError(f"{key} {value[:40]!r} is not a service name")
        names[key] = value
    method = got.get("method") or got.get("path") or None
    if "method" in got and "path" in got:
        raise TapError("give method or path, not both (both are a prefix of the call's method or path)")
    if method is not None and (len(method) > 256 or any(ord(c) < 32 for c in method)):
        raise TapError("method/path prefix must be at most 256 printable characters")
    status = got.get("status") or None
    if status is not None and not _STATUS.match(status):
        raise TapError(f"status {status[:40]!r} is not a gRPC status name (OK, NOT_FOUND, ...), an HTTP code "
                       "or class (404, 5xx)")
    min_ms = 0.0
    if got.get("min_ms"):
        try:
            min_ms = float(got["min_ms"])
        except ValueError:
            raise TapError(f"min_ms {got['min_ms'][:40]!r} is not a number") from None
        if not math.isfinite(min_ms) or min_ms < 0:
            raise TapError(f"min_ms {got['min_ms'][:40]!r} must be a number >= 0")
    limit: int | None = None
    if got.get("limit"):
        raw = got["limit"]
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            raise TapError(f"limit {raw[:40]!r} must be an integer from 1 to {MAX_LIMIT}")
        limit = int(raw)
    max_rps = DEFAULT_MAX_RPS
    if got.get("max_rps"):
        try:
            max_rps = float(got["max_rps"])
        except ValueError:
            raise TapError(f"max_rps {got['max_rps'][:40]!r} is not a number") from None
        if not math.isfinite(max_rps) or not 0 <= max_rps <= MAX_MAX_RPS:
            raise TapError(f"max_rps {got['max_rps'][:40]!r} must be from 0 (no cap) to {MAX_MAX_RPS:g}")
    payload_raw = got.get("payload", "0").lower()
    if payload_raw not in ("", "0", "1", "true", "false"):
        raise TapError(f"payload {payload_raw[:40]!r} must be 1 or 0")
    return TapFilter(direction=direction, source=names["source"], destination=names["destination"],
                     method=method, status=status, min_ms=min_ms, limit=limit,
                     payload=payload_raw in ("1", "true"), max_rps=max_rps)


def filter_query(f: TapFilter) -> str:
    """The query string of a filter (what `weft tap` sends); parse_filter(filter_query(f)) == f."""
    parts: list[tuple[str, str]] = []
    for key in ("direction", "source", "destination", "method", "status"):
        value = getattr(f, key)
        if value is not None:
            parts.append((key, value))
    if f.min_ms:
        parts.append(("min_ms", repr(f.min_ms)))
    if f.limit is not None:
        parts.append(("limit", str(f.limit)))
    if f.payload:
        parts.append(("payload", "1"))
    if f.max_rps != DEFAULT_MAX_RPS:
        parts.append(("max_rps", repr(f.max_rps)))
    return "&".join(f"{k}={quote(v, safe='/')}" for k, v in parts)


# ---------------------------------------------------------------------------------------------------
# Records (filled by the data path) and the hub


class HeaderBlock:
    """A raw (context-free) HTTP/2 header block and the function that decodes it: what the data path
    hands over, so that decoding happens on the reader's side, and identical blocks (the same response
    headers and trailers on every call) are decoded and redacted once (see :func:`redact_headers`)."""

    __slots__ = ("decode", "raw")

    def __init__(self, decode: Callable[[bytes], Sequence[tuple[Any, Any]]], raw: bytes) -> None:
        self.decode = decode
        self.raw = raw


# (name, value) pairs, str or bytes; or a raw block to decode on the reader's side
Headers = Sequence[tuple[Any, Any]] | HeaderBlock


class CallRecord:
    """One call as the data path saw it; raw values only (rendering and redaction come later)."""

    __slots__ = (
        "at",
        "destination",
        "direction",
        "max_bytes",
        "method",
        "path",
        "payload_off",
        "protocol",
        "request_body",
        "request_bytes",
        "request_headers",
        "response_body",
        "response_bytes",
        "response_headers",
        "seconds",
        "source",
        "status",
        "subscribers",
        "trailers",
    )

    def __init__(self, direction: str, source: str, destination: str, method: str, *, path: str = "",
                 protocol: str = "grpc", max_bytes: int = 0, payload_off: bool = False,
                 at: float | None = None) -> None:
        self.at = time.time() if at is None else at
        self.direction = direction
        self.source = source
        self.destination = destination
        self.method = method
        self.path = path or method
        self.protocol = protocol
        self.status = ""
        self.seconds = 0.0
        self.request_headers: Headers = ()
        self.response_headers: Headers = ()
        self.trailers: Headers = ()
        self.max_bytes = max_bytes  # 0: payloads are not captured for this record
        self.payload_off = payload_off  # a payload tap is open but payloads are off for this service
        self.request_body: bytearray | None = bytearray() if max_bytes else None
        self.response_body: bytearray | None = bytearray() if max_bytes else None
        self.request_bytes = 0
        self.response_bytes = 0
        self.subscribers: tuple[Subscriber, ...] = ()  # the taps that took this call (see TapHub.start)

    def request_data(self, data: bytes) -> None:
        """Payload bytes from the caller (only the first ``max_bytes`` are kept)."""
        self.request_bytes += len(data)
        body = self.request_body
        if body is not None and len(body) < self.max_bytes:
            body += data[:self.max_bytes - len(body)]

    def response_data(self, data: bytes) -> None:
        self.response_bytes += len(data)
        body = self.response_body
        if body is not None and len(body) < self.max_bytes:
            body += data[:self.max_bytes - len(body)]


class Subscriber:
    """One open tap: its filter, a bounded queue of records, and how many it lost."""

    __slots__ = ("capacity", "delivered", "dropped", "filter", "last", "notify", "queue", "skipped", "tokens")

    def __init__(self, flt: TapFilter, notify: Callable[[], None], capacity: int = QUEUE_SIZE) -> None:
        self.filter = flt
        self.queue: deque[CallRecord] = deque()
        self.capacity = capacity
        self.notify = notify
        self.dropped = 0  # recorded, but the reader was too slow to take them
        self.skipped = 0  # not recorded: above the tap's max_rps
        self.delivered = 0
        self.tokens = flt.max_rps  # a token bucket of max_rps per second, burst max_rps
        self.last: float | None = None

    def admit(self, now: float) -> bool:
        """Whether this tap records one more call now (its max_rps allows it)."""
        rate = self.filter.max_rps
        if rate <= 0:
            return True
        if self.last is not None:
            self.tokens = min(rate, self.tokens + (now - self.last) * rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.skipped += 1
        return False

    def offer(self, rec: CallRecord) -> bool:
        if len(self.queue) >= self.capacity:
            self.dropped += 1
            return False
        self.queue.append(rec)
        self.notify()
        return True

    def take(self) -> list[CallRecord]:
        out = list(self.queue)
        self.queue.clear()
        return out


class TapHub:
    """The open taps of one sidecar. The data path reads ``active`` before doing anything else."""

    def __init__(self, service: str = "", *, on_drop: Callable[[], None] | None = None,
                 settings: Callable[[], TapSettings] | None = None, max_taps: int = MAX_TAPS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.service = service
        self.active = False
        self.subscribers: list[Subscriber] = []
        self.dropped = 0
        self.max_taps = max_taps
        self._on_drop = on_drop
        self._settings = settings or (lambda: OFF)
        self.changed: list[Callable[[TapHub], None]] = []  # told when a tap opens or closes

    def bind_settings(self, settings: Callable[[], TapSettings]) -> None:
        self._settings = settings

    def settings(self) -> TapSettings:
        return self._settings()

    def subscribe(self, flt: TapFilter, notify: Callable[[], None], capacity: int = QUEUE_SIZE) -> Subscriber:
        if len(self.subscribers) >= self.max_taps:
            raise TapError(f"{len(self.subscribers)} taps are open on this sidecar; at most {self.max_taps}")
        sub = Subscriber(flt, notify, capacity)
        self.subscribers = [*self.subscribers, sub]  # copied: the data path may be iterating the old list
        self.active = True
        self._tell()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers = [s for s in self.subscribers if s is not sub]
        self.active = bool(self.subscribers)
        self._tell()

    def _tell(self) -> None:
        for cb in list(self.changed):
            cb(self)

    def wants_calls_from(self, source: str, destination: str) -> bool:
        """Whether an open tap may match inbound calls of ``source`` to ``destination`` (then the inbound
        side must take the per-call path for that caller: pass-through would hide its calls)."""
        if not self.active:
            return False
        return any(s.filter.could_match("inbound", source, destination) for s in self.subscribers)

    def start(self, direction: str, source: str, destination: str, method: str, *, path: str = "",
              protocol: str = "grpc") -> CallRecord | None:
        """A record to fill for a call starting now, or None when no open tap can match it.

        Payloads are captured only when the service's settings enable them AND a matching tap asked.
        A tap past its max_rps does not take the call (it counts it as skipped)."""
        want_payload = False
        taking: list[Subscriber] = []
        now = 0.0
        for sub in self.subscribers:
            f = sub.filter
            if f.could_match_call(direction, source, destination, method, path or method):
                if not now:
                    now = self.clock()
                if sub.admit(now):
                    taking.append(sub)
                    want_payload = want_payload or f.payload
        if not taking:
            return None
        max_bytes = 0
        payload_off = False
        if want_payload:
            settings = self._settings()
            if settings.payload:
                max_bytes = settings.max_bytes
            else:
                payload_off = True
        rec = CallRecord(direction, source, destination, method, path=path, protocol=protocol,
                         max_bytes=max_bytes, payload_off=payload_off)
        rec.subscribers = tuple(taking)
        return rec

    def finish(self, rec: CallRecord, status: str, seconds: float) -> None:
        """The call ended: offer its record to every tap it matches."""
        rec.status = status
        rec.seconds = seconds
        for sub in rec.subscribers:
            if sub.filter.matches(rec) and not sub.offer(rec):
                self.dropped += 1
                if self._on_drop is not None:
                    self._on_drop()


# ---------------------------------------------------------------------------------------------------
# Rendering and redaction (on the reader's side)


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("latin-1")
    return str(value)


_JSONISH_FIELD = re.compile(r'"((?:[^"\\]|\\.){1,128})"\s*:\s*("(?:[^"\\]|\\.)*"?|[^,}\]\s]*)')
_FORM_FIELD = re.compile(r"(^|[&\s?])([A-Za-z0-9_.\-]{1,128})=([^&\s]*)")
_HEADER_LINE = re.compile(r"(^|\n)([A-Za-z0-9_.\-]{1,128}):[ \t]*([^\r\n]*)")
MAX_NAMES = 4096  # secret-name verdicts remembered per settings (names come from peers: bounded)
MAX_BLOCKS = 512  # rendered header blocks remembered per settings
_SCALARS = frozenset({int, float, bool})  # JSON leaves with nothing to redact (str has its own case)


class Redactor:
    """The redaction of one :class:`TapSettings`, built once per version of the document and reused
    for every call rendered under it: the verdict per name, the rendered header blocks, and the
    fragments without which no name in a text can be secret.

    Every name :meth:`secret` calls secret contains (case-insensitively) one of :attr:`needles`: one of
    the always-redacted names, ``-bin``, or a ``Redact`` pattern. A text none of whose lower-cased
    characters contain a needle therefore has nothing to redact, and :meth:`text` returns it as it is
    without running its patterns (most strings in a payload: ids, base64, prose)."""

    __slots__ = ("_blocks", "_names", "needles", "settings")

    def __init__(self, settings: TapSettings) -> None:
        self.settings = settings
        self.needles: tuple[str, ...] = tuple(sorted({*ALWAYS_REDACTED, "-bin", *settings.redact}))
        self._names: dict[str, bool] = {}
        self._blocks: dict[bytes, dict[str, str | list[str]]] = {}

    def secret(self, name: str) -> bool:
        """Whether the value under this header, parameter or JSON field name is redacted."""
        found = self._names.get(name)
        if found is None:
            n = name.lower()
            s = self.settings
            found = n in ALWAYS_REDACTED or (n.endswith("-bin") and n not in s.allow_binary) \
                or any(p in n for p in s.redact)
            if len(self._names) >= MAX_NAMES:
                self._names.clear()
            self._names[name] = found
        return found

    def headers(self, headers: Headers) -> dict[str, str | list[str]]:
        """Headers as a JSON object (repeated names as lists), secret values replaced by ``[redacted]``.

        A raw block already rendered under these settings is not decoded again (the result is shared:
        callers only serialize it)."""
        if isinstance(headers, HeaderBlock):
            done = self._blocks.get(headers.raw)
            if done is None:
                try:
                    pairs = headers.decode(headers.raw)
                except (ValueError, IndexError):  # a header block the decoder cannot read
                    pairs = [("weft-tap", "unreadable header block")]
                done = self._pairs(pairs)
                if len(self._blocks) >= MAX_BLOCKS:
                    self._blocks.clear()
                self._blocks[headers.raw] = done
            return done
        return self._pairs(headers)

    def _pairs(self, pairs: Sequence[tuple[Any, Any]]) -> dict[str, str | list[str]]:
        out: dict[str, str | list[str]] = {}
        for raw_name, raw_value in pairs:
            name = raw_name.decode("latin-1").lower() if raw_name.__class__ is bytes else _text(raw_name).lower()
            if self.secret(name):
                value = REDACTED
            else:
                value = raw_value.decode("latin-1") if raw_value.__class__ is bytes else _text(raw_value)
            prev = out.get(name)
            if prev is None:
                out[name] = value
            elif isinstance(prev, list):
                prev.append(value)
            else:
                out[name] = [prev, value]
        return out

    def path(self, path: str) -> str:
        """An HTTP path whose query parameters with secret names have their values redacted."""
        base, sep, query = path.partition("?")
        if not sep:
            return path
        parts = []
        for item in query.split("&"):
            name, eq, _ = item.partition("=")
            parts.append(f"{name}={REDACTED}" if eq and self.secret(unquote(name)) else item)
        return base + "?" + "&".join(parts)

    def json(self, value: Any, depth: int = 0) -> Any:
        """A JSON value with every field whose name is secret replaced by ``[redacted]`` (recursively)."""
        if depth > 64:
            return REDACTED  # deeper than any sane message: redact rather than recurse without bound
        if isinstance(value, str):
            return self._string(value)
        if isinstance(value, dict):
            secret = self.secret
            out: dict[Any, Any] = {}
            for k, v in value.items():
                if secret(k if k.__class__ is str else str(k)):
                    out[k] = REDACTED
                elif v.__class__ is str:  # the common leaf, inline (as _string)
                    out[k] = self.text(v) if len(v) > 2 and ("=" in v or ":" in v) else v
                else:
                    out[k] = v if v is None or v.__class__ in _SCALARS else self.json(v, depth + 1)
            return out
        if isinstance(value, list):
            return [self.json(v, depth + 1) for v in value]
        return value

    def _string(self, value: str) -> str:
        if len(value) > 2 and ("=" in value or ":" in value):
            return self.text(value)  # a string field may carry JSON, a form or headers as text
        return value

    def may_hide(self, text: str) -> bool:
        """Whether the text contains a needle (else no name in it is secret: nothing to redact)."""
        low = text.lower()
        return any(map(low.__contains__, self.needles))

    def text(self, text: str) -> str:
        """Text that could not be parsed (e.g. JSON cut at MaxBytes), or a string inside JSON: secret
        ``"name": value``, ``name=value`` and ``Name: value`` (header line) pairs are redacted by pattern,
        so a truncated body or an echoed request cannot leak them."""
        return self.substitute(text) if self.may_hide(text) else text

    def substitute(self, text: str) -> str:
        """:meth:`text` without the needle check: every pattern run over the text."""
        secret = self.secret

        def field_sub(m: re.Match[str]) -> str:
            return f'"{m.group(1)}": "{REDACTED}"' if secret(m.group(1)) else m.group(0)

        def form_sub(m: re.Match[str]) -> str:
            return f"{m.group(1)}{m.group(2)}={REDACTED}" if secret(m.group(2)) else m.group(0)

        def line_sub(m: re.Match[str]) -> str:
            return f"{m.group(1)}{m.group(2)}: {REDACTED}" if secret(m.group(2)) else m.group(0)

        return _HEADER_LINE.sub(line_sub, _FORM_FIELD.sub(form_sub, _JSONISH_FIELD.sub(field_sub, text)))


_REDACTORS: dict[TapSettings, Redactor] = {}  # a few settings in use at once (one per document version)
_LAST_REDACTOR: list[Redactor] = [Redactor(OFF)]


def redactor_for(settings: TapSettings) -> Redactor:
    """The redactor of these settings (the same object for equal settings, bounded)."""
    last = _LAST_REDACTOR[0]
    if last.settings is settings:  # the common case: the same settings object as last time, no hashing
        return last
    found = _REDACTORS.get(settings)
    if found is None:
        if len(_REDACTORS) >= 8:
            _REDACTORS.clear()
        found = _REDACTORS[settings] = Redactor(settings)
    _LAST_REDACTOR[0] = found
    return found


def secret_name(name: str, settings: TapSettings) -> bool:
    """Whether the value under this header, parameter or JSON field name is redacted."""
    return redactor_for(settings).secret(name)


def redact_headers(headers: Headers, settings: TapSettings) -> dict[str, str | list[str]]:
    """See :meth:`Redactor.headers`."""
    return redactor_for(settings).headers(headers)


def redact_path(path: str, settings: TapSettings) -> str:
    return redactor_for(settings).path(path)


def redact_json(value: Any, settings: TapSettings) -> Any:
    return redactor_for(settings).json(value)


def redact_text(text: str, settings: TapSettings) -> str:
    return redactor_for(settings).text(text)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # control characters but tab, CR and LF
_JSON_START = frozenset('{["-0123456789tfnNI')  # what json.loads accepts first (after white space)


def _textual(data: bytes) -> str | None:
    """The data as text when it is UTF-8 without control characters (a cut last character is fine)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        try:
            text = codecs.getincrementaldecoder("utf-8")().decode(data, final=False)  # keeps a cut tail back
        except UnicodeDecodeError:
            return None
    if _CONTROL.search(text) is not None:
        return None
    return text


def _preview(data: bytes, redactor: Redactor) -> dict[str, Any]:
    text = _textual(data)
    if text is None:
        return {"base64": base64.b64encode(data).decode()}
    if text.lstrip(" \t\n\r")[:1] in _JSON_START:  # anything else is not JSON: no parse attempt
        try:
            return {"json": redactor.json(json.loads(text))}
        except ValueError:
            pass
    return {"text": redactor.text(text)}


def preview_bytes(data: bytes, settings: TapSettings) -> dict[str, Any]:
    """A preview of an opaque body: redacted JSON, else redacted text, else base64."""
    return _preview(data, redactor_for(settings))


def grpc_messages(data: bytes) -> list[tuple[bool, bytes, bool]]:
    """(compressed, message bytes, complete) for each length-prefixed message in a captured prefix."""
    n = len(data)
    if n >= 5 and int.from_bytes(data[1:5], "big") == n - 5:  # one whole message (a unary call's)
        return [(data[0] == 1, data[5:], True)]
    out: list[tuple[bool, bytes, bool]] = []
    i = 0
    while i < n:
        if len(data) - i < 5:
            out.append((False, data[i:], False))
            break
        compressed = data[i] == 1
        length = int.from_bytes(data[i + 1:i + 5], "big")
        body = data[i + 5:i + 5 + length]
        out.append((compressed, body, len(body) == length))
        i += 5 + length
    return out


def _grpc_preview(method: str, is_request: bool, data: bytes, redactor: Redactor,
                  decoder: Decoder | None) -> list[dict[str, Any]]:
    previews: list[dict[str, Any]] = []
    for compressed, body, complete in grpc_messages(data):
        entry: dict[str, Any] = {"bytes": len(body)}
        if not complete:
            entry["truncated"] = True
        decoded: Any = None
        if decoder is not None and complete and not compressed:
            try:
                decoded = decoder(method, is_request, body)
            except Exception:  # a message that does not parse as its declared type: shown raw instead
                decoded = None
        if decoded is not None:
            entry["json"] = redactor.json(decoded)
        elif compressed:
            entry["compressed"] = True
            entry["base64"] = base64.b64encode(body).decode()
        else:
            entry.update(_preview(body, redactor))
        previews.append(entry)
    return previews


def grpc_preview(method: str, is_request: bool, data: bytes, settings: TapSettings,
                 decoder: Decoder | None) -> list[dict[str, Any]]:
    return _grpc_preview(method, is_request, data, redactor_for(settings), decoder)


_SECOND: list[Any] = [-1, ""]  # (whole second, its "YYYY-MM-DDTHH:MM:SS"): calls come many a second


def timestamp(at: float) -> str:
    """``2026-01-02T03:04:05.678Z`` (UTC, milliseconds) of a time.time() value."""
    whole = int(at)
    if whole != _SECOND[0]:
        _SECOND[:] = [whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))]
    return f"{_SECOND[1]}.{int(at * 1000) % 1000:03d}Z"


def render(rec: CallRecord, settings: TapSettings, decoder: Decoder | None = None) -> dict[str, Any]:
    """The JSON object of one tap line, redacted."""
    redactor = redactor_for(settings)
    out: dict[str, Any] = {
        "ts": timestamp(rec.at),
        "direction": rec.direction, "source": rec.source, "destination": rec.destination,
        "protocol": rec.protocol, "method": rec.method, "status": rec.status,
        "duration_ms": round(rec.seconds * 1000.0, 3),
        "request": {"headers": redactor.headers(rec.request_headers), "bytes": rec.request_bytes},
        "response": {"headers": redactor.headers(rec.response_headers),
                     "trailers": redactor.headers(rec.trailers), "bytes": rec.response_bytes},
    }
    if rec.protocol == "http":
        out["path"] = redactor.path(rec.path)
    if rec.payload_off:
        out["payload"] = f"off for {rec.destination if rec.direction == 'inbound' else rec.source} " \
                         f"(enable with KV {TAP_PREFIX}<service> {{\"Payload\": true}})"
    for side, body, is_request in (("request", rec.request_body, True), ("response", rec.response_body, False)):
        if body is None:
            continue
        data = bytes(body)
        total = rec.request_bytes if is_request else rec.response_bytes
        if rec.protocol == "grpc":
            out[side]["messages"] = _grpc_preview(rec.method, is_request, data, redactor, decoder)
        elif data:
            out[side]["body"] = {**_preview(data, redactor), **({"truncated": True} if total > len(data) else {})}
    return out


def json_line(value: Any) -> bytes:
    """One NDJSON line (compact JSON, UTF-8, newline-terminated): orjson, several times faster than
    json.dumps on the tap's records; json.dumps for what orjson refuses (integers beyond 64 bits or
    lone surrogates from a parsed body, non-string keys from a decoder)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(value, separators=(",", ":")).encode() + b"\n"


@dataclass
class TapStream:
    """The reader's side of one tap: renders what its subscriber queued and knows when to stop."""

    subscriber: Subscriber
    settings: Callable[[], TapSettings]
    decoder: Decoder | None = None
    sent: int = 0
    _reported_drops: int = field(default=0)
    _reported_skips: int = field(default=0)

    def lines(self) -> list[bytes]:
        """The NDJSON lines ready now (at most up to the filter's limit)."""
        out: list[bytes] = []
        settings = self.settings()
        limit = self.subscriber.filter.limit
        for rec in self.subscriber.take():
            if limit is not None and self.sent >= limit:
                break
            out.append(json_line(render(rec, settings, self.decoder)))
            self.sent += 1
        if self.subscriber.dropped > self._reported_drops and not self.done:
            # the reader fell behind: tell it how many calls it did not see
            out.append(json.dumps({"dropped": self.subscriber.dropped - self._reported_drops}).encode() + b"\n")
            self._reported_drops = self.subscriber.dropped
        if self.subscriber.skipped > self._reported_skips and not self.done and out:
            # calls above max_rps were not recorded: say so with the next calls shown
            out.append(json.dumps({"skipped": self.subscriber.skipped - self._reported_skips,
                                   "max_rps": self.subscriber.filter.max_rps}).encode() + b"\n")
            self._reported_skips = self.subscriber.skipped
        return out

    @property
    def done(self) -> bool:
        limit = self.subscriber.filter.limit
        return limit is not None and self.sent >= limit
