"""The pass-through guard, frame by frame: h2 as the client and the app, scripted bytes for what h2 will not send."""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from sidecar.h2guard import (
    CONTINUATION,
    DATA,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    HEADERS,
    PING,
    PREFACE,
    PRIORITY,
    PROTOCOL_ERROR,
    RST_STREAM,
    SETTINGS,
    STREAM_CLOSED,
    WINDOW_UPDATE,
    H2Guard,
    Violation,
    goaway,
)
from sidecar.limits import Limits

REQUEST = [(":method", "POST"), (":scheme", "https"), (":path", "/echo.Echo/Unary"), (":authority", "api"),
           ("content-type", "application/grpc"), ("te", "trailers")]
RESPONSE = [(":status", "200"), ("content-type", "application/grpc")]


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


class Pair:
    """An h2 client and an h2 server with the guard between them, fed in chunks of ``chunk`` bytes."""

    def __init__(self, limits: Limits | None = None, chunk: int = 0, server_settings: dict[int, int] | None = None,
                 clock: list[float] | None = None) -> None:
        self.now = clock if clock is not None else [0.0]
        self.guard = H2Guard(limits or Limits(), clock=lambda: self.now[0])
        self.chunk = chunk
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.client.initiate_connection()
        self.server.initiate_connection()
        if server_settings:
            self.server.update_settings(server_settings)
        self.violation: Violation | None = None
        self.exchange()

    def _pieces(self, data: bytes) -> list[bytes]:
        if not self.chunk:
            return [data]
        return [data[i:i + self.chunk] for i in range(0, len(data), self.chunk)]

    def send_client(self, data: bytes) -> Violation | None:
        for piece in self._pieces(data):
            v = self.guard.feed_client(memoryview(bytearray(piece)))
            if v is not None:
                self.violation = v
                return v
            self.server.receive_data(piece)
        return None

    def send_server(self, data: bytes) -> list[h2.events.Event]:
        events: list[h2.events.Event] = []
        for piece in self._pieces(data):
            buf = bytearray(piece)
            insert = self.guard.feed_server(memoryview(buf))
            if insert is not None:
                at, extra = insert
                buf[at:at] = extra
            events += self.client.receive_data(bytes(buf))
        return events

    def exchange(self) -> Violation | None:
        for _ in range(4):
            out = self.client.data_to_send()
            if out:
                v = self.send_client(out)
                if v is not None:
                    return v
            back = self.server.data_to_send()
            if back:
                self.send_server(back)
        return None

    def call(self, sid: int, answer: bool = True) -> Violation | None:
        self.client.send_headers(sid, REQUEST)
        self.client.send_data(sid, b"\0\0\0\0\2hi", end_stream=True)
        v = self.exchange()
        if v is None and answer:
            self.server.send_headers(sid, RESPONSE)
            self.server.send_data(sid, b"\0\0\0\0\2ok")
            self.server.send_headers(sid, [("grpc-status", "0")], end_stream=True)
            v = self.exchange()
        return v


@pytest.mark.parametrize("chunk", [0, 1, 5, 13])
def test_calls_pass_and_streams_are_tracked_whatever_the_chunking(chunk: int) -> None:
    pair = Pair(chunk=chunk)
    for sid in (1, 3, 5):
        assert pair.call(sid) is None
    assert pair.guard.open_streams == 0
    assert pair.guard.last_client_stream == 5
    assert pair.guard.server_at_frame_boundary()
    # the client was told the bound (h2 advertises 100; ours is 256) and acknowledged it
    assert pair.client.remote_settings.max_concurrent_streams == 100
    assert pair.guard.max_streams == 100


