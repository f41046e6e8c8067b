"""The tap's pure core: filters, settings documents, redaction, previews and the hub's bounded queues."""

from __future__ import annotations

import base64
import json

import pytest

from sidecar.tap import (
    OFF,
    REDACTED,
    CallRecord,
    TapError,
    TapFilter,
    TapHub,
    TapSettings,
    TapStream,
    filter_query,
    grpc_messages,
    parse_filter,
    parse_settings,
    redact_headers,
    redact_json,
    redact_text,
    render,
)


def _framed(*messages: bytes) -> bytes:
    return b"".join(b"\x00" + len(m).to_bytes(4, "big") + m for m in messages)


# -- filters ---------------------------------------------------------------------------------------

def test_filter_from_query_and_back() -> None:
    f = parse_filter("direction=inbound&source=frontend&method=/demo.Greeter/&status=OK&min_ms=2.5&limit=3"
                     "&payload=1")
    assert f == TapFilter(direction="inbound", source="frontend", method="/demo.Greeter/", status="OK",
                          min_ms=2.5, limit=3, payload=True)
    assert parse_filter(filter_query(f)) == f
    assert parse_filter("") == TapFilter()
    assert parse_filter("path=/api").method == "/api"


@pytest.mark.parametrize("query, words", [
    ("direction=sideways", "direction"),
    ("limit=0", "limit"),
    ("limit=abc", "limit"),
    ("min_ms=-1", "min_ms"),
    ("min_ms=nan", "min_ms"),
    ("status=ok%20please", "status"),
    ("source=a%20b", "source"),
    ("payload=yes", "payload"),
    ("colour=blue", "unknown tap parameter"),
    ("limit=1&limit=2", "given 2 times"),
    ("method=/a&path=/b", "not both"),
    ("limit=1&" * 40, "fields"),
    ("method=" + "a" * 5000, "at most 4096"),
    ("method=/a%00b", "printable"),
])
def test_bad_filters_are_refused_naming_the_parameter(query: str, words: str) -> None:
    with pytest.raises(TapError, match=words):
        parse_filter(query)


def _rec(direction: str = "inbound", source: str = "frontend", destination: str = "greeter",
         method: str = "/demo.Greeter/Hello", status: str = "OK", ms: float = 5.0, **kw: object) -> CallRecord:
    rec = CallRecord(direction, source, destination, method, **kw)  # type: ignore[arg-type]
    rec.status = status
    rec.seconds = ms / 1000
    return rec


def test_filter_matching() -> None:
    rec = _rec()
    assert TapFilter().matches(rec)
    assert TapFilter(direction="inbound", source="frontend", destination="greeter").matches(rec)
    assert not TapFilter(direction="outbound").matches(rec)
    assert not TapFilter(source="other").matches(rec)
    assert TapFilter(method="/demo.Greeter/").matches(rec)
    assert not TapFilter(method="/demo.Other/").matches(rec)
    assert not TapFilter(status="NOT_FOUND").matches(rec)
    assert TapFilter(min_ms=5.0).matches(rec) and not TapFilter(min_ms=5.1).matches(rec)
    http = _rec(method="GET /api", path="/api/users?id=1", protocol="http", status="503")
    assert TapFilter(status="5xx").matches(http) and not TapFilter(status="4xx").matches(http)
    assert TapFilter(method="/api/users").matches(http) and TapFilter(method="GET /api").matches(http)


# -- settings --------------------------------------------------------------------------------------

def test_settings_document() -> None:
    assert parse_settings(None) == OFF and parse_settings(b"") == OFF
    s = parse_settings(b'{"Payload": true, "MaxBytes": 64, "Redact": ["X-Api-Key", "password"], '
                       b'"AllowBinary": ["grpc-status-details-bin"]}')
    assert s == TapSettings(payload=True, max_bytes=64, redact=("x-api-key", "password"),
                            allow_binary=frozenset({"grpc-status-details-bin"}))


@pytest.mark.parametrize("doc, words", [
    (b"{", "not JSON"),
    (b"[]", "JSON object"),
    (b'{"Paylaod": true}', "unknown field 'Paylaod'"),
    (b'{"Payload": "yes"}', "Payload must be true or false"),
    (b'{"MaxBytes": 0}', "MaxBytes"),
    (b'{"MaxBytes": 1000000}', "MaxBytes"),
    (b'{"MaxBytes": true}', "MaxBytes"),
    (b'{"Redact": "password"}', "Redact must be a list"),
    (b'{"Redact": [""]}', "Redact"),
    (b'{"AllowBinary": ["x-trace"]}', "not a -bin key"),
])
def test_bad_settings_documents_name_the_field(doc: bytes, words: str) -> None:
    with pytest.raises(TapError, match=words):
        parse_settings(doc, key="weft/tap/greeter")


