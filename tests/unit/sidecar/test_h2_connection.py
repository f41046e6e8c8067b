"""The HTTP/2 state machine frame by frame: scripted input, the frames it answers and the hooks it calls."""

from __future__ import annotations

import struct

import pytest

from sidecar.h2.frames import (
    CONTINUATION,
    DATA,
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
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    PRIORITY,
    PUSH_PROMISE,
    RST_STREAM,
    S_ENABLE_PUSH,
    S_INITIAL_WINDOW,
    S_MAX_CONCURRENT,
    S_MAX_FRAME,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
    settings_frame,
)
from sidecar.limits import Limits
from tests.unit.sidecar.h2peer import Clock, Recorder, block, open_stream, server, split

U32 = struct.Struct(">I")


def goaway_code(frames: list[tuple[int, int, int, bytes]]) -> int | None:
    for typ, _, _, payload in frames:
        if typ == GOAWAY:
            return int(U32.unpack_from(payload, 4)[0])
    return None


def rst_codes(frames: list[tuple[int, int, int, bytes]]) -> dict[int, int]:
    return {sid: int(U32.unpack(p)[0]) for typ, _, sid, p in frames if typ == RST_STREAM}


def wu(sid: int, inc: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, sid, U32.pack(inc))


# -- the preface and SETTINGS ----------------------------------------------------------------------

def test_preamble_advertises_the_limits() -> None:
    conn = Recorder(Limits(h2_max_concurrent_streams=7))
    frames = split(conn.preamble())
    assert frames[0][0] == SETTINGS
    pairs = dict(struct.unpack(">HI", frames[0][3][i:i + 6]) for i in range(0, len(frames[0][3]), 6))
    assert pairs[S_MAX_CONCURRENT] == 7 and pairs[S_ENABLE_PUSH] == 0 and pairs[1] == 0
    assert frames[1][0] == WINDOW_UPDATE


def test_bad_preface_and_a_first_frame_other_than_settings_are_protocol_errors() -> None:
    conn = Recorder()
    conn.receive(b"GET / HTTP/1.1\r\n\r\n")
    assert goaway_code(conn.take()) == E_PROTOCOL and conn.dead
    conn = Recorder()
    conn.receive(PREFACE[:10])  # partial preface: waits
    assert not conn.dead and not conn.out
    conn.receive(PREFACE[10:] + frame(PING, 0, 0, b"8 bytes!"))
    assert goaway_code(conn.take()) == E_PROTOCOL


def test_settings_validated_per_rfc_9113_6_5_2() -> None:
    for pairs, code in [([(S_MAX_FRAME, 0)], E_PROTOCOL), ([(S_MAX_FRAME, 2**24)], E_PROTOCOL),
                        ([(S_INITIAL_WINDOW, 2**31)], E_FLOW), ([(S_ENABLE_PUSH, 2)], E_PROTOCOL)]:
        conn = server()
        conn.receive(settings_frame(pairs))
        assert goaway_code(conn.take()) == code, pairs
    conn = server()
    conn.receive(frame(SETTINGS, 0, 0, b"\x00" * 5))
    assert goaway_code(conn.take()) == E_FRAME_SIZE
    conn = server()
    conn.receive(frame(SETTINGS, F_ACK, 0, b"\x00" * 6))
    assert goaway_code(conn.take()) == E_FRAME_SIZE
    conn = server()
    conn.receive(settings_frame([(S_MAX_FRAME, 16384 * 2), (99, 1)]))  # unknown ids are ignored
    assert conn.peer_max_frame == 32768 and [f[:2] for f in conn.take()] == [(SETTINGS, F_ACK)]


def test_settings_ack_goes_before_data_sent_under_a_raised_initial_window() -> None:
    conn = server()
    conn.receive(settings_frame([(S_INITIAL_WINDOW, 0)]))
    open_stream(conn, 1)
    s = conn.streams[1]
    conn.take()
    assert conn.send_data(s, b"x" * 10, True) == 0 and s in conn.blocked

    def writable(st: object) -> None:  # the proxy's reaction: send what waited
        conn.send_data(s, b"x" * 10, True)

    conn.on_writable = writable  # type: ignore[method-assign,assignment]
    conn.receive(settings_frame([(S_INITIAL_WINDOW, 100)]))
    assert [(t, f) for t, f, _, _ in conn.take()] == [(SETTINGS, F_ACK), (DATA, F_END_STREAM)]


# -- frame sizes and header blocks -----------------------------------------------------------------

