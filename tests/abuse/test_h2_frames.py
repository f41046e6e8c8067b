"""Frame-level HTTP/2 attacks of issue 9 at real sidecars, each on every target where it applies.

Every test: one attacking connection sends the attack (bounded in frames, bytes and seconds), reads
what the sidecar answers, and expects the HTTP/2 error issue 9 asks for; meanwhile a victim keeps
calling through the attacked sidecar. ``Watch.verify`` then checks the sidecar is alive and
answering, its RSS grew by less than 64 MB, the victim's calls were >= 99 % successful and the
refusal was counted in ``weft_h2_protocol_errors_total``. No timing is asserted: the bounds only
stop an attack that the sidecar does not stop.

On the ``passthrough`` target the attacker is an L4-allowed peer whose bytes go to the app: there
the sidecar's frame guard must refuse what it would refuse on a parsed connection (the metric tells
the guard's refusal from the app's own).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import pytest

from tests.abuse.attacker import (
    CONTINUATION,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    MAX_WINDOW,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    STREAM_CLOSED,
    Peer,
    data,
    encode_headers,
    frame,
    grpc_message,
    ping,
    priority,
    refused_with,
    request_headers,
    rst_stream,
    settings,
    window_update,
)
from tests.abuse.mesh import ALL_TARGETS, DENIED, H2_ERRORS, L7, OUTBOUND, PASSTHROUGH, UNARY, Mesh, Target
from tests.apps.echo import echo_pb2

pytestmark = [pytest.mark.abuse, pytest.mark.integration]

AUTHORITY = "echo"
BODY = echo_pb2.EchoRequest(text="attack").SerializeToString()
FLOOD_SECONDS = 5.0   # no flood runs longer, whatever the sidecar does
ANSWER_SECONDS = 1.0  # how long the attacker waits for the GOAWAY it should get


def open_peer(mesh: Mesh, target: Target, **kw: object) -> Peer:
    rcvbuf = kw.pop("rcvbuf", None)
    peer = Peer(mesh.connect(target, rcvbuf=rcvbuf), **kw)  # type: ignore[arg-type]
    assert peer.start(), f"no SETTINGS from the {target} target: {peer.describe()}"
    return peer


def flood(peer: Peer, unit: bytes, count: int, batch: int = 1000, seconds: float = FLOOD_SECONDS) -> int:
    """Send ``unit`` ``count`` times without reading; stops early when the server closes or stops reading."""
    chunk = unit * batch
    sent = 0
    deadline = time.monotonic() + seconds
    while sent < count and time.monotonic() < deadline:
        if not peer.send(chunk, timeout=2.0):
            break
        sent += batch
    return sent


def sent(peer: Peer, payload: bytes) -> None:
    peer.send(payload)


def open_stream(peer: Peer, sid: int, **extra: str) -> None:
    """A request's HEADERS without END_STREAM: the stream stays open."""
    peer.request(sid, UNARY, AUTHORITY, end=False, extra=tuple(extra.items()))


def one_connection_attack(mesh: Mesh, target: Target, attack: Callable[[Peer], str | None], what: str, *,
                          goaway: Sequence[int] = (), rst: Sequence[int] = (), sids: Sequence[int] | None = None,
                          rcvbuf: int | None = None, unread_ok: bool = False) -> None:
    """One attacking connection: ``attack`` sends (and returns a note for the report), then the sidecar's
    answer must be a GOAWAY with a code in ``goaway`` or a RST_STREAM with one in ``rst``; ``verify``
    checks the rest of "Done when", the refusal counted in weft_h2_protocol_errors_total included."""
    with mesh.watch(target) as w:
        peer = open_peer(mesh, target, rcvbuf=rcvbuf)
        note = attack(peer)
        if note:
            w.notes.append(note)
        peer.settle(ANSWER_SECONDS)
        # unread_ok: a peer that never reads cannot be handed the GOAWAY (it sits behind the answers it
        # did not read); the sidecar closing the connection, with the refusal counted below, is its answer
        w.expect(refused_with(peer, goaway=goaway, rst=rst, sids=sids) or (unread_ok and peer.closed), what,
                 peer.describe())
        peer.close()
    w.verify(counted=H2_ERRORS)


