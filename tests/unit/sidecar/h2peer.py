"""Helpers for the HTTP/2 state-machine tests: a recording connection and a frame splitter."""

from __future__ import annotations

from typing import Any

from hpack import Encoder

from sidecar.h2.connection import H2Connection, H2Stream
from sidecar.h2.frames import (
    DATA,
    F_END_HEADERS,
    F_END_STREAM,
    HEADER,
    HEADERS,
    PREFACE,
    SETTINGS,
    frame,
    settings_frame,
)
from sidecar.limits import Limits

REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/pkg.Svc/Call"), (":authority", "x"),
           ("content-type", "application/grpc"), ("te", "trailers")]


def block(headers: list[tuple[str, str]] = REQUEST) -> bytes:
    enc = Encoder()
    enc.header_table_size = 0
    return bytes(enc.encode(headers))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Recorder(H2Connection):
    """Records every hook and everything sent."""

    def __init__(self, limits: Limits | None = None, *, client: bool = False, clock: Clock | None = None) -> None:
        super().__init__(limits or Limits(), client=client, clock=clock or Clock())
        self.out = bytearray()
        self.events: list[tuple[Any, ...]] = []
        self.reasons: list[str] = []
        self.fail_on: str = ""  # a hook name that raises, to test that one stream's bug stays in it

    def send(self, data: bytes) -> None:
        self.out += data

    def take(self) -> list[tuple[int, int, int, bytes]]:
        got = split(bytes(self.out))
        self.out.clear()
        return got

    def counted(self, reason: str) -> None:
        self.reasons.append(reason)

    def _hook(self, name: str, *args: Any) -> None:
        self.events.append((name, *args))
        if self.fail_on == name:
            raise RuntimeError(f"bug in {name}")

    def on_request(self, s: H2Stream, flags: int, block: bytes) -> None:
        self._hook("request", s.sid, flags & F_END_STREAM, block)

    def on_headers(self, s: H2Stream, flags: int, block: bytes) -> None:
        self._hook("headers", s.sid, flags & F_END_STREAM, block)

    def on_oversized(self, s: H2Stream, flags: int, prefix: bytes, size: int) -> None:
        self._hook("oversized", s.sid, len(prefix), size)
        self.reset(s, 7)

    def on_data(self, s: H2Stream, end: int, data: bytes) -> None:
        self._hook("data", s.sid, end, data)

    def on_reset(self, s: H2Stream, code: int) -> None:
        self._hook("reset", s.sid, code)

    def on_writable(self, s: H2Stream) -> None:
        self._hook("writable", s.sid)

    def on_goaway(self, last_sid: int, code: int) -> None:
        self._hook("goaway", last_sid, code)

    def on_peer_settings(self, first: bool) -> None:
        self._hook("settings", first)

    def on_peer_resets_low(self) -> None:
        self.events.append(("peer_resets_low",))

    def on_stream_error(self, s: H2Stream, code: int, reason: str, exc: BaseException | None) -> None:
        self.events.append(("stream_error", s.sid, code, reason))

    def on_connection_error(self, code: int, reason: str, detail: str) -> None:
        self.events.append(("connection_error", code, reason))


def split(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out = []
    i = 0
    if data.startswith(PREFACE):
        i = len(PREFACE)
    while len(data) - i >= 9:
        hi, lo, typ, flags, sid = HEADER.unpack_from(data, i)
        n = (hi << 16) | lo
        out.append((typ, flags, sid, data[i + 9:i + 9 + n]))
        i += 9 + n
    return out


def server(limits: Limits | None = None, clock: Clock | None = None) -> Recorder:
    """A server-side connection past the preface and the first SETTINGS, output cleared."""
    conn = Recorder(limits, clock=clock)
    conn.preamble()
    conn.receive(PREFACE + settings_frame([]))
    conn.out.clear()
    conn.events.clear()
    return conn


def open_stream(conn: Recorder, sid: int, *, end: bool = False) -> None:
    conn.receive(frame(HEADERS, F_END_HEADERS | (F_END_STREAM if end else 0), sid, block()))


__all__ = ["DATA", "SETTINGS", "Clock", "Recorder", "block", "open_stream", "server", "split"]