def test_a_frame_above_the_max_frame_size_is_refused_from_its_header() -> None:
    conn = server()
    conn.receive(frame(DATA, 0, 1, b"")[:3].replace(b"\x00\x00\x00", b"\x10\x00\x00") + b"\x00\x00\x00\x00\x01"
                 + b"x" * 100)  # a 1 MiB DATA frame announced; only its start arrives
    assert goaway_code(conn.take()) == E_FRAME_SIZE
    assert len(conn.buf) == 0


def test_continuation_frames_are_counted_and_bounded() -> None:
    limits = Limits(h2_max_continuation_frames=4)
    conn = server(limits)
    conn.receive(frame(HEADERS, 0, 1, block()[:3]))
    for _ in range(4):
        conn.receive(frame(CONTINUATION, 0, 1, b"\x00" * 10))
    assert not conn.dead
    conn.receive(frame(CONTINUATION, 0, 1, b"\x00" * 10))
    assert goaway_code(conn.take()) == E_CALM and conn.reasons == ["continuation_flood"]


def test_an_oversized_header_block_is_counted_and_discarded_not_buffered() -> None:
    limits = Limits(h2_max_header_block_size=4096, h2_max_continuation_frames=100)
    conn = server(limits)
    conn.receive(frame(HEADERS, 0, 1, b"\x00" * 16000))
    for _ in range(5):
        conn.receive(frame(CONTINUATION, 0, 1, b"\x00" * 16000))
        assert len(conn._hdr_frags) <= 4096
    conn.receive(frame(CONTINUATION, F_END_HEADERS, 1, b"\x00" * 100))
    assert conn.events == [("oversized", 1, 4096, 6 * 16000 + 100)]
    assert not conn.dead  # the stream is refused, the connection stays
    open_stream(conn, 3)
    assert conn.events[-1][:2] == ("request", 3)


def test_a_header_block_interrupted_by_another_frame_is_a_protocol_error() -> None:
    conn = server()
    conn.receive(frame(HEADERS, 0, 1, block()[:4]) + frame(PING, 0, 0, b"12345678"))
    assert goaway_code(conn.take()) == E_PROTOCOL
    conn = server()
    conn.receive(frame(CONTINUATION, F_END_HEADERS, 1, b""))
    assert goaway_code(conn.take()) == E_PROTOCOL


# -- stream ids and states ---------------------------------------------------------------------------

@pytest.mark.parametrize("sids,reason", [([2], "even_stream_id"), ([5, 3], "stream_id_reused")])
def test_bad_client_stream_ids_are_protocol_errors(sids: list[int], reason: str) -> None:
    conn = server()
    for sid in sids:
        open_stream(conn, sid, end=True)
    assert goaway_code(conn.take()) == E_PROTOCOL and conn.reasons == [reason]


def test_a_closed_stream_id_cannot_open_again() -> None:
    conn = server()
    open_stream(conn, 1, end=True)
    s = conn.streams[1]
    conn.send_headers(s, block([(":status", "200")]), True)
    conn.close_stream(s)
    open_stream(conn, 1)
    assert goaway_code(conn.take()) == E_PROTOCOL and conn.reasons == ["stream_id_reused"]


def test_max_concurrent_streams_is_enforced_with_refused_stream() -> None:
    conn = server(Limits(h2_max_concurrent_streams=2))
    for sid in (1, 3, 5):
        open_stream(conn, sid)
    assert rst_codes(conn.take()) == {5: E_REFUSED}
    assert sorted(conn.streams) == [1, 3] and not conn.dead
    conn.close_stream(conn.streams[1])  # a slot frees: the next stream opens
    open_stream(conn, 7)
    assert 7 in conn.streams


def test_frames_after_end_stream_are_stream_closed() -> None:
    conn = server()
    open_stream(conn, 1, end=True)
    conn.receive(frame(DATA, 0, 1, b"late"))
    assert rst_codes(conn.take()) == {1: E_STREAM_CLOSED} and not conn.dead
    conn = server()
    open_stream(conn, 1)
    conn.receive(frame(DATA, F_END_STREAM, 1, b"x"))
    conn.receive(frame(HEADERS, F_END_HEADERS | F_END_STREAM, 1, block([("grpc-status", "0")])))
    assert rst_codes(conn.take()) == {1: E_STREAM_CLOSED}


