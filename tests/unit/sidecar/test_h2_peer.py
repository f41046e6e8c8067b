"""The HTTP/2 state machine against python-hyper's h2 as the peer, in process (bytes pumped both ways).

Our own versions of the kinds of cases h2's invalid-frame-sequence and flow-control tests cover,
plus what the proxy relies on: h2 must accept everything we send (windows, frame sizes, the
SETTINGS acknowledgement before DATA under a raised window) and read our GOAWAY and RST_STREAM codes.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
from hpack import Decoder

from sidecar.h2.frames import E_CALM, E_FRAME_SIZE, E_PROTOCOL, E_REFUSED, E_STREAM_CLOSED, HEADER
from sidecar.limits import Limits
from tests.unit.sidecar.h2peer import Recorder, block, split

REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/pkg.Svc/Call"), (":authority", "x"),
           ("content-type", "application/grpc"), ("te", "trailers")]


def h2_peer(client_side: bool, **settings: int) -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8"))
    c.initiate_connection()
    if settings:
        c.update_settings({getattr(h2.settings.SettingCodes, k): v for k, v in settings.items()})
    return c


def h2_client(**settings: int) -> h2.connection.H2Connection:
    return h2_peer(True, **settings)


def h2_server(**settings: int) -> h2.connection.H2Connection:
    return h2_peer(False, **settings)


def pump(peer: h2.connection.H2Connection, ours: Recorder) -> list[Any]:
    """Move bytes both ways until neither side has anything to send; returns h2's events."""
    events: list[Any] = []
    for _ in range(20):
        out = peer.data_to_send()
        if out:
            ours.receive(out)
        mine = bytes(ours.out)
        ours.out.clear()
        if mine:
            events += peer.receive_data(mine)
        if not out and not mine:
            break
    return events


def pair(limits: Limits | None = None, **client_settings: int) -> tuple[h2.connection.H2Connection, Recorder]:
    ours = Recorder(limits)
    ours.send(ours.preamble())
    client = h2_client(**client_settings)
    pump(client, ours)
    ours.events.clear()
    return client, ours


def test_a_call_both_ways_with_h2_as_the_client() -> None:
    client, ours = pair()
    client.send_headers(1, REQUEST)
    client.send_data(1, b"\x00\x00\x00\x00\x05hello", end_stream=True)
    pump(client, ours)
    kinds = [e[0] for e in ours.events]
    assert kinds == ["request", "data"] and ours.events[1][2] == 1
    headers = Decoder().decode(ours.events[0][3])
    assert (":path", "/pkg.Svc/Call") in [tuple(h) for h in headers]  # type: ignore[comparison-overlap]
    s = ours.streams[1]
    ours.send_headers(s, block([(":status", "200"), ("content-type", "application/grpc")]), False)
    ours.send_data(s, b"\x00\x00\x00\x00\x02ok", False)
    ours.send_headers(s, block([("grpc-status", "0")]), True)
    ours.close_stream(s)
    events = pump(client, ours)
    got = [type(e).__name__ for e in events]
    assert got[:2] == ["ResponseReceived", "DataReceived"] and "TrailersReceived" in got and "StreamEnded" in got
    assert not ours.streams and not ours.dead


def test_flow_control_against_h2s_windows() -> None:
    client, ours = pair(INITIAL_WINDOW_SIZE=100)
    client.send_headers(1, REQUEST, end_stream=True)
    pump(client, ours)
    s = ours.streams[1]
    ours.send_headers(s, block([(":status", "200")]), False)
    assert ours.send_data(s, b"x" * 1000, False) == 100 and s in ours.blocked
    events = pump(client, ours)
    data = [e for e in events if isinstance(e, h2.events.DataReceived)]
    assert sum(len(e.data) for e in data) == 100
    client.acknowledge_received_data(100, 1)  # h2 gives the window back with WINDOW_UPDATE
    ours.events.clear()
    pump(client, ours)
    assert ("writable", 1) in ours.events


def test_data_under_a_raised_initial_window_follows_the_settings_ack() -> None:
    # h2, like gRPC's C core, applies its own new SETTINGS_INITIAL_WINDOW_SIZE only when the peer
    # acknowledges it: DATA that used the raised window before the ACK would overflow its window
    client, ours = pair(INITIAL_WINDOW_SIZE=0)
    client.send_headers(1, REQUEST, end_stream=True)
    pump(client, ours)
    s = ours.streams[1]
    ours.send_headers(s, block([(":status", "200")]), False)
    assert ours.send_data(s, b"y" * 50, True) == 0
    pump(client, ours)

    def writable(st: object) -> None:
        ours.send_data(s, b"y" * 50, True)

    ours.on_writable = writable  # type: ignore[method-assign,assignment]
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535})
    events = pump(client, ours)  # h2 raises FlowControlError if the DATA came first
    assert sum(len(e.data) for e in events if isinstance(e, h2.events.DataReceived)) == 50
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)


