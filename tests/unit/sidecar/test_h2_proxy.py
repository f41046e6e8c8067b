"""The proxy on top of the state machine (sidecar.h2_proxy), with in-memory transports: an app
connection and an upstream connection driven frame by frame, no sockets."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hpack import Encoder

from sidecar import h2_proxy as hp
from sidecar.h2.frames import (
    DATA,
    E_CANCEL,
    E_INTERNAL,
    E_REFUSED,
    F_ACK,
    F_END_HEADERS,
    F_END_STREAM,
    HEADERS,
    PREFACE,
    RST_STREAM,
    S_INITIAL_WINDOW,
    S_MAX_CONCURRENT,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
    settings_frame,
)
from sidecar.limits import Limits
from sidecar.telemetry import Telemetry
from tests.integration.sidecar.harness import Authority, snapshot
from tests.unit.sidecar.h2peer import split

U32 = struct.Struct(">I")
BIG = 2**31 - 1


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def take(self) -> list[tuple[int, int, int, bytes]]:
        got = split(bytes(self.out))
        self.out.clear()
        return got

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, key: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if key == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class Pool:
    name = "api"

    def __init__(self) -> None:
        self.endpoints = {"ep": object()}

    def pick(self, exclude: str = "") -> str:
        return "ep"

    def release(self, key: str) -> None:
        pass

    def observe(self, key: str, ok: bool, seconds: float) -> None:
        pass


class Outbound:
    def __init__(self, limits: Limits) -> None:
        self.snap = snapshot("web", Authority.root().leaf("web"), upstreams={"api": (1, [2], "grpc")})
        self.telemetry = Telemetry(access_per_second=0, access_sample=0)
        self.draining = False
        self.limits = limits
        self.max_message_bytes = 4 << 20

    def snapshot(self) -> Any:
        return self.snap


def block(headers: list[tuple[str, str]]) -> bytes:
    enc = Encoder()
    enc.header_table_size = 0
    return bytes(enc.encode(headers))


REQUEST = block([(":method", "POST"), (":scheme", "http"), (":path", "/pkg.Svc/Call"), (":authority", "x"),
                 ("content-type", "application/grpc"), ("te", "trailers")])
RESPONSE = block([(":status", "200"), ("content-type", "application/grpc")])
TRAILERS = block([("grpc-status", "0")])
MSG = b"\x00" + U32.pack(5) + b"hello"


class Rig:
    """An H2Outbound with one app connection and one upstream connection, both in memory."""

    def __init__(self, limits: Limits, *, app_window: int = BIG, up_settings: list[tuple[int, int]] | None = None,
                 up_ready: bool = True) -> None:
        self.proxy = hp.H2Outbound(Outbound(limits), Pool())
        self.up = hp.UpConn(self.proxy, "ep", self.proxy._out.snap.credentials.generation)
        self.up_t = Transport()
        self.up.connection_made(self.up_t)
        self.proxy.ups["ep"] = self.up
        self.proxy.all_ups.add(self.up)
        self.proxy._up = lambda key: self.up  # type: ignore[method-assign]
        if up_ready:
            self.up_settings(up_settings or [(S_INITIAL_WINDOW, BIG)])
        self.up.start()
        self.app = hp.AppConn(self.proxy)
        self.app_t = Transport()
        self.app.connection_made(self.app_t)
        self.app_in(PREFACE + settings_frame([(S_INITIAL_WINDOW, app_window)]) + frame(SETTINGS, F_ACK, 0))
        self.app_t.take()
        self.up_t.take()

    def up_settings(self, pairs: list[tuple[int, int]]) -> None:
        window = frame(WINDOW_UPDATE, 0, 0, U32.pack(BIG - 65535))
        self.up_in(settings_frame(pairs) + window + frame(SETTINGS, F_ACK, 0))

    def app_in(self, data: bytes) -> None:
        self.app.data_received(data)

    def up_in(self, data: bytes) -> None:
        self.up.data_received(data)
        self.proxy.flush()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    yield Rig(Limits())


def kinds(frames: list[tuple[int, int, int, bytes]]) -> list[tuple[int, int, int]]:
    return [(t, sid, f) for t, f, sid, _ in frames]


async def test_a_call_is_forwarded_and_answered(rig: Rig) -> None:
    rig.app_in(frame(HEADERS, F_END_HEADERS, 1, REQUEST) + frame(DATA, F_END_STREAM, 1, MSG))
    assert kinds(rig.up_t.take()) == [(HEADERS, 1, F_END_HEADERS), (DATA, 1, F_END_STREAM)]
    rig.up_in(frame(HEADERS, F_END_HEADERS, 1, RESPONSE) + frame(DATA, 0, 1, MSG)
              + frame(HEADERS, F_END_HEADERS | F_END_STREAM, 1, TRAILERS))
    assert kinds(rig.app_t.take()) == [(HEADERS, 1, F_END_HEADERS), (DATA, 1, 0),
                                       (HEADERS, 1, F_END_HEADERS | F_END_STREAM)]
    assert not rig.app.streams and not rig.up.streams


async def test_a_client_reset_cancels_the_upstream_stream_at_once(rig: Rig) -> None:
    rig.app_in(frame(HEADERS, F_END_HEADERS, 1, REQUEST))
    rig.up_t.take()
    rig.app_in(frame(RST_STREAM, 0, 1, U32.pack(E_CANCEL)))
    got = rig.up_t.take()
    assert [(t, sid, U32.unpack(p)[0]) for t, _, sid, p in got] == [(RST_STREAM, 1, E_CANCEL)]
    assert not rig.up.streams


async def test_data_queued_for_a_reset_call_is_credited_to_the_shared_connection() -> None:
    rig = Rig(Limits(), app_window=0)  # the app grants no stream window: responses queue
    rig.app_in(frame(HEADERS, F_END_HEADERS | F_END_STREAM, 1, REQUEST))
    rig.up_in(frame(HEADERS, F_END_HEADERS, 1, RESPONSE) + frame(DATA, 0, 1, b"\x00" + U32.pack(9995) + b"x" * 9995))
    st = next(iter(rig.up.streams.values())).call
    assert sum(len(item) for _, item, _ in st.q_app) == 10000
    before = rig.up.recv_unacked
    rig.app_in(frame(RST_STREAM, 0, 1, U32.pack(E_CANCEL)))
    assert rig.up.recv_unacked == before + 10000  # the upstream connection's window is whole again


async def test_client_trailers_wait_behind_queued_data() -> None:
    rig = Rig(Limits(), up_settings=[(S_INITIAL_WINDOW, 3)])  # the upstream takes 3 bytes per stream
    rig.app_in(frame(HEADERS, F_END_HEADERS, 1, REQUEST) + frame(DATA, 0, 1, MSG)
               + frame(HEADERS, F_END_HEADERS | F_END_STREAM, 1, block([("x-trailer", "1")])))
    assert kinds(rig.up_t.take()) == [(HEADERS, 1, F_END_HEADERS), (DATA, 1, 0)]
    rig.up_in(frame(WINDOW_UPDATE, 0, 1, U32.pack(100)))
    assert kinds(rig.up_t.take()) == [(DATA, 1, 0), (HEADERS, 1, F_END_HEADERS | F_END_STREAM)]


async def test_the_upstreams_concurrency_limit_queues_calls() -> None:
    rig = Rig(Limits(), up_settings=[(S_INITIAL_WINDOW, BIG), (S_MAX_CONCURRENT, 1)])
    rig.app_in(frame(HEADERS, F_END_HEADERS | F_END_STREAM, 1, REQUEST)
               + frame(HEADERS, F_END_HEADERS | F_END_STREAM, 3, REQUEST))
    assert kinds(rig.up_t.take()) == [(HEADERS, 1, F_END_HEADERS | F_END_STREAM)]
    rig.up_in(frame(HEADERS, F_END_HEADERS | F_END_STREAM, 1, block([(":status", "200"), ("grpc-status", "0")])))
    assert kinds(rig.up_t.take()) == [(HEADERS, 3, F_END_HEADERS | F_END_STREAM)]


async def test_a_refused_stream_is_sent_again_with_its_data() -> None:
    rig = Rig(Limits())
    rig.app_in(frame(HEADERS, F_END_HEADERS, 1, REQUEST) + frame(DATA, F_END_STREAM, 1, MSG))
    rig.up_t.take()
    rig.up_in(frame(RST_STREAM, 0, 1, U32.pack(E_REFUSED)))
    again = rig.up_t.take()
    assert kinds(again) == [(HEADERS, 3, F_END_HEADERS), (DATA, 3, F_END_STREAM)]
    assert again[1][3] == MSG
    assert rig.up.soft_limit == 1  # no more at once than the upstream had when it refused
    assert not [f for f in rig.app_t.take() if f[0] == RST_STREAM]


async def test_a_bug_in_one_calls_handling_resets_that_call_only(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    rig.app_in(frame(HEADERS, F_END_HEADERS, 1, REQUEST) + frame(HEADERS, F_END_HEADERS, 3, REQUEST))
    rig.up_t.take()
    original = rig.proxy.to_upstream

    def buggy(st: hp.Stream, data: bytes, end: bool) -> None:
        if st.a.sid == 1:
            raise RuntimeError("a bug")
        original(st, data, end)

    monkeypatch.setattr(rig.proxy, "to_upstream", buggy)
    rig.app_in(frame(DATA, 0, 1, MSG) + frame(DATA, F_END_STREAM, 3, MSG))
    to_app = rig.app_t.take()
    assert [(sid, U32.unpack(p)[0]) for t, _, sid, p in to_app if t == RST_STREAM] == [(1, E_INTERNAL)]
    up = rig.up_t.take()
    assert (RST_STREAM, 1, 0) in kinds(up) and (DATA, 3, F_END_STREAM) in kinds(up)  # cancelled; 3 goes on
    assert not rig.app.dead and 3 in rig.app.streams


async def test_settings_timeout_ends_the_connection_with_goaway() -> None:
    rig = Rig(Limits(h2_settings_timeout=0.1))
    app = hp.AppConn(rig.proxy)
    t = Transport()
    app.connection_made(t)
    app.data_received(PREFACE + settings_frame([]))  # never acknowledges ours
    await asyncio.sleep(0.2)
    frames = t.take()
    assert frames[-1][0] == 7 and U32.unpack_from(frames[-1][3], 4)[0] == 4 and t.closed  # GOAWAY SETTINGS_TIMEOUT


async def test_a_refused_stream_sends_every_chunk_again_and_the_app_window_is_not_given_twice() -> None:
    rig = Rig(Limits())
    rig.app_in(frame(HEADERS, F_END_HEADERS, 1, REQUEST) + frame(DATA, 0, 1, MSG[:4]) + frame(DATA, 0, 1, MSG[4:]))
    rig.up_t.take()
    credited = rig.app.recv_unacked
    rig.up_in(frame(RST_STREAM, 0, 1, U32.pack(E_REFUSED)))
    again = rig.up_t.take()
    assert kinds(again) == [(HEADERS, 3, F_END_HEADERS), (DATA, 3, 0), (DATA, 3, 0)]
    assert b"".join(p for t, _, _, p in again if t == DATA) == MSG
    assert rig.app.recv_unacked == credited  # what the app sent was given back once, not twice
    rig.app_in(frame(DATA, F_END_STREAM, 1, b""))
    assert kinds(rig.up_t.take()) == [(DATA, 3, F_END_STREAM)]


async def test_a_shared_upstream_connection_is_retired_before_relayed_resets_spend_the_peers_budget() -> None:
    """A client's rapid resets are relayed as RST_STREAM(CANCEL) on the upstream connection other callers
    share; past half of the peer's reset budget that connection takes no new stream (a fresh one does),
    so the peer never ends it for rapid reset, and the calls on it finish there."""
    rig = Rig(Limits(h2_reset_burst=6, h2_reset_rate=0.0))
    old = rig.up
    fresh = hp.UpConn(rig.proxy, "ep", old.generation)
    fresh_t = Transport()
    fresh.connection_made(fresh_t)
    fresh.data_received(settings_frame([]) + frame(SETTINGS, F_ACK, 0))
    fresh.start()
    fresh_t.take()

    def up_for(key: str) -> hp.UpConn:
        if key not in rig.proxy.ups:
            rig.proxy.ups[key] = fresh
            rig.proxy.all_ups.add(fresh)
        return rig.proxy.ups[key]

    rig.proxy._up = up_for  # type: ignore[method-assign]
    rig.app_in(frame(HEADERS, F_END_HEADERS, 1, REQUEST))  # another caller's call, open on the shared connection
    for sid in (3, 5, 7, 9):  # HEADERS + RST_STREAM: each relayed, then cancelled upstream at once
        rig.app_in(frame(HEADERS, F_END_HEADERS, sid, REQUEST) + frame(RST_STREAM, 0, sid, U32.pack(E_CANCEL)))
    relayed = rig.up_t.take()
    assert [sid for t, _, sid, _ in relayed if t == HEADERS] == [1, 3, 5, 7, 9]
    assert [(sid, U32.unpack(p)[0]) for t, _, sid, p in relayed if t == RST_STREAM] == [
        (3, E_CANCEL), (5, E_CANCEL), (7, E_CANCEL), (9, E_CANCEL)]
    assert old.peer_reset_tokens == 2.0 and old.retired and "ep" not in rig.proxy.ups
    assert not rig.up_t.closed and list(old.streams) == [1]
    rig.app_in(frame(HEADERS, F_END_HEADERS | F_END_STREAM, 11, REQUEST))  # a new call: the fresh connection
    assert kinds(fresh_t.take()) == [(HEADERS, 1, F_END_HEADERS | F_END_STREAM)] and not rig.up_t.take()
    rig.up_in(frame(HEADERS, F_END_HEADERS, 1, RESPONSE) + frame(DATA, 0, 1, MSG)
              + frame(HEADERS, F_END_HEADERS | F_END_STREAM, 1, TRAILERS))
    assert (HEADERS, 1, F_END_HEADERS | F_END_STREAM) in kinds(rig.app_t.take())  # the open call finished there
    assert rig.up_t.closed  # and the retired connection closed after its last stream