def test_frames_on_idle_streams_are_protocol_errors() -> None:
    for data in (frame(DATA, 0, 1, b"x"), wu(3, 1), frame(RST_STREAM, 0, 9, U32.pack(0))):
        conn = server()
        conn.receive(data)
        assert goaway_code(conn.take()) == E_PROTOCOL


def test_frames_on_a_stream_we_reset_are_ignored() -> None:
    conn = server()
    open_stream(conn, 1)
    conn.reset(conn.streams[1], E_REFUSED)
    conn.take()
    conn.receive(frame(DATA, 0, 1, b"in flight") + frame(HEADERS, F_END_HEADERS | F_END_STREAM, 1, block()))
    assert not conn.dead and conn.take() == []
    assert conn.recv_unacked == len(b"in flight")  # its window is given back


def test_trailers_without_end_stream_and_push_promise() -> None:
    conn = server()
    open_stream(conn, 1)
    conn.receive(frame(HEADERS, F_END_HEADERS, 1, block([("x", "y")])))
    assert rst_codes(conn.take()) == {1: E_PROTOCOL}
    conn = server()
    conn.receive(frame(PUSH_PROMISE, F_END_HEADERS, 1, b"\x00\x00\x00\x02"))
    assert goaway_code(conn.take()) == E_PROTOCOL


# -- flow control --------------------------------------------------------------------------------------

def test_window_overflow_is_a_flow_control_error() -> None:
    conn = server()
    conn.receive(wu(0, 2**31 - 1))
    assert goaway_code(conn.take()) == E_FLOW
    conn = server()
    open_stream(conn, 1)
    conn.receive(wu(1, 2**31 - 1))
    assert rst_codes(conn.take()) == {1: E_FLOW} and not conn.dead
    conn = server()
    conn.receive(wu(0, 0))
    assert goaway_code(conn.take()) == E_PROTOCOL


def test_data_beyond_the_windows_is_refused() -> None:
    limits = Limits(h2_initial_stream_window=65535, h2_connection_window=65535 * 2)
    conn = server(limits)
    open_stream(conn, 1)
    for _ in range(4):
        conn.receive(frame(DATA, 0, 1, b"x" * 16384))
    assert rst_codes(conn.take()) == {1: E_FLOW}  # 65536 > the stream's 65535
    conn = server(limits)
    for sid in (1, 3, 5):
        open_stream(conn, sid)
    for sid in (1, 3, 5):
        for _ in range(3):
            conn.receive(frame(DATA, 0, sid, b"x" * 16000))
    assert goaway_code(conn.take()) == E_FLOW and conn.reasons == ["connection_window_exceeded"]


def test_padding_counts_against_the_window_and_is_given_back() -> None:
    conn = server()
    open_stream(conn, 1)
    before = conn.recv_window
    conn.receive(frame(DATA, F_PADDED, 1, bytes([200]) + b"data" + b"\x00" * 200))
    assert conn.events[-1] == ("data", 1, 0, b"data")
    assert conn.recv_window == before - 205 and conn.recv_unacked == 201
    assert conn.streams[1].recv_unacked == 201
    conn.receive(frame(DATA, F_PADDED, 1, bytes([10]) + b"\x00" * 5))  # padding longer than the frame
    assert goaway_code(conn.take()) == E_PROTOCOL


def test_send_data_respects_windows_and_frame_size_and_wakes_only_blocked_streams() -> None:
    conn = server()
    for sid in (1, 3, 5):
        open_stream(conn, sid)
    s1, s3 = conn.streams[1], conn.streams[3]
    assert conn.send_data(s1, b"a" * 70000, False) == 65535
    frames = conn.take()
    assert [len(p) for _, _, _, p in frames] == [16384, 16384, 16384, 16383]
    assert conn.send_data(s3, b"b", False) == 0  # the connection window is spent
    assert list(conn.blocked) == [s1, s3]
    conn.events.clear()
    conn.receive(wu(0, 100))  # s1's own window is 0: only s3 is woken
    assert conn.events == [("writable", 3)]
    conn.events.clear()
    conn.receive(wu(1, 10))
    assert conn.events == [("writable", 1)]


def test_raising_the_initial_window_wakes_blocked_streams_without_touching_the_others() -> None:
    conn = server()
    conn.receive(settings_frame([(S_INITIAL_WINDOW, 0)]))
    for sid in (1, 3):
        open_stream(conn, sid)
    conn.send_data(conn.streams[3], b"x", False)
    conn.events.clear()
    conn.receive(settings_frame([(S_INITIAL_WINDOW, 10)]))
    assert ("writable", 3) in conn.events and ("writable", 1) not in conn.events
    assert conn.send_window_of(conn.streams[1]) == 10