@pytest.mark.parametrize("target", ALL_TARGETS, ids=str)
def test_continuation_flood(mesh: Mesh, target: Target) -> None:
    """HEADERS followed by endless CONTINUATION frames (8 MiB here; the header block limit is 64 KiB)."""
    def attack(peer: Peer) -> str:
        peer.send(frame(HEADERS, 0, 1, encode_headers(request_headers(UNARY, AUTHORITY))))
        fragment = encode_headers([("x-junk", "a" * 16000)])
        return f"{flood(peer, frame(CONTINUATION, 0, 1, fragment), count=512, batch=16)} CONTINUATION frames sent"
    one_connection_attack(mesh, target, attack, "GOAWAY ENHANCE_YOUR_CALM or PROTOCOL_ERROR once the header block "
                          "passes its limit", goaway=(ENHANCE_YOUR_CALM, PROTOCOL_ERROR))


@pytest.mark.parametrize("target", ALL_TARGETS, ids=str)
def test_ping_flood_without_reading(mesh: Mesh, target: Target) -> None:
    """600,000 PINGs from a peer that never reads the acks. Its receive buffer is small, but loopback's
    send buffer grows to 4 MiB: 10 MB of acks are needed before they back up in the sidecar."""
    one_connection_attack(mesh, target, lambda peer: f"{flood(peer, ping(), count=600_000)} PINGs sent",
                          "GOAWAY ENHANCE_YOUR_CALM once the unread control frames pass their limit",
                          goaway=(ENHANCE_YOUR_CALM,), rcvbuf=4096, unread_ok=True)


@pytest.mark.parametrize("target", ALL_TARGETS, ids=str)
def test_settings_flood_without_reading(mesh: Mesh, target: Target) -> None:
    """600,000 SETTINGS frames (each needs a 9-byte ack: 5.4 MB, more than the kernel buffers) from a peer
    that never reads."""
    unit = settings((INITIAL_WINDOW_SIZE, 65535))
    one_connection_attack(mesh, target, lambda peer: f"{flood(peer, unit, count=600_000)} SETTINGS sent",
                          "GOAWAY ENHANCE_YOUR_CALM once the unread SETTINGS acks pass their limit",
                          goaway=(ENHANCE_YOUR_CALM,), rcvbuf=4096, unread_ok=True)


@pytest.mark.parametrize("target", ALL_TARGETS, ids=str)
def test_rapid_reset(mesh: Mesh, target: Target) -> None:
    """HEADERS + RST_STREAM(CANCEL) in a loop (CVE-2023-44487): 20,000 streams, past the reset budget.

    On the outbound listener each stream is relayed to echo's sidecar on the connection the victim's
    calls share, and cancelled there: the caller's sidecar must retire that connection before the
    relayed resets spend the destination's budget for it (else the destination ends it, and the
    victim's calls on it with it)."""
    def attack(peer: Peer) -> str:
        block = encode_headers(request_headers(UNARY, AUTHORITY))
        sid = 1
        deadline = time.monotonic() + FLOOD_SECONDS
        while sid < 40_000 and time.monotonic() < deadline and not peer.closed:
            batch = b"".join(frame(HEADERS, 0x4, s, block) + rst_stream(s, 8) for s in range(sid, sid + 400, 2))
            sid += 400
            if not peer.send(batch):
                break
            peer.pump(0.001)
        return f"{sid // 2} streams opened and reset"
    if target is not DENIED:
        relayed = f'{H2_ERRORS}{{reason="rapid_reset"}}'
        before = mesh.metric("echo-1", relayed)
        one_connection_attack(mesh, target, attack, "GOAWAY ENHANCE_YOUR_CALM once the resets pass the budget",
                              goaway=(ENHANCE_YOUR_CALM,))
        if target is OUTBOUND:
            after = mesh.metric("echo-1", relayed)
            assert after == before, f"echo-1 ended web-1's shared connection for rapid reset ({before} -> {after})"
        return
    # a denied caller's streams are answered (PERMISSION_DENIED) as their HEADERS arrive, so none is
    # reset before its answer and no reset budget is spent: what must hold is that each is answered
    # and closed at once (nothing piles up) while the victim is unaffected
    with mesh.watch(target) as w:
        peer = open_peer(mesh, target)
        w.notes.append(attack(peer))
        peer.settle(ANSWER_SECONDS)
        answered = sum(1 for st in peer.streams.values() if st.ended or st.reset is not None)
        w.expect(answered >= len(peer.streams) // 2 or refused_with(peer, goaway=(ENHANCE_YOUR_CALM,)),
                 "every denied stream answered at once (or GOAWAY ENHANCE_YOUR_CALM)",
                 f"{answered} of {len(peer.streams)} answered; {peer.describe()}")
        peer.close()
    w.verify()