def test_our_stream_bound_is_appended_to_the_apps_first_settings() -> None:
    pair = Pair(Limits(h2_max_concurrent_streams=3), server_settings={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS:
                                                                        2**31 - 1})
    assert pair.client.remote_settings.max_concurrent_streams == 3
    assert pair.guard.max_streams == 3
    for sid in (1, 3, 5):
        assert pair.call(sid, answer=False) is None
    assert pair.guard.open_streams == 3
    # h2 itself refuses a 4th; forged bytes are refused by the guard
    v = pair.send_client(frame(HEADERS, 0x4 | 0x1, 7, b"\x82"))
    assert v is not None and v.reason == "concurrent_streams" and v.code == PROTOCOL_ERROR


def test_the_apps_larger_stream_limit_is_rewritten_in_place() -> None:
    limits = Limits(h2_max_concurrent_streams=10)
    pair = Pair(limits)
    pair.server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 5000})
    pair.exchange()
    assert pair.client.remote_settings.max_concurrent_streams == 10
    assert pair.guard.max_streams == 10


def test_no_preface_or_a_first_frame_other_than_settings_is_refused() -> None:
    guard = H2Guard(Limits())
    v = guard.feed_client(memoryview(bytearray(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")))
    assert v is not None and v.reason == "preface"
    guard = H2Guard(Limits())
    v = guard.feed_client(memoryview(bytearray(PREFACE + frame(PING, 0, 0, b"12345678"))))
    assert v is not None and v.reason == "preface"
    # and a failed guard stays failed
    assert guard.feed_client(memoryview(bytearray(b"x"))) is v


def test_a_frame_over_the_max_frame_size_is_refused() -> None:
    pair = Pair()
    pair.client.send_headers(1, REQUEST)
    pair.exchange()
    big = frame(DATA, 0, 1, b"x" * 16385)
    v = pair.send_client(big)
    assert v is not None and v.reason == "frame_size" and v.code == FRAME_SIZE_ERROR


def test_the_apps_max_frame_size_is_honoured() -> None:
    pair = Pair(server_settings={h2.settings.SettingCodes.MAX_FRAME_SIZE: 65536})
    pair.client.send_headers(1, REQUEST)
    pair.client.send_data(1, b"x" * 60000)
    assert pair.exchange() is None


def test_continuation_floods_and_oversized_header_blocks_are_refused() -> None:
    pair = Pair(Limits(h2_max_continuation_frames=4))
    v = pair.send_client(frame(HEADERS, 0, 1, b"\x82") + b"".join(frame(CONTINUATION, 0, 1, b"\x82") for _ in range(5)))
    assert v is not None and v.reason == "continuation_flood" and v.code == ENHANCE_YOUR_CALM
    pair = Pair(Limits(h2_max_header_block_size=2048))
    v = pair.send_client(frame(HEADERS, 0, 1, b"\x82" * 1000) + frame(CONTINUATION, 0, 1, b"\x82" * 1000)
                         + frame(CONTINUATION, 0, 1, b"\x82" * 1000))
    assert v is not None and v.reason == "header_block_size"
    pair = Pair(Limits(h2_max_header_block_size=2048))  # one HEADERS frame (END_HEADERS) over the limit
    v = pair.send_client(frame(HEADERS, 0x4, 1, b"\x82" * 2049))
    assert v is not None and v.reason == "header_block_size" and v.code == ENHANCE_YOUR_CALM
    pair = Pair(Limits(h2_max_header_block_size=2048))
    assert pair.guard.feed_client(memoryview(bytearray(frame(HEADERS, 0x4, 1, b"\x82" * 2048)))) is None
    pair = Pair()
    v = pair.send_client(frame(HEADERS, 0, 1, b"\x82") + frame(PING, 0, 0, b"12345678"))
    assert v is not None and v.reason == "continuation_expected"
    pair = Pair()
    v = pair.send_client(frame(CONTINUATION, 4, 1, b"\x82"))
    assert v is not None and v.reason == "stream_id"


def test_stream_ids_are_checked() -> None:
    for bad in (frame(HEADERS, 5, 2, b"\x82"), frame(HEADERS, 5, 0, b"\x82"), frame(DATA, 0, 9, b"x"),
                frame(RST_STREAM, 0, 11, b"\0\0\0\x08"), frame(PING, 0, 1, b"12345678"),
                frame(SETTINGS, 0, 1, b""), frame(PRIORITY, 0, 0, b"\0\0\0\0\x10")):
        pair = Pair()
        v = pair.send_client(bad)
        assert v is not None and v.reason == "stream_id" and v.code == PROTOCOL_ERROR, bad


def test_wrong_control_frame_lengths_are_refused() -> None:
    for bad in (frame(PING, 0, 0, b"1234"), frame(WINDOW_UPDATE, 0, 0, b"\0\0\1"), frame(SETTINGS, 0, 0, b"12345"),
                frame(SETTINGS, 1, 0, b"123456"), frame(PRIORITY, 0, 1, b"1234"), frame(RST_STREAM, 0, 1, b"1")):
        pair = Pair()
        v = pair.send_client(bad)
        assert v is not None and v.code == FRAME_SIZE_ERROR, bad


def test_ping_floods_of_a_client_that_does_not_read_are_refused() -> None:
    pair = Pair(Limits(h2_max_outbound_control_frames=10))
    # the app answers while the client reads: no limit is reached
    for _ in range(50):
        pair.client.ping(b"12345678")
        assert pair.exchange() is None
    # the app's answers stop coming back (the client does not read): the 11th unanswered PING is refused
    pings = b"".join(frame(PING, 0, 0, b"12345678") for _ in range(11))
    v = pair.guard.feed_client(memoryview(bytearray(pings)))
    assert v is not None and v.reason == "ping_flood" and v.code == ENHANCE_YOUR_CALM


def test_settings_floods_are_refused() -> None:
    pair = Pair(Limits(h2_max_outbound_control_frames=5))
    v = pair.guard.feed_client(memoryview(bytearray(frame(SETTINGS, 0, 0, b"") * 6)))
    assert v is not None and v.reason == "settings_flood"


def test_settings_values_are_validated() -> None:
    cases = [((2, 2), PROTOCOL_ERROR), ((4, 2**31), FLOW_CONTROL_ERROR), ((5, 100), PROTOCOL_ERROR),
             ((5, 2**24), PROTOCOL_ERROR)]
    for (key, value), code in cases:
        for chunk in (0, 1):
            pair = Pair(chunk=chunk)
            v = pair.send_client(frame(SETTINGS, 0, 0, struct.pack(">HI", 1, 4096) + struct.pack(">HI", key, value)))
            assert v is not None and v.reason == "settings" and v.code == code, (key, value)


def test_rapid_reset_spends_a_budget_that_refills() -> None:
    clock = [0.0]
    pair = Pair(Limits(h2_reset_burst=5, h2_reset_rate=1.0), clock=clock)
    sid = 1
    for _ in range(5):
        pair.client.send_headers(sid, REQUEST)
        pair.client.reset_stream(sid)
        assert pair.exchange() is None
        sid += 2
    clock[0] = 1.0  # one token back
    pair.client.send_headers(sid, REQUEST)
    pair.client.reset_stream(sid)
    assert pair.exchange() is None
    sid += 2
    pair.client.send_headers(sid, REQUEST)
    pair.client.reset_stream(sid)
    v = pair.exchange()
    assert v is not None and v.reason == "rapid_reset" and v.code == ENHANCE_YOUR_CALM
    assert pair.guard.open_streams == 0


def test_resets_of_answered_streams_are_free() -> None:
    pair = Pair(Limits(h2_reset_burst=1, h2_reset_rate=0.0))
    for sid in (1, 3, 5, 7):
        pair.client.send_headers(sid, REQUEST)
        pair.exchange()
        pair.server.send_headers(sid, RESPONSE)
        pair.exchange()
        pair.client.reset_stream(sid)
        assert pair.exchange() is None


def test_connection_window_updates_are_checked() -> None:
    pair = Pair()
    v = pair.send_client(frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\0"))
    assert v is not None and v.reason == "window_update" and v.code == PROTOCOL_ERROR
    for chunk in (0, 3):
        pair = Pair(chunk=chunk)
        v = pair.send_client(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 2**31 - 1 - 65535))
                             + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)))
        assert v is not None and v.reason == "window_overflow" and v.code == FLOW_CONTROL_ERROR