def test_h2_reads_our_refusals() -> None:
    client, ours = pair(Limits(h2_max_concurrent_streams=1))
    client.send_headers(1, REQUEST)
    pump(client, ours)
    # h2 honours our SETTINGS_MAX_CONCURRENT_STREAMS itself: a second stream past it, by hand
    assert client.remote_settings.max_concurrent_streams == 1
    ours.receive(bytes(HEADER.pack(0, len(block(REQUEST)), 1, 0x5, 3)) + block(REQUEST))
    assert [(t, sid, p) for t, _, sid, p in split(bytes(ours.out))] == [(3, 3, E_REFUSED.to_bytes(4, "big"))]
    ours.out.clear()
    # DATA after the client ended its side: STREAM_CLOSED on that stream
    client.send_data(1, b"x", end_stream=True)
    pump(client, ours)
    ours.receive(bytes(HEADER.pack(0, 1, 0, 0, 1)) + b"z")
    events = client.receive_data(bytes(ours.out))
    ours.out.clear()
    assert [(e.stream_id, e.error_code) for e in events if isinstance(e, h2.events.StreamReset)] == \
        [(1, E_STREAM_CLOSED)]


def test_h2_reads_our_goaway_codes() -> None:
    for frame_bytes, code in [
        (bytes(HEADER.pack(0, 3, 8, 0, 0)) + b"\x00\x00\x01", E_FRAME_SIZE),  # a 3-byte WINDOW_UPDATE
        (bytes(HEADER.pack(0, 5, 9, 4, 1)) + b"hello", E_PROTOCOL),  # CONTINUATION without HEADERS
        (bytes(HEADER.pack(0, len(block(REQUEST)), 1, 4, 0)) + block(REQUEST), E_PROTOCOL),  # HEADERS on 0
    ]:
        client, ours = pair()
        ours.receive(frame_bytes)
        events = client.receive_data(bytes(ours.out))
        ended = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        assert [e.error_code for e in ended] == [code]


def test_h2_server_limits_are_honoured_by_our_client_side() -> None:
    server = h2_server(MAX_CONCURRENT_STREAMS=1)
    ours = Recorder(client=True)
    ours.send(ours.preamble())
    events: list[Any] = []
    for _ in range(5):
        mine = bytes(ours.out)
        ours.out.clear()
        if mine:
            events += server.receive_data(mine)
        out = server.data_to_send()
        if out:
            ours.receive(out)
    assert ours.settings_seen and ours.peer_max_concurrent == 1
    s = ours.open_stream()
    ours.send_headers(s, block(REQUEST), True)
    assert not ours.can_open()  # the second call waits for a slot
    events = server.receive_data(bytes(ours.out))
    ours.out.clear()
    assert any(isinstance(e, h2.events.RequestReceived) for e in events)
    server.send_headers(1, [(":status", "200")])
    server.send_data(1, b"abc")
    server.send_headers(1, [("grpc-status", "0")], end_stream=True)
    ours.receive(server.data_to_send())
    kinds = [e[0] for e in ours.events if e[0] != "settings"]
    assert kinds == ["headers", "data", "headers"]
    ours.close_stream(s)
    assert ours.can_open()


def test_data_before_response_headers_is_refused_on_the_client_side() -> None:
    server = h2_server()
    ours = Recorder(client=True)
    ours.send(ours.preamble())
    server.receive_data(bytes(ours.out))
    ours.out.clear()
    ours.receive(server.data_to_send())
    s = ours.open_stream()
    ours.send_headers(s, block(REQUEST), True)
    ours.receive(bytes(HEADER.pack(0, 5, 0, 0, 1)) + b"hello")
    assert ours.reasons == ["data_before_headers"] and 1 not in ours.streams and not ours.dead


def test_rapid_reset_from_h2_ends_with_enhance_your_calm() -> None:
    client, ours = pair(Limits(h2_reset_burst=10, h2_reset_rate=0.0))
    sid = 1
    ended: list[Any] = []
    for _ in range(12):
        client.send_headers(sid, REQUEST)
        client.reset_stream(sid)
        ended += [e for e in pump(client, ours) if isinstance(e, h2.events.ConnectionTerminated)]
        sid += 2
        if ended:
            break
    assert [e.error_code for e in ended] == [E_CALM] and ours.reasons == ["rapid_reset"]