# -- redaction -------------------------------------------------------------------------------------

def test_header_redaction() -> None:
    s = TapSettings(redact=("x-api-key",), allow_binary=frozenset({"grpc-status-details-bin"}))
    out = redact_headers([(b"authorization", b"Bearer s3cret"), ("Cookie", "a=b"), ("set-cookie", "c=d"),
                          ("x-consul-token", "t"), ("proxy-authorization", "p"), ("trace-bin", "AAA"),
                          ("grpc-status-details-bin", "BBB"), ("X-Api-Key", "k"), ("x-ok", "1"), ("x-ok", "2")], s)
    assert out == {"authorization": REDACTED, "cookie": REDACTED, "set-cookie": REDACTED,
                   "x-consul-token": REDACTED, "proxy-authorization": REDACTED, "trace-bin": REDACTED,
                   "grpc-status-details-bin": "BBB", "x-api-key": REDACTED, "x-ok": ["1", "2"]}


def test_truncated_text_is_redacted_by_pattern() -> None:
    s = TapSettings(redact=("password",))
    text = '{"user": "ann", "password": "hunter2", "db_password": "x'
    out = redact_text(text, s)
    assert "hunter2" not in out and '"user": "ann"' in out and '"x' not in out.replace(REDACTED, "")
    assert "hunter2" not in redact_text("user=ann&password=hunter2", s)
    assert "hunter2" not in redact_text("GET /x HTTP/1.1\nAuthorization: Bearer hunter2\nHost: h", s)
    embedded = {"body": '{"password": "hunter2"}', "note": "/login?password=hunter2"}
    assert "hunter2" not in json.dumps(redact_json(embedded, s))


def test_render_redacts_everywhere_and_previews_payloads() -> None:
    s = TapSettings(payload=True, max_bytes=1024, redact=("password",))
    rec = _rec(max_bytes=s.max_bytes)
    rec.request_headers = [(b":path", b"/demo.Greeter/Hello"), (b"authorization", b"Bearer s3cret")]
    rec.response_headers = [(b":status", b"200")]
    rec.trailers = [(b"grpc-status", b"0")]
    rec.request_data(_framed(b'{"name": "ann", "password": "s3cret"}'))
    rec.response_data(_framed(b"\xff\x00\x01"))
    line = json.dumps(render(rec, s))
    assert "s3cret" not in line
    out = json.loads(line)
    assert out["request"]["headers"]["authorization"] == REDACTED
    assert out["request"]["messages"] == [{"bytes": 37, "json": {"name": "ann", "password": REDACTED}}]
    assert out["response"]["messages"] == [{"bytes": 3, "base64": base64.b64encode(b"\xff\x00\x01").decode()}]
    assert out["response"]["trailers"] == {"grpc-status": "0"}


def test_grpc_messages_decoded_with_a_decoder_and_redacted() -> None:
    s = TapSettings(payload=True, redact=("token",))
    rec = _rec(max_bytes=1024)
    rec.request_data(_framed(b"m1", b"m2"))

    def decoder(method: str, is_request: bool, data: bytes) -> object:
        assert method == "/demo.Greeter/Hello" and is_request
        return {"n": data.decode(), "api_token": "s3cret"}

    out = render(rec, s, decoder)
    assert out["request"]["messages"] == [{"bytes": 2, "json": {"n": "m1", "api_token": REDACTED}},
                                          {"bytes": 2, "json": {"n": "m2", "api_token": REDACTED}}]


def test_payload_capped_at_max_bytes() -> None:
    rec = _rec(max_bytes=8)
    rec.request_data(_framed(b"0123456789"))
    rec.request_data(b"more")
    assert len(rec.request_body or b"") == 8 and rec.request_bytes == 19
    assert grpc_messages(bytes(rec.request_body or b"")) == [(False, b"012", False)]
    out = render(rec, TapSettings(payload=True, max_bytes=8))
    assert out["request"]["messages"] == [{"bytes": 3, "truncated": True, "text": "012"}]


def test_http_body_and_query_previews() -> None:
    s = TapSettings(payload=True, redact=("password",))
    rec = _rec(method="POST /login", path="/login?user=ann&password=s3cret", protocol="http", status="200",
               max_bytes=1024)
    rec.request_data(b'{"user": "ann", "password": "s3cret"}')
    rec.response_data(b"welcome")
    out = render(rec, s)
    assert "s3cret" not in json.dumps(out)
    assert out["path"] == f"/login?user=ann&password={REDACTED}"
    assert out["request"]["body"] == {"json": {"user": "ann", "password": REDACTED}}
    assert out["response"]["body"] == {"text": "welcome"}