def test_nothing_is_sent_while_the_peer_does_not_read() -> None:
    conn = server()
    open_stream(conn, 1)
    conn.take()
    conn.write_paused = True
    assert conn.send_data(conn.streams[1], b"x" * 10, False) == 0 and conn.out == b""
    conn.write_paused = False
    conn.release_blocked()
    assert ("writable", 1) in conn.events


# -- floods -----------------------------------------------------------------------------------------------

def test_control_frames_are_bounded_while_the_peer_does_not_drain() -> None:
    conn = server(Limits(h2_max_outbound_control_frames=50))
    conn.drained()  # the SETTINGS ack of server() was taken
    for _ in range(50):
        conn.receive(frame(PING, 0, 0, b"12345678"))
    assert not conn.dead
    conn.drained()  # it read: the count starts again
    for _ in range(50):
        conn.receive(frame(PING, 0, 0, b"12345678"))
    assert not conn.dead
    conn.receive(frame(PING, 0, 0, b"12345678"))
    assert conn.dead and goaway_code(split(bytes(conn.out))) == E_CALM
    assert conn.reasons == ["control_frame_flood"]


def test_empty_frames_priority_and_window_update_floods() -> None:
    conn = server()
    open_stream(conn, 1)
    conn.receive(frame(DATA, 0, 1, b""))
    conn.receive(frame(DATA, 0, 1, b"x"))  # a real frame resets the count
    conn.receive(frame(DATA, 0, 1, b""))
    assert not conn.dead
    conn.receive(frame(DATA, 0, 1, b""))
    assert goaway_code(conn.take()) == E_CALM

    conn = server(Limits(h2_max_priority_frames_per_stream=5))
    for i in range(5):
        conn.receive(frame(PRIORITY, 0, 1 + 2 * i, b"\x00\x00\x00\x00\x10"))
    assert not conn.dead
    conn.receive(frame(PRIORITY, 0, 99, b"\x00\x00\x00\x00\x10"))
    assert goaway_code(conn.take()) == E_CALM

    conn = server(Limits(h2_max_window_updates_per_data_frame=2))
    for _ in range(18):
        conn.receive(wu(0, 1))
    assert not conn.dead
    conn.receive(wu(0, 1))
    assert goaway_code(conn.take()) == E_CALM and conn.reasons == ["window_update_flood"]


def test_rapid_reset_budget() -> None:
    clock = Clock()
    conn = server(Limits(h2_reset_burst=5, h2_reset_rate=1.0), clock)
    sid = 1
    for _ in range(5):
        open_stream(conn, sid)
        conn.receive(frame(RST_STREAM, 0, sid, U32.pack(8)))
        sid += 2
    assert not conn.dead
    open_stream(conn, sid)  # a stream whose response is complete costs nothing when the client resets it
    conn.send_headers(conn.streams[sid], block([(":status", "200")]), True)
    conn.receive(frame(RST_STREAM, 0, sid, U32.pack(8)))
    sid += 2
    assert not conn.dead
    clock.now += 1.0  # the budget refills at the rate
    open_stream(conn, sid)
    conn.receive(frame(RST_STREAM, 0, sid, U32.pack(8)))
    sid += 2
    assert not conn.dead
    open_stream(conn, sid)
    conn.receive(frame(RST_STREAM, 0, sid, U32.pack(8)))
    assert goaway_code(conn.take()) == E_CALM and conn.reasons == ["rapid_reset"]
    assert ("reset", sid, 8) in conn.events  # the stream's work was cancelled before the GOAWAY


def test_a_reset_counts_until_the_response_is_complete_not_only_until_it_is_answered() -> None:
    clock = Clock()
    conn = server(Limits(h2_reset_burst=2, h2_reset_rate=0.0), clock)
    open_stream(conn, 1)  # answered (response HEADERS sent), not complete: its work goes on, so it counts
    conn.send_headers(conn.streams[1], block([(":status", "200")]), False)
    conn.receive(frame(RST_STREAM, 0, 1, U32.pack(8)))
    assert conn.reset_tokens == 1.0
    open_stream(conn, 3)  # answered and sent with END_STREAM in DATA: complete, free
    conn.send_headers(conn.streams[3], block([(":status", "200")]), False)
    conn.send_data(conn.streams[3], b"done", True)
    conn.receive(frame(RST_STREAM, 0, 3, U32.pack(8)))
    assert conn.reset_tokens == 1.0
    open_stream(conn, 5)
    conn.receive(frame(RST_STREAM, 0, 5, U32.pack(8)))
    assert not conn.dead and conn.reset_tokens == 0.0
    open_stream(conn, 7)
    conn.send_headers(conn.streams[7], block([(":status", "200")]), False)
    conn.receive(frame(RST_STREAM, 0, 7, U32.pack(8)))
    assert goaway_code(conn.take()) == E_CALM and conn.reasons == ["rapid_reset"]