def test_the_window_follows_the_apps_data() -> None:
    pair = Pair()
    pair.client.send_headers(1, REQUEST, end_stream=True)
    pair.exchange()
    pair.server.send_headers(1, RESPONSE)
    for _ in range(3):
        pair.server.send_data(1, b"x" * 16000)
    pair.exchange()
    assert pair.guard.client_window == 65535 - 48000
    pair.client.acknowledge_received_data(48000, 1)
    assert pair.exchange() is None
    assert pair.guard.client_window == 65535
    # the client may credit what the app sent back up to 2^31-1
    v = pair.send_client(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 2**31 - 1 - pair.guard.client_window)))
    assert v is None


def test_empty_frame_floods_are_refused() -> None:
    pair = Pair(Limits(h2_max_empty_frames=2))
    pair.client.send_headers(1, REQUEST)
    pair.exchange()
    assert pair.send_client(frame(DATA, 0, 1) * 2) is None
    assert pair.send_client(frame(DATA, 0, 1, b"x")) is None  # a frame with a payload resets the count
    v = pair.send_client(frame(DATA, 0, 1) * 3)
    assert v is not None and v.reason == "empty_frames"


def test_window_update_and_priority_floods_are_refused() -> None:
    pair = Pair(Limits(h2_max_window_updates_per_data_frame=2))
    pair.client.send_headers(1, REQUEST)
    pair.exchange()
    v = pair.send_client(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 1)) * 20)
    assert v is not None and v.reason == "window_update_flood"
    pair = Pair(Limits(h2_max_priority_frames_per_stream=2))
    v = pair.send_client(frame(PRIORITY, 0, 3, b"\0\0\0\0\x10") * 20)
    assert v is not None and v.reason == "priority_flood"