def test_payload_off_is_said_not_captured() -> None:
    hub = TapHub(settings=lambda: OFF)
    hub.subscribe(TapFilter(payload=True), lambda: None)
    rec = hub.start("inbound", "frontend", "greeter", "/demo.Greeter/Hello")
    assert rec is not None and rec.request_body is None
    out = render(rec, OFF)
    assert "off for greeter" in out["payload"] and "messages" not in out["request"]


# -- the hub ---------------------------------------------------------------------------------------

def test_hub_costs_nothing_without_taps_and_matches_by_parties() -> None:
    hub = TapHub(settings=lambda: TapSettings(payload=True, max_bytes=16))
    assert not hub.active and not hub.wants_calls_from("frontend", "greeter")
    sub = hub.subscribe(TapFilter(source="frontend"), lambda: None)
    assert hub.active
    assert hub.start("inbound", "other", "greeter", "/x/y") is None
    rec = hub.start("inbound", "frontend", "greeter", "/x/y")
    assert rec is not None and rec.max_bytes == 0  # no payload tap open
    hub.finish(rec, "OK", 0.001)
    assert [r.method for r in sub.take()] == ["/x/y"]
    assert hub.wants_calls_from("frontend", "greeter") and not hub.wants_calls_from("other", "greeter")
    payload_sub = hub.subscribe(TapFilter(payload=True), lambda: None)
    rec2 = hub.start("outbound", "greeter", "db", "/db/Get")
    assert rec2 is not None and rec2.max_bytes == 16
    hub.unsubscribe(sub)
    hub.unsubscribe(payload_sub)
    assert not hub.active and hub.subscribers == []


def test_slow_reader_drops_and_counts() -> None:
    drops: list[int] = []
    hub = TapHub(on_drop=lambda: drops.append(1))
    woken: list[int] = []
    sub = hub.subscribe(TapFilter(), lambda: woken.append(1), capacity=3)
    for i in range(10):
        rec = hub.start("inbound", "a", "b", f"/s/m{i}")
        assert rec is not None
        hub.finish(rec, "OK", 0.0)
    assert len(sub.queue) == 3 and sub.dropped == 7 and hub.dropped == 7 and len(drops) == 7
    stream = TapStream(sub, lambda: OFF)
    lines = [json.loads(line) for line in stream.lines()]
    assert [x["method"] for x in lines[:3]] == ["/s/m0", "/s/m1", "/s/m2"]
    assert lines[3] == {"dropped": 7}


def test_stream_stops_at_limit_and_too_many_taps_are_refused() -> None:
    hub = TapHub(max_taps=2)
    sub = hub.subscribe(TapFilter(limit=2), lambda: None)
    hub.subscribe(TapFilter(), lambda: None)
    with pytest.raises(TapError, match="at most 2"):
        hub.subscribe(TapFilter(), lambda: None)
    for _ in range(3):
        rec = hub.start("inbound", "a", "b", "/s/m")
        assert rec is not None
        hub.finish(rec, "OK", 0.0)
    stream = TapStream(sub, lambda: OFF)
    assert len(stream.lines()) == 2 and stream.done


def test_max_rps_bounds_what_a_tap_records() -> None:
    now = [100.0]
    hub = TapHub(clock=lambda: now[0])
    capped = hub.subscribe(parse_filter("max_rps=2"), lambda: None)
    uncapped = hub.subscribe(parse_filter("max_rps=0&method=/s/"), lambda: None)
    assert parse_filter("").max_rps == 100.0 and filter_query(parse_filter("max_rps=0")) == "max_rps=0.0"
    for _ in range(5):
        rec = hub.start("inbound", "a", "b", "/s/m")
        assert rec is not None
        hub.finish(rec, "OK", 0.0)
    assert len(capped.queue) == 2 and capped.skipped == 3 and capped.dropped == 0
    assert len(uncapped.queue) == 5 and uncapped.skipped == 0
    assert hub.start("inbound", "a", "b", "/other/m") is None  # capped has no tokens, uncapped's method differs
    now[0] += 1.0  # a second later: two more
    for _ in range(3):
        rec = hub.start("inbound", "a", "b", "/t/m")
        if rec is not None:
            hub.finish(rec, "OK", 0.0)
    assert len(capped.queue) == 4
    lines = [json.loads(x) for x in TapStream(capped, lambda: OFF).lines()]
    assert lines[-1] == {"skipped": 5, "max_rps": 2.0}
    with pytest.raises(TapError, match="max_rps"):
        parse_filter("max_rps=-1")