@pytest.mark.parametrize("target", ALL_TARGETS, ids=str)
def test_window_update_overflow(mesh: Mesh, target: Target) -> None:
    """A connection WINDOW_UPDATE that takes the window past 2^31-1 (RFC 9113 6.9.1: FLOW_CONTROL_ERROR)."""
    one_connection_attack(mesh, target, lambda peer: sent(peer, window_update(0, MAX_WINDOW) * 2),
                          "GOAWAY FLOW_CONTROL_ERROR", goaway=(FLOW_CONTROL_ERROR,))


@pytest.mark.parametrize("target", ALL_TARGETS, ids=str)
def test_oversized_data_frame(mesh: Mesh, target: Target) -> None:
    """A 1 MiB DATA frame (over the advertised SETTINGS_MAX_FRAME_SIZE): FRAME_SIZE_ERROR."""
    def attack(peer: Peer) -> str:
        open_stream(peer, 1)
        size = max(1 << 20, peer.max_frame + 1)
        peer.send(data(1, grpc_message(b"x" * (size - 5)), end=True))
        return f"a {size}-byte DATA frame (max {peer.max_frame})"
    one_connection_attack(mesh, target, attack, "GOAWAY or RST_STREAM FRAME_SIZE_ERROR",
                          goaway=(FRAME_SIZE_ERROR,), rst=(FRAME_SIZE_ERROR,))


@pytest.mark.parametrize("target", ALL_TARGETS, ids=str)
def test_max_frame_size_zero_then_call(mesh: Mesh, target: Target) -> None:
    """SETTINGS_MAX_FRAME_SIZE=0 (RFC 9113 6.5.2: below 16384 is a PROTOCOL_ERROR), then a call whose
    answer (PERMISSION_DENIED for the denied peer) would have to be split into zero-byte frames."""
    def attack(peer: Peer) -> None:
        peer.send(settings((MAX_FRAME_SIZE, 0)))
        peer.request(1, UNARY, AUTHORITY, body=BODY)
    one_connection_attack(mesh, target, attack, "GOAWAY PROTOCOL_ERROR", goaway=(PROTOCOL_ERROR,))


@pytest.mark.parametrize("target", ALL_TARGETS, ids=str)
def test_initial_window_size_too_large(mesh: Mesh, target: Target) -> None:
    """SETTINGS_INITIAL_WINDOW_SIZE = 2^31 (RFC 9113 6.5.2: FLOW_CONTROL_ERROR)."""
    one_connection_attack(mesh, target, lambda peer: sent(peer, settings((INITIAL_WINDOW_SIZE, MAX_WINDOW + 1))),
                          "GOAWAY FLOW_CONTROL_ERROR", goaway=(FLOW_CONTROL_ERROR,))


@pytest.mark.parametrize("target", (OUTBOUND, L7), ids=str)
def test_padded_frames_keep_the_window(mesh: Mesh, target: Target) -> None:
    """Padding counts against flow control and must be credited back (RFC 9113 6.1): calls whose messages
    come as 1-byte DATA frames with 255 bytes of padding each, 20 MB of flow-controlled bytes in all
    (more than the connection window), must all be answered; a sidecar that does not credit padding
    runs the attacker's window dry and the calls stall. (Not on the pass-through target: there the
    echo app's own HTTP/2 stack, grpc's, refuses 1-byte padded DATA frames with PROTOCOL_ERROR.)"""
    calls, body_size = 6, 13_000
    with mesh.watch(target) as w:
        peer = open_peer(mesh, target)
        body = grpc_message(echo_pb2.EchoRequest(payload=b"p" * body_size).SerializeToString())
        stalled = ""
        for n in range(calls):
            sid = 1 + 2 * n
            open_stream(peer, sid)
            st = peer.streams[sid]
            i = 0
            while i < len(body) and not stalled:
                cost = 257
                fit = min(peer.send_window, st.window) // cost
                if fit <= 0:
                    before = (peer.send_window, st.window)
                    peer.pump(3.0, until=lambda: min(peer.send_window, st.window) >= cost)  # noqa: B023
                    if min(peer.send_window, st.window) < cost:
                        stalled = (f"window ran dry on call {n + 1} after {i} of {len(body)} bytes "
                                   f"(connection {before[0]}, stream {before[1]}; {peer.describe()})")
                    continue
                chunk = b"".join(data(sid, body[j:j + 1], end=j == len(body) - 1, pad=255)
                                 for j in range(i, min(len(body), i + min(fit, 2000))))
                k = min(len(body), i + min(fit, 2000)) - i
                peer.send_window -= k * cost
                st.window -= k * cost
                i += k
                if not peer.send(chunk):
                    stalled = f"the sidecar stopped reading: {peer.describe()}"
                peer.pump(0.001)
            if stalled:
                break
        if not stalled:
            peer.pump(10.0, until=lambda: all(peer.answered(1 + 2 * n) for n in range(calls)))
        ok = [n for n in range(calls) if peer.grpc_status(1 + 2 * n) == 0]
        w.expect(not stalled, "the window credited for padding", stalled)
        w.expect(len(ok) == calls, f"all {calls} padded calls answered OK", f"{len(ok)} OK; {peer.describe()}")
        peer.close()
    w.verify()