def test_the_client_side_keeps_the_peers_reset_budget_for_the_resets_it_sends() -> None:
    clock = Clock()
    conn = Recorder(Limits(h2_reset_burst=6, h2_reset_rate=1.0), client=True, clock=clock)
    conn.receive(settings_frame([]))
    conn.events.clear()
    streams = [conn.open_stream() for _ in range(6)]
    done = streams.pop()  # the peer finished answering it: a reset of ours costs the peer's budget nothing
    conn.receive(frame(HEADERS, F_END_HEADERS | F_END_STREAM, done.sid, block([(":status", "200")])))
    conn.reset(done, E_NO_ERROR)
    conn.reset(streams[0], 8)
    conn.reset(streams[1], 8)  # answered (HEADERS) but not complete: counted, as the peer counts it
    conn.receive(frame(HEADERS, F_END_HEADERS, streams[2].sid, block([(":status", "200")])))
    conn.reset(streams[2], 8)
    assert conn.peer_reset_tokens == 3.0 and not conn.peer_resets_low() and conn.events == [
        ("headers", done.sid, F_END_STREAM, block([(":status", "200")])),
        ("headers", streams[2].sid, 0, block([(":status", "200")]))]
    conn.events.clear()
    conn.reset(streams[3], 8)  # 2 left of 6: under half the budget, the owner is told (and on each later one)
    assert conn.peer_resets_low() and conn.events == [("peer_resets_low",)]
    clock.now += 2.0  # refilled at the peer's rate
    conn.reset(streams[4], 8)
    assert conn.peer_reset_tokens == 3.0 and conn.events == [("peer_resets_low",)]
    assert set(rst_codes(conn.take())) == {s.sid for s in streams} | {done.sid}
    server_side = server(Limits(h2_reset_burst=2))  # a server's own resets cost nothing of this kind
    open_stream(server_side, 1)
    server_side.reset(server_side.streams[1], 8)
    assert server_side.peer_reset_tokens == 2.0 and ("peer_resets_low",) not in server_side.events


def test_refused_streams_count_against_the_reset_budget() -> None:
    conn = server(Limits(h2_max_concurrent_streams=1, h2_reset_burst=3, h2_reset_rate=0.0))
    open_stream(conn, 1)
    for sid in (3, 5, 7):
        open_stream(conn, sid)
    assert not conn.dead
    open_stream(conn, 9)
    assert conn.dead and conn.reasons[-1] == "rapid_reset"


# -- errors and GOAWAY -------------------------------------------------------------------------------------

def test_a_bug_in_one_streams_handling_resets_that_stream_only() -> None:
    conn = server()
    conn.fail_on = "data"
    open_stream(conn, 1)
    open_stream(conn, 3)
    conn.receive(frame(DATA, 0, 1, b"boom"))
    assert rst_codes(conn.take()) == {1: E_INTERNAL} and not conn.dead
    assert ("stream_error", 1, E_INTERNAL, "internal_error") in conn.events
    assert 3 in conn.streams and conn.reasons == ["internal_error"]


def test_goaway_carries_the_last_stream_and_later_streams_are_not_processed() -> None:
    conn = server()
    open_stream(conn, 1)
    open_stream(conn, 3)
    conn.take()
    conn.goaway()
    frames = conn.take()
    assert frames[0][0] == GOAWAY and U32.unpack_from(frames[0][3])[0] == 3
    assert U32.unpack_from(frames[0][3], 4)[0] == E_NO_ERROR
    conn.events.clear()
    open_stream(conn, 5)
    assert conn.events == [] and 5 not in conn.streams


def test_client_side_honours_the_peers_limits() -> None:
    conn = Recorder(client=True)
    assert conn.preamble().startswith(PREFACE)
    conn.receive(settings_frame([(S_MAX_CONCURRENT, 1)]))
    assert conn.events == [("settings", True)]
    assert conn.can_open()
    s = conn.open_stream()
    assert s.sid == 1 and not conn.can_open()
    conn.receive(frame(HEADERS, F_END_HEADERS, 2, block([(":status", "200")])))  # a server opens no streams
    assert goaway_code(conn.take()) == E_PROTOCOL
    conn = Recorder(client=True)
    conn.receive(settings_frame([]))
    conn.next_local_sid = 2**31 + 1  # ids ran out
    assert not conn.can_open()


