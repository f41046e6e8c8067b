"""catalog.http1 driven by scripted bytes: no sockets, a StreamReader fed by the test and a writer that
records what the client sent."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from catalog import http1


class _Writer:
    def __init__(self) -> None:
        self.sent = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sent += data

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True


def _conn(data: bytes, *, eof: bool = True,
          max_body: int = http1.MAX_BODY_BYTES) -> tuple[http1.Http1Connection, _Writer]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    writer = _Writer()
    conn = http1.Http1Connection(reader, writer, max_body=max_body)  # type: ignore[arg-type]
    return conn, writer


async def _get(data: bytes, **kw: Any) -> tuple[int, list[tuple[str, str]], bytes]:
    conn, _ = _conn(data, **kw)
    return await conn.roundtrip("GET", "/v1/status/leader", [("Host", "x")], b"")


async def test_content_length_and_request_bytes() -> None:
    conn, writer = _conn(b"HTTP/1.1 200 OK\r\nX-Consul-Index: 7\r\nContent-Length: 2\r\n\r\nok", eof=False)
    status, headers, body = await conn.roundtrip("PUT", "/v1/kv/a", [("Host", "h:1"), ("X-Consul-Token", "t")],
                                                 b"val")
    assert (status, body) == (200, b"ok") and ("x-consul-index", "7") in headers
    assert writer.sent.startswith(b"PUT /v1/kv/a HTTP/1.1\r\n")
    assert b"X-Consul-Token: t\r\n" in writer.sent and b"Content-Length: 3\r\n" in writer.sent
    assert writer.sent.endswith(b"\r\n\r\nval")
    assert conn.reusable


async def test_chunked_body() -> None:
    status, _, body = await _get(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert (status, body) == (200, b"abcde")


async def test_connection_close_is_not_reused() -> None:
    conn, _ = _conn(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx")
    assert (await conn.roundtrip("GET", "/", [("Host", "x")], b""))[2] == b"x"
    assert not conn.reusable


async def test_huge_head_is_refused() -> None:
    with pytest.raises(http1.ResponseError):
        await _get(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * (http1.MAX_HEAD_BYTES + 10), eof=False)


async def test_endless_chunked_body_stops_at_the_limit() -> None:
    reader = asyncio.StreamReader()
    writer = _Writer()
    conn = http1.Http1Connection(reader, writer, max_body=1000)  # type: ignore[arg-type]
    reader.feed_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(200):   # 20 kB of chunks offered, never a last chunk
        reader.feed_data(b"64\r\n" + b"x" * 100 + b"\r\n")
    with pytest.raises(http1.ResponseError, match="limit of 1000 bytes"):
        await conn.roundtrip("GET", "/", [("Host", "x")], b"")
    assert not conn.reusable


async def test_content_length_over_the_limit() -> None:
    with pytest.raises(http1.ResponseError, match="MAX_BODY_BYTES"):
        await _get(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"y" * 5000, max_body=100)


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",           # bad chunk size
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",                               # truncated body
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",                   # truncated chunk
    b"\x16\x03\x01\x02\x00garbage that is not HTTP\r\n\r\n",                            # not HTTP
    b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n",                                  # bad length
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab",             # conflicting lengths
])
async def test_hostile_responses_fail_the_request(data: bytes) -> None:
    with pytest.raises(http1.ResponseError):
        await _get(data)


async def test_close_before_any_byte_is_connection_lost() -> None:
    with pytest.raises(http1.ConnectionLost):
        await _get(b"")


async def test_pool_resends_get_once_but_not_put() -> None:
    answers = [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
    opened: list[_Writer] = []

    async def opener() -> Any:
        reader = asyncio.StreamReader()
        reader.feed_data(answers[len(opened) % 2])
        reader.feed_eof()
        opened.append(_Writer())
        return reader, opened[-1]

    pool = http1.Http1Pool(opener)
    assert (await pool.request("GET", "/", [("Host", "x")], b""))[2] == b"ok"
    assert len(opened) == 2 and opened[0].closed and not opened[1].closed   # the second one is pooled
    # the server has since closed the pooled connection: a PUT on it fails and is not resent
    with pytest.raises(http1.ConnectionLost):
        await pool.request("PUT", "/", [("Host", "x")], b"v")
    assert len(opened) == 2 and opened[1].closed
    pool.close()


async def test_pool_reuses_keep_alive_connections() -> None:
    opened = 0

    async def opener() -> Any:
        nonlocal opened
        opened += 1
        reader = asyncio.StreamReader()
        reader.feed_data(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na" * 3)
        return reader, _Writer()

    pool = http1.Http1Pool(opener)
    for _ in range(3):
        assert (await pool.request("GET", "/", [("Host", "x")], b""))[2] == b"a"
    assert opened == 1
    pool.close()