@pytest.mark.parametrize("target", ALL_TARGETS, ids=str)
def test_five_thousand_streams(mesh: Mesh, target: Target) -> None:
    """5,000 open streams on one connection: MAX_CONCURRENT_STREAMS advertised in the hundreds, and the
    streams past it refused with REFUSED_STREAM (or, past the refusal budget, GOAWAY ENHANCE_YOUR_CALM)."""
    streams = 5000
    with mesh.watch(target) as w:
        peer = open_peer(mesh, target)
        advertised = peer.server_settings.get(MAX_CONCURRENT_STREAMS)
        block = encode_headers(request_headers(UNARY, AUTHORITY))
        for first in range(1, 2 * streams, 200):
            batch = b"".join(frame(HEADERS, 0x4, s, block) for s in range(first, min(first + 200, 2 * streams), 2))
            if not peer.send(batch):
                break
            peer.pump(0.001)
        peer.pump(ANSWER_SECONDS, until=lambda: len(peer.resets(REFUSED_STREAM)) >= streams - 1000)
        refused = len(peer.resets(REFUSED_STREAM))
        w.notes.append(f"advertised {advertised}, {refused} refused")
        if target is not PASSTHROUGH:  # a passed-through peer sees the app's SETTINGS
            w.expect(advertised is not None and advertised <= 1000,
                     "SETTINGS_MAX_CONCURRENT_STREAMS advertised at most 1000", f"{advertised}")
        if target is DENIED:
            # each denied stream is answered and closed as it arrives: never more open than advertised
            answered = sum(1 for st in peer.streams.values() if st.ended or st.reset is not None)
            w.expect(answered >= streams - 1000 or refused >= 1, "every stream answered or refused",
                     f"{answered} answered; {peer.describe()}")
        elif target is PASSTHROUGH:
            # the guard cannot refuse one stream without dropping its HEADERS, which would desynchronise
            # the app's HPACK state: it ends the connection (RFC 9113 5.1.2 allows either)
            w.expect(refused >= 1 or refused_with(peer, goaway=(PROTOCOL_ERROR, ENHANCE_YOUR_CALM)),
                     "REFUSED_STREAM, or GOAWAY PROTOCOL_ERROR past the advertised limit", peer.describe())
        else:
            w.expect(refused >= 1 and (refused >= streams - 1000
                                       or refused_with(peer, goaway=(ENHANCE_YOUR_CALM,))),
                     "the streams past the limit refused with REFUSED_STREAM", peer.describe())
        peer.close()
    w.verify(counted=None if target is DENIED else H2_ERRORS)