def test_push_promise_from_a_client_is_refused() -> None:
    pair = Pair()
    v = pair.send_client(frame(5, 4, 1, b"\0\0\0\2\x82"))
    assert v is not None and v.code == PROTOCOL_ERROR


def test_goaway_frame() -> None:
    data = goaway(7, ENHANCE_YOUR_CALM)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    events = client.receive_data(frame(SETTINGS, 0, 0) + data)
    terminated = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert terminated and terminated[0].error_code == ENHANCE_YOUR_CALM and terminated[0].last_stream_id == 7


def test_the_app_speaking_first_in_split_reads_keeps_state() -> None:
    pair = Pair(chunk=1)
    assert pair.call(1) is None
    assert pair.guard.server_at_frame_boundary()


def test_a_stream_id_used_again_or_below_the_last_is_refused() -> None:
    pair = Pair()
    assert pair.call(1) is None  # stream 1 is closed now
    v = pair.send_client(frame(HEADERS, 0x4 | 0x1, 1, b"\x83\x86\x84"))
    assert v is not None and v.reason == "stream_id_reused" and v.code == PROTOCOL_ERROR
    pair = Pair()
    assert pair.call(5, answer=False) is None
    v = pair.send_client(frame(HEADERS, 0x4 | 0x1, 3, b"\x83\x86\x84"))
    assert v is not None and v.reason == "stream_id_reused" and v.code == PROTOCOL_ERROR