def test_send_headers_splits_by_the_peers_max_frame_size() -> None:
    conn = server()
    open_stream(conn, 1)
    conn.take()
    conn.send_headers(conn.streams[1], b"h" * 40000, True)
    frames = conn.take()
    assert [(t, f, len(p)) for t, f, _, p in frames] == [(HEADERS, F_END_STREAM, 16384), (CONTINUATION, 0, 16384),
                                                        (CONTINUATION, F_END_HEADERS, 7232)]


def test_data_written_in_one_turn_is_capped_at_the_buffer_limit() -> None:
    conn = server(Limits(h2_max_buffered_bytes=64 * 1024, h2_connection_window=16 * 1024 * 1024))
    conn.receive(settings_frame([(S_INITIAL_WINDOW, 2**31 - 1)]) + wu(0, 2**30))
    for sid in (1, 3):
        open_stream(conn, sid)
    s1, s3 = conn.streams[1], conn.streams[3]
    assert conn.send_data(s1, b"a" * 100_000, False) == 100_000  # one call may pass the cap once
    assert conn.send_data(s3, b"b" * 10, False) == 0 and list(conn.blocked) == [s3]
    assert conn.written()  # the adapter wrote it out: s3 may go on the next turn
    conn.release_blocked()
    assert ("writable", 3) in conn.events


def test_a_server_enabling_push_is_a_protocol_error() -> None:
    conn = Recorder(client=True)
    conn.receive(settings_frame([(S_ENABLE_PUSH, 1)]))
    assert goaway_code(conn.take()) == E_PROTOCOL


def test_initial_window_changes_apply_to_open_and_new_streams() -> None:
    conn = server()
    open_stream(conn, 1)
    s1 = conn.streams[1]
    assert conn.send_data(s1, b"x" * 1000, False) == 1000
    conn.receive(settings_frame([(S_INITIAL_WINDOW, 500)]))  # below what s1 already sent: negative
    assert conn.send_window_of(s1) == -500 and conn.send_data(s1, b"y", False) == 0
    open_stream(conn, 3)
    assert conn.send_window_of(conn.streams[3]) == 500
    conn.receive(settings_frame([(S_INITIAL_WINDOW, 100_000)]))  # raised: the connection window still binds
    assert conn.send_window_of(s1) == 99_000
    assert conn.send_data(conn.streams[3], b"z" * 100_000, False) == 65535 - 1000


def test_window_updates_for_closed_streams_are_ignored() -> None:
    conn = server()
    open_stream(conn, 1, end=True)
    s = conn.streams[1]
    conn.send_headers(s, block([(":status", "200")]), True)
    conn.close_stream(s)
    conn.take()
    conn.receive(wu(1, 100) + frame(PRIORITY, 0, 1, b"\x00\x00\x00\x00\x10") + frame(RST_STREAM, 0, 1, U32.pack(0)))
    assert not conn.dead and conn.take() == []


def test_data_frames_received_lower_both_windows_and_credit_refills_them() -> None:
    conn = server()
    open_stream(conn, 1)
    open_stream(conn, 3)
    stream_before = conn.streams[3].recv_window
    conn_before = conn.recv_window
    conn.receive(frame(DATA, 0, 1, b"x" * 1000))
    assert conn.recv_window == conn_before - 1000 and conn.streams[3].recv_window == stream_before
    conn.consumed(conn.limits.h2_connection_window // 4)  # enough passed on: a WINDOW_UPDATE goes out
    assert [t for t, _, sid, _ in conn.take()] == [WINDOW_UPDATE]


def test_resetting_a_stream_that_waited_long_is_not_rapid_reset() -> None:
    clock = Clock()
    conn = server(Limits(h2_reset_burst=2, h2_reset_rate=0.0), clock)
    for sid in (1, 3, 5, 7):
        open_stream(conn, sid)
    clock.now += 2.0  # the calls waited (deadlines expiring): their resets are cancellations
    for sid in (1, 3, 5, 7):
        conn.receive(frame(RST_STREAM, 0, sid, U32.pack(8)))
    assert not conn.dead and conn.reset_tokens == 2.0