@pytest.mark.parametrize("target", ALL_TARGETS, ids=str)
def test_bad_stream_ids(mesh: Mesh, target: Target) -> None:
    """An even stream id, a reused one and a decreasing one, each on its own connection: PROTOCOL_ERROR
    (STREAM_CLOSED also accepted for the reused one, RFC 9113 5.1)."""
    with mesh.watch(target) as w:
        even = open_peer(mesh, target)
        even.request(2, UNARY, AUTHORITY, body=BODY)
        even.settle(ANSWER_SECONDS)
        w.expect(refused_with(even, goaway=(PROTOCOL_ERROR,)), "even stream id: GOAWAY PROTOCOL_ERROR",
                 even.describe())
        even.close()
        reused = open_peer(mesh, target)
        reused.request(1, UNARY, AUTHORITY, body=BODY)
        reused.pump(5.0, until=lambda: reused.answered(1))
        reused.request(1, UNARY, AUTHORITY, body=BODY)
        reused.settle(ANSWER_SECONDS)
        # a stream the sidecar itself reset (a denied call answered before the client ended it): the
        # client's later frames on it are ignored, as RFC 9113 5.1 requires
        w.expect(refused_with(reused, goaway=(PROTOCOL_ERROR, STREAM_CLOSED))
                 or (target is DENIED and 1 in reused.resets()),
                 "reused stream id: GOAWAY PROTOCOL_ERROR or STREAM_CLOSED (ignored after our RST_STREAM)",
                 reused.describe())
        reused.close()
        down = open_peer(mesh, target)
        open_stream(down, 5, **{"x-echo-delay-ms": "3000"})
        down.request(3, UNARY, AUTHORITY, body=BODY)
        down.settle(ANSWER_SECONDS)
        w.expect(refused_with(down, goaway=(PROTOCOL_ERROR,)), "decreasing stream id: GOAWAY PROTOCOL_ERROR",
                 down.describe())
        down.close()
    w.verify(counted=H2_ERRORS, at_least=2 if target is DENIED else 3)


@pytest.mark.parametrize("target", ALL_TARGETS, ids=str)
def test_empty_data_flood(mesh: Mesh, target: Target) -> None:
    """100,000 empty DATA frames without END_STREAM on an open stream."""
    def attack(peer: Peer) -> str:
        open_stream(peer, 1, **{"x-echo-delay-ms": "5000"})
        return f"{flood(peer, data(1, b''), count=100_000)} empty DATA frames sent"
    one_connection_attack(mesh, target, attack, "GOAWAY ENHANCE_YOUR_CALM", goaway=(ENHANCE_YOUR_CALM,))


@pytest.mark.parametrize("target", ALL_TARGETS, ids=str)
def test_window_update_flood(mesh: Mesh, target: Target) -> None:
    """100,000 WINDOW_UPDATE frames of 1 byte while the sidecar sends no DATA."""
    one_connection_attack(mesh, target, lambda peer: f"{flood(peer, window_update(0, 1), count=100_000)} sent",
                          "GOAWAY ENHANCE_YOUR_CALM", goaway=(ENHANCE_YOUR_CALM,))


@pytest.mark.parametrize("target", ALL_TARGETS, ids=str)
def test_priority_flood(mesh: Mesh, target: Target) -> None:
    """100,000 PRIORITY frames (on idle streams; none is ever opened)."""
    unit = b"".join(priority(s) for s in range(1, 201, 2))
    one_connection_attack(mesh, target, lambda peer: f"{flood(peer, unit, count=1000, batch=10) * 100} sent",
                          "GOAWAY ENHANCE_YOUR_CALM", goaway=(ENHANCE_YOUR_CALM,))


@pytest.mark.parametrize("target", ALL_TARGETS, ids=str)
def test_data_after_end_stream(mesh: Mesh, target: Target) -> None:
    """DATA on a stream the client already ended (half-closed remote): STREAM_CLOSED (RFC 9113 5.1)."""
    def attack(peer: Peer) -> None:
        delay = () if target is DENIED else (("x-echo-delay-ms", "1500"),)
        peer.request(1, UNARY, AUTHORITY, body=BODY, extra=delay)
        peer.send(data(1, grpc_message(BODY)) + data(1, grpc_message(BODY), end=True))
    if target is not DENIED:
        one_connection_attack(mesh, target, attack, "RST_STREAM or GOAWAY STREAM_CLOSED", goaway=(STREAM_CLOSED,),
                              rst=(STREAM_CLOSED,), sids=(1,))
        return
    # denied: the call is answered and reset by the sidecar before the client's DATA; frames on a stream
    # we reset are ignored (RFC 9113 5.1), and nothing reaches the app
    with mesh.watch(target) as w:
        peer = open_peer(mesh, target)
        attack(peer)
        peer.settle(ANSWER_SECONDS)
        w.expect(refused_with(peer, goaway=(STREAM_CLOSED,), rst=(STREAM_CLOSED,), sids=(1,)) or peer.answered(1),
                 "the denied call answered; its later DATA ignored or refused with STREAM_CLOSED", peer.describe())
        peer.close()
    w.verify()
