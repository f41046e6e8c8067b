"""KV endpoints of the dev agent, through py-consul (sync and asyncio) and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import consul
import consul.aio
import pytest

from tests.support import DevAgent, agent_http

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def agent() -> Iterator[DevAgent]:
    a = DevAgent()
    try:
        yield a
    finally:
        a.stop()


def _client(agent: DevAgent) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=agent.port)


def test_put_get_flags_and_shape(agent: DevAgent) -> None:
    c = _client(agent)
    assert c.kv.put("kvt/a", "hello", flags=42) is True
    index, entry = c.kv.get("kvt/a")
    assert entry["Value"] == b"hello"
    assert entry["Flags"] == 42
    assert entry["LockIndex"] == 0
    assert entry["CreateIndex"] == entry["ModifyIndex"] == int(index)
    assert "Session" not in entry
    # missing key: 404 carrying X-Consul-Index
    status, headers, body = agent_http(agent, "GET", "/v1/kv/kvt/missing")
    assert status == 404 and body == b""
    assert int(headers["X-Consul-Index"]) >= 1
    assert headers["X-Consul-KnownLeader"] == "true"
    status, _, body = agent_http(agent, "GET", "/v1/kv/kvt/a?raw")
    assert status == 200 and body == b"hello"


def test_recurse_keys_separator(agent: DevAgent) -> None:
    c = _client(agent)
    for k in ("rk/a", "rk/b/c", "rk/b/d", "rk/e/f/g"):
        c.kv.put(k, k)
    _, entries = c.kv.get("rk/", recurse=True)
    assert [e["Key"] for e in entries] == ["rk/a", "rk/b/c", "rk/b/d", "rk/e/f/g"]
    _, keys = c.kv.get("rk/", keys=True, separator="/")
    assert keys == ["rk/a", "rk/b/", "rk/e/"]
    _, keys = c.kv.get("rk/", keys=True)
    assert keys == ["rk/a", "rk/b/c", "rk/b/d", "rk/e/f/g"]
    _, none = c.kv.get("nothing-here/", recurse=True)
    assert none is None


def test_cas(agent: DevAgent) -> None:
    c = _client(agent)
    assert c.kv.put("cas/k", "1", cas=0) is True
    assert c.kv.put("cas/k", "2", cas=0) is False  # cas=0 creates only
    _, entry = c.kv.get("cas/k")
    assert c.kv.put("cas/k", "3", cas=entry["ModifyIndex"] + 1000) is False
    assert c.kv.put("cas/k", "3", cas=entry["ModifyIndex"]) is True
    _, entry2 = c.kv.get("cas/k")
    assert entry2["Value"] == b"3" and entry2["CreateIndex"] == entry["CreateIndex"]
    assert c.kv.delete("cas/k", cas=entry["ModifyIndex"]) is False
    assert c.kv.delete("cas/k", cas=entry2["ModifyIndex"]) is True
    assert c.kv.get("cas/k")[1] is None


def test_delete_recurse_and_index_moves(agent: DevAgent) -> None:
    c = _client(agent)
    c.kv.put("del/a", "1")
    c.kv.put("del/b/c", "2")
    c.kv.put("dela", "3")
    index_before, _ = c.kv.get("del/", recurse=True)
    assert c.kv.delete("del/", recurse=True) is True
    index_after, gone = c.kv.get("del/", recurse=True)
    assert gone is None
    assert int(index_after) > int(index_before)  # the tombstones move the prefix index
    assert c.kv.get("dela")[1]["Value"] == b"3"


def test_too_large_and_bad_requests(agent: DevAgent) -> None:
    status, _, body = agent_http(agent, "PUT", "/v1/kv/big", b"x" * (512 * 1024 + 1))
    assert status == 413 and b"too large" in body
    status, _, _ = agent_http(agent, "PUT", "/v1/kv/ok-size", b"x" * (512 * 1024))
    assert status == 200
    status, _, body = agent_http(agent, "PUT", "/v1/kv/x?cas=1&acquire=abc", b"")
    assert status == 400 and body.startswith(b"Conflicting flags")
    status, _, body = agent_http(agent, "PUT", "/v1/kv/x?flags=notanumber", b"")
    assert status == 400
    status, _, body = agent_http(agent, "GET", "/v1/kv/")
    assert status == 400 and body == b"Missing key name"
    status, _, body = agent_http(agent, "GET", "/v1/kv/x?index=abc")
    assert status == 400 and body == b"Invalid index"
    status, _, body = agent_http(agent, "GET", "/v1/kv/x?index=1&wait=forever")
    assert status == 400 and body == b"Invalid wait time"
    status, _, body = agent_http(agent, "PUT", "/v1/kv/a/..%2fb", b"x")  # Consul 1.22 key validation
    assert status == 400 and b"traversal" in body
    status, _, body = agent_http(agent, "PUT", "/v1/kv/%20padded", b"x")
    assert status == 400 and b"spaces" in body
    status, headers, body = agent_http(agent, "POST", "/v1/kv/x")
    assert status == 405 and "PUT" in headers["Allow"]
    status, _, _ = agent_http(agent, "GET", "/v1/no-such-endpoint")
    assert status == 404
    # still serving
    status, _, body = agent_http(agent, "GET", "/v1/status/leader")
    assert status == 200 and json.loads(body)


def test_blocking_wakes_on_change_and_only_on_change(agent: DevAgent) -> None:
    c = _client(agent)
    c.kv.put("blk/key", "v1")
    index, _ = c.kv.get("blk/key")
    # an unrelated write does not answer a query on an existing key
    done: dict[str, object] = {}

    def block() -> None:
        t0 = time.monotonic()
        done["result"] = c.kv.get("blk/key", index=index, wait="30s")
        done["elapsed"] = time.monotonic() - t0

    th = threading.Thread(target=block)
    th.start()
    time.sleep(0.5)
    c.kv.put("blk/other", "x")
    time.sleep(0.5)
    assert th.is_alive(), "an unrelated write woke the blocking query"
    c.kv.put("blk/key", "v2")
    th.join(20)
    assert not th.is_alive()
    result: Any = done["result"]
    new_index, entry = result
    assert entry["Value"] == b"v2" and int(new_index) > int(index)


def test_blocking_times_out_with_same_index(agent: DevAgent) -> None:
    c = _client(agent)
    c.kv.put("blk2/key", "v1")
    index, _ = c.kv.get("blk2/key")
    t0 = time.monotonic()
    index2, entry = c.kv.get("blk2/key", index=index, wait="1s")
    assert time.monotonic() - t0 >= 0.9
    assert index2 == index and entry["Value"] == b"v1"


def test_asyncio_client(agent: DevAgent) -> None:
    async def main() -> None:
        c = consul.aio.Consul(host="127.0.0.1", port=agent.port)
        try:
            assert await c.kv.put("aio/k", "v") is True
            index, entry = await c.kv.get("aio/k")
            waiter = asyncio.ensure_future(c.kv.get("aio/k", index=index, wait="30s"))
            await asyncio.sleep(0.3)
            assert not waiter.done()
            await c.kv.put("aio/k", "w")
            new_index, entry = await asyncio.wait_for(waiter, 20)
            assert entry["Value"] == b"w" and int(new_index) > int(index)
        finally:
            await c.close()

    asyncio.run(main())


def test_one_write_wakes_every_waiter(agent: DevAgent) -> None:
    async def main() -> None:
        c = consul.aio.Consul(host="127.0.0.1", port=agent.port)
        try:
            await c.kv.put("many/k", "0")
            index, _ = await c.kv.get("many/k")
            other_index, _ = await c.kv.get("many/", recurse=True)
            waiters = [asyncio.ensure_future(c.kv.get("many/k", index=index, wait="60s")) for _ in range(50)]
            waiters += [asyncio.ensure_future(c.kv.get("many/", recurse=True, index=other_index, wait="60s"))
                        for _ in range(10)]
            await asyncio.sleep(0.5)
            assert not any(w.done() for w in waiters)
            await c.kv.put("many/k", "1")
            results = await asyncio.wait_for(asyncio.gather(*waiters), 30)
            assert all(int(i) > int(index) for i, _ in results)
            assert all(v["Value"] == b"1" for _, v in results[:50])
            assert all(v[0]["Value"] == b"1" for _, v in results[50:])
        finally:
            await c.close()

    asyncio.run(main())


def test_body_arriving_in_pieces_is_stored_whole(agent: DevAgent) -> None:
    async def main() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
        body = bytes(range(256)) * 1200  # 300 KiB, sent in slices with pauses
        writer.write(f"PUT /v1/kv/pieces HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        for i in range(0, len(body), 40_000):
            writer.write(body[i:i + 40_000])
            await writer.drain()
            await asyncio.sleep(0.05)
        assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
        writer.close()

    asyncio.run(main())
    status, _, stored = agent_http(agent, "GET", "/v1/kv/pieces?raw")
    assert status == 200 and stored == bytes(range(256)) * 1200


def test_a_key_ending_in_a_star_is_an_ordinary_key(agent: DevAgent) -> None:
    # Consul treats "*" as a literal character in a key; weft/intentions/* is how KV intentions name
    # the wildcard destination.
    c = _client(agent)
    assert c.kv.put("weft/intentions/*", b'{"Kind":"service-intentions","Name":"*"}') is True
    _, entry = c.kv.get("weft/intentions/*")
    assert entry is not None and entry["Value"] == b'{"Kind":"service-intentions","Name":"*"}'
    assert c.kv.delete("weft/intentions/*") is True
    _, entry = c.kv.get("weft/intentions/*")
    assert entry is None