def test_raw_header_blocks_are_decoded_on_the_readers_side_once() -> None:
    from sidecar.tap import HeaderBlock

    calls: list[bytes] = []

    def decode(raw: bytes) -> list[tuple[bytes, bytes]]:
        calls.append(raw)
        if raw == b"bad":
            raise ValueError("dynamic table reference")
        return [(b"authorization", b"Bearer s3cret"), (b"grpc-status", b"0")]

    s = TapSettings()
    first = redact_headers(HeaderBlock(decode, b"block-1"), s)
    again = redact_headers(HeaderBlock(decode, b"block-1"), s)
    assert first == again == {"authorization": REDACTED, "grpc-status": "0"}
    assert calls == [b"block-1"]
    assert redact_headers(HeaderBlock(decode, b"bad"), s) == {"weft-tap": "unreadable header block"}
    # other settings: rendered again, with their own redaction
    assert redact_headers(HeaderBlock(decode, b"block-1"), TapSettings(redact=("grpc-status",)))["grpc-status"] \
        == REDACTED


# -- the reader's side, made cheap: what it skips must never change what it shows ------------------

def test_the_needle_check_skips_only_texts_with_nothing_to_redact() -> None:
    """Redactor.text skips the patterns for a text without a needle; over texts built from names,
    separators and values (secret names in several cases included), that never changes the result."""
    import random

    from sidecar.tap import redactor_for

    s = TapSettings(redact=("password", "x-api-key"), allow_binary=frozenset({"ok-bin"}))
    red = redactor_for(s)
    names = ["user", "Password", "db_PASSWORD", "x-api-key", "X-Api-Key2", "Authorization", "cookie", "trace-bin",
             "ok-bin", "note", "passw", "ord", "ΣPASSWORD", "İd", "pass%77ord", "x-consul-token", "set-Cookie"]
    seps = ['"{}": "{}"', "{}={}", "{}: {}", "{}:{}", '"{}":{}', "{} {}"]
    joins = ["&", "\n", ", ", " ", "?", ""]
    r = random.Random(5)
    seen_hidden = seen_clear = 0
    for _ in range(3000):
        parts = [r.choice(seps).format(r.choice(names), r.choice(["s3cret", "1", '"q"', "a=b"]))
                 for _ in range(r.randint(1, 4))]
        text = r.choice(joins).join(parts)
        full = red.substitute(text)
        assert red.text(text) == full, text
        if full != text:
            seen_hidden += 1
            assert red.may_hide(text)
        else:
            seen_clear += 1
    assert seen_hidden > 100 and seen_clear > 100  # both kinds were exercised
    assert not red.may_hide("eHh4eHh4eA==") and red.text("eHh4eHh4eA==") == "eHh4eHh4eA=="
    assert redactor_for(TapSettings(redact=("password", "x-api-key"), allow_binary=frozenset({"ok-bin"}))) is red


def test_text_previews_as_before_for_cut_utf8_and_control_characters() -> None:
    from sidecar.tap import _textual, preview_bytes

    assert _textual("héllo".encode()) == "héllo"
    assert _textual("héllo €".encode()[:-1]) == "héllo "  # a character cut at MaxBytes is held back
    assert _textual(b"\xff\xfe") is None and _textual(b"a\x00b") is None and _textual(b"a\x1bb") is None
    assert _textual(b"tab\tcr\rlf\n") == "tab\tcr\rlf\n"
    assert preview_bytes(b" \n[1, 2]", OFF) == {"json": [1, 2]}
    assert preview_bytes(b"Infinity", OFF)["json"] == float("inf")  # what json.loads accepts, still JSON
    assert preview_bytes(b"hello: {", OFF) == {"text": "hello: {"}
    assert preview_bytes(b"\x00\x01", OFF) == {"base64": "AAE="}


def test_json_lines_fall_back_to_json_dumps_for_what_orjson_refuses() -> None:
    from sidecar.tap import json_line, timestamp

    assert json_line({"a": "é", "n": [1, 2.5, None, True]}) == '{"a":"é","n":[1,2.5,null,true]}\n'.encode()
    big = json_line({"n": 2**70})
    assert big == b'{"n":1180591620717411303424}\n'
    assert json.loads(json_line({"s": "\ud800"})) == {"s": "\ud800"}  # a lone surrogate from a parsed body
    assert json.loads(json_line({1: "x"})) == {"1": "x"}
    assert timestamp(1767323045.6789) == "2026-01-02T03:04:05.678Z"
    assert timestamp(1767323045.0) == "2026-01-02T03:04:05.000Z"
    assert timestamp(1767323046.001) == "2026-01-02T03:04:06.001Z"