def test_frames_after_the_clients_end_stream_are_stream_closed() -> None:
    pair = Pair()
    assert pair.call(1, answer=False) is None  # the client ended stream 1; the app has not answered
    v = pair.send_client(frame(DATA, 0x1, 1, b"\0\0\0\0\0"))
    assert v is not None and v.reason == "data_after_end_stream" and v.code == STREAM_CLOSED
    pair = Pair()
    assert pair.call(1, answer=False) is None
    v = pair.send_client(frame(HEADERS, 0x4 | 0x1, 1, b"\x40\x0bgrpc-status\x010"))
    assert v is not None and v.reason == "headers_after_end_stream" and v.code == STREAM_CLOSED
    pair = Pair()  # a request without a body: its HEADERS end the stream
    assert pair.guard.feed_client(memoryview(bytearray(frame(HEADERS, 0x4 | 0x1, 1, b"\x82\x87\x84")))) is None
    assert pair.guard.streams == {1: 1}
    v = pair.send_client(frame(DATA, 0x1, 1, b"\0\0\0\0\0"))
    assert v is not None and v.reason == "data_after_end_stream" and v.code == STREAM_CLOSED
    pair = Pair()
    assert pair.call(1) is None  # answered and closed on both sides
    v = pair.send_client(frame(DATA, 0x1, 1, b""))
    assert v is not None and v.reason == "data_on_closed_stream" and v.code == STREAM_CLOSED


def test_frames_in_flight_on_a_stream_the_app_reset_are_no_violation() -> None:
    pair = Pair()
    pair.client.send_headers(1, REQUEST)
    assert pair.exchange() is None
    pair.server.reset_stream(1)
    pair.exchange()
    assert pair.guard.open_streams == 0
    # what the client sent before it saw the reset: the app ignores it (RFC 9113 5.1), so does the guard
    assert pair.guard.feed_client(memoryview(bytearray(frame(DATA, 0x1, 1, b"\0\0\0\0\0")))) is None
    trailers = frame(HEADERS, 0x4 | 0x1, 1, b"\x40\x0bgrpc-status\x010")
    assert pair.guard.feed_client(memoryview(bytearray(trailers))) is None


def test_the_apps_resets_are_remembered_within_a_bound() -> None:
    from sidecar.h2guard import APP_RESETS_KEPT

    pair = Pair(Limits(h2_max_concurrent_streams=APP_RESETS_KEPT * 4))
    for sid in range(1, 2 * (APP_RESETS_KEPT + 10), 2):
        pair.client.send_headers(sid, REQUEST)
        assert pair.exchange() is None
        pair.server.reset_stream(sid)
        pair.exchange()
    assert len(pair.guard._app_resets) == APP_RESETS_KEPT
    v = pair.guard.feed_client(memoryview(bytearray(frame(DATA, 0x1, 1, b""))))  # forgotten: a closed stream
    assert v is not None and v.reason == "data_on_closed_stream"


def test_a_frame_split_right_after_the_apps_settings_is_passed_over_not_parsed() -> None:
    guard = H2Guard(Limits())
    assert guard.feed_client(memoryview(bytearray(PREFACE + frame(SETTINGS, 0, 0)))) is None
    # the app's SETTINGS, then a HEADERS frame cut inside its payload: whose bytes would read as a
    # SETTINGS_MAX_FRAME_SIZE entry of 2^24-1 if the guard kept parsing them as settings
    looks_like_a_setting = struct.pack(">HI", 0x5, 2**24 - 1)
    whole = frame(SETTINGS, 0, 0) + frame(HEADERS, 0x4, 1, looks_like_a_setting)
    cut = len(whole) - len(looks_like_a_setting)
    for piece in (whole[:cut], whole[cut:]):
        guard.feed_server(memoryview(bytearray(piece)))
    assert guard.client_max_frame == 16384 and guard.server_at_frame_boundary()
    # the same from the client: bytes of a HEADERS frame that would read as SETTINGS_ENABLE_PUSH=2
    for client_settings in (b"", struct.pack(">HI", 0x4, 65535)):
        guard = H2Guard(Limits())
        push = struct.pack(">HI", 0x2, 2)
        whole = PREFACE + frame(SETTINGS, 0, 0, client_settings) + frame(HEADERS, 0x4, 1, push)
        cut = len(whole) - len(push)
        assert guard.feed_client(memoryview(bytearray(whole[:cut]))) is None
        assert guard.feed_client(memoryview(bytearray(whole[cut:]))) is None and guard.last_client_stream == 1
