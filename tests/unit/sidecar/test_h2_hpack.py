"""The h2 outbound's header-block helpers, against blocks made by a real HPACK encoder."""

from __future__ import annotations

import pytest
from hpack import Decoder, Encoder

from sidecar.h2_proxy import context_free, frame, scan, status_of, trailers_only

REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/weft.test.echo.v1.Echo/Unary"),
           (":authority", "127.0.0.1:9191"), ("te", "trailers"), ("content-type", "application/grpc"),
           ("grpc-timeout", "999m"), ("x-bin-bin", "AAE")]


def test_scan_finds_path_in_huffman_and_plain_blocks() -> None:
    for huffman in (True, False):
        enc = Encoder()
        enc.header_table_size = 0
        block = enc.encode(REQUEST, huffman=huffman)
        assert scan(block, b":path") == b"/weft.test.echo.v1.Echo/Unary"
        assert scan(block, b"grpc-timeout") == b"999m"
        assert scan(block, b"missing") is None
        assert context_free(block)


def test_dynamic_references_are_detected() -> None:
    enc = Encoder()  # default 4096-byte table: the second block references the first one's entries
    enc.encode(REQUEST)
    second = enc.encode(REQUEST)
    assert not context_free(second)


def test_status_of_trailers() -> None:
    enc = Encoder()
    enc.header_table_size = 0
    block = enc.encode([("grpc-status", "12"), ("grpc-message", "nope")])
    assert status_of(block) == 12
    assert status_of(block) == 12  # cached
    assert status_of(enc.encode([(":status", "200")])) is None


def test_trailers_only_is_a_valid_context_free_block() -> None:
    block = trailers_only(14, "no healthy endpoint: api ✓", with_status=True)
    assert context_free(block)
    headers: dict[str, str] = dict(Decoder().decode(block))  # type: ignore[arg-type]
    assert headers[":status"] == "200" and headers["grpc-status"] == "14"
    assert headers["grpc-message"] == "no healthy endpoint: api %E2%9C%93"
    later: dict[str, str] = dict(Decoder().decode(trailers_only(7, "denied", with_status=False)))  # type: ignore[arg-type]
    assert ":status" not in later and later["grpc-status"] == "7"


def test_frame_layout() -> None:
    f = frame(0x1, 0x4, 3, b"abc")
    assert f[:3] == b"\x00\x00\x03" and f[3] == 1 and f[4] == 4 and f[5:9] == b"\x00\x00\x00\x03" and f[9:] == b"abc"


def test_message_framing_across_frames() -> None:
    from sidecar.h2.grpc import Messages as _Messages

    def msg(n: int) -> bytes:
        return b"\x00" + n.to_bytes(4, "big") + b"m" * n

    m = _Messages()
    stream = msg(10) + msg(3000) + msg(7)
    # split at awkward places, including inside a length prefix
    parts = [stream[:3], stream[3:12], stream[12:1000], stream[1000:]]
    assert [m.too_large(p, 4096) for p in parts] == [0, 0, 0, 0]
    assert m.rest == 0 and m.head == b""
    m2 = _Messages()
    big = msg(5000)
    assert m2.too_large(big[:2], 4096) == 0
    assert m2.too_large(big[2:100], 4096) == 5000


def test_message_framing_finds_the_first_oversized_message_however_the_frames_split() -> None:
    import random

    from sidecar.h2.grpc import Messages as _Messages

    rng = random.Random(7)
    for _ in range(300):
        sizes = [rng.choice((0, 1, 4, 5, 100, 4096, 4097, 9000)) for _ in range(rng.randint(1, 6))]
        stream = b"".join(b"\x00" + n.to_bytes(4, "big") + b"m" * n for n in sizes)
        expected = next((n for n in sizes if n > 4096), 0)
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 8))))
        parts = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        m = _Messages()
        found = next((v for v in (m.too_large(p, 4096) for p in parts) if v), 0)
        assert found == expected, (sizes, cuts)
        if not expected:
            assert m.rest == 0 and m.head == b""


def test_headers_of_decodes_every_header_of_a_context_free_block() -> None:
    from sidecar.h2_proxy import headers_of

    enc = Encoder()
    enc.header_table_size = 0
    block = enc.encode(REQUEST)
    got = [(k.decode(), v.decode()) for k, v in headers_of(block)]
    assert got == REQUEST
    dynamic = Encoder()
    dynamic.encode(REQUEST)
    import pytest

    with pytest.raises(ValueError, match="dynamic entry"):
        headers_of(dynamic.encode(REQUEST))


def test_the_huffman_cache_is_bounded_in_entries_and_entry_size() -> None:
    from sidecar.h2 import hpack as h

    enc = Encoder()
    enc.header_table_size = 0
    long_block = enc.encode([("x-long", "v" * 5000)], huffman=True)
    assert h.scan(long_block, b"x-long") == b"v" * 5000
    for i in range(h.HUFFMAN_CACHE_ENTRIES + 50):
        h.scan(enc.encode([("x-k", f"value-{i}")], huffman=True), b"x-k")
    entries, largest = h.huffman_cache_size()
    assert entries <= h.HUFFMAN_CACHE_ENTRIES and largest <= h.HUFFMAN_CACHE_MAX_STRING


def test_headers_of_bounds_the_decoded_list() -> None:
    import pytest

    from sidecar.h2.hpack import HeaderListTooLarge, headers_of

    block = bytes([0x82]) * 2000  # 2000 indexed ":method GET": 2 KB that decode to 84 KB of list
    with pytest.raises(HeaderListTooLarge):
        headers_of(block, 64 * 1024)
    assert len(headers_of(block[:10], 64 * 1024)) == 10


def test_truncated_and_malformed_blocks_raise_hpack_errors() -> None:
    import pytest

    from sidecar.h2.hpack import HpackError, context_free, headers_of

    enc = Encoder()
    enc.header_table_size = 0
    block = bytes(enc.encode(REQUEST))
    for cut in (len(block) - 1, len(block) - 3):  # inside the last literal
        with pytest.raises(HpackError):
            headers_of(block[:cut])
    with pytest.raises(HpackError):
        context_free(b"\x40\x7f")  # a literal whose name length runs past the end
    with pytest.raises(HpackError):
        scan(b"\x7f\xff\xff\xff\xff\xff\xff", b":path")  # an integer without end


def test_request_pseudo_headers_are_checked() -> None:
    import pytest

    from sidecar.h2.hpack import MalformedRequest, check_request

    good = [(k.encode(), v.encode()) for k, v in REQUEST]
    check_request(good)
    pseudo = good[:4]
    cases = [([*pseudo, (b":path", b"/other"), *good[4:]], "duplicate"), ([(b"x", b"1"), *good], "after a regular"),
             ([(b":bogus", b"1"), *good], "unknown"), (good[1:], "missing"), ([*good, (b"X-Up", b"1")], "uppercase")]
    for bad, why in cases:
        with pytest.raises(MalformedRequest, match=why):
            check_request(bad)


def test_scan_refuses_a_value_that_runs_past_the_block_even_unread() -> None:
    from sidecar.h2.hpack import HpackError

    # a literal with a new name "a" and a value whose length (5) runs past the block's end
    block = bytes([0x00, 0x01]) + b"a" + bytes([0x05]) + b"xy"
    with pytest.raises(HpackError):
        scan(block, b"zzz")
