"""``/v1/kv/``: Consul's KV endpoint (GET recurse/keys/separator/raw, PUT flags/cas/acquire/release,
DELETE recurse/cas), with blocking queries and ACL filtering."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from urllib.parse import urlencode

from aiohttp import web

from devagent import kv
from devagent.agent import Agent
from devagent.codec import b64, unb64
from devagent.http import (
    MAX_BODY,
    Endpoint,
    HTTPError,
    QueryResult,
    Req,
    blocking_query,
    json_response,
    meta_headers,
    query_response,
)

TOO_LARGE_URL = "https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size"


TOMBSTONE_TTL = 15 * 60.0  # Consul's tombstone_ttl: how long deletions keep moving prefix indexes
REAP_INTERVAL = 60.0


async def start(agent: Agent) -> None:
    """Reap KV tombstones older than the tombstone TTL, as Consul's tombstone GC does."""
    marks: deque[tuple[float, int]] = deque()

    async def reaper() -> None:
        while True:
            marks.append((time.monotonic(), agent.store.index))
            await asyncio.sleep(REAP_INTERVAL)
            cutoff = 0
            while marks and time.monotonic() - marks[0][0] >= TOMBSTONE_TTL:
                cutoff = marks.popleft()[1]
            if cutoff:
                old = [k for k, t in agent.store.rows("kv_tombstones").items() if int(t["Index"]) <= cutoff]
                if old:
                    with agent.store.write() as tx:
                        for key in old:
                            tx.delete("kv_tombstones", key)

    agent.spawn(reaper(), name="devagent-tombstone-reaper")


def routes(agent: Agent) -> list[Endpoint]:
    return [Endpoint("/v1/kv/{key:.*}", {"GET": kv_get, "PUT": kv_put, "DELETE": kv_delete})]


def _key(r: Req) -> str:
    key = r.match("key")
    if key:
        problem = kv.key_problem(key)
        if problem is not None:
            raise HTTPError(400, problem)
    return key


def _conflicting(r: Req, *flags: str) -> None:
    if sum(1 for f in flags if r.has(f)) > 1:
        raise HTTPError(400, "Conflicting flags: " + urlencode(sorted(r.query.items())))


async def kv_get(r: Req) -> web.StreamResponse:
    key = _key(r)
    store = r.agent.store
    if r.has("keys"):
        sep = r.param("separator", r.param("seperator"))

        def run_keys() -> QueryResult:
            idx, keys, topics = kv.list_keys(store, key, sep)
            authz = r.authz
            visible = [k for k in keys if authz.key_read(k)]
            return QueryResult(idx, visible, topics, filtered=len(visible) != len(keys))

        res = await blocking_query(r, run_keys, share=True)
        if not res.value and key != "":
            return query_response(r, QueryResult(res.index, None, (), filtered=res.filtered),
                                  not_found_when_none=True)
        return query_response(r, res)
    if r.has("recurse"):
        def run_list() -> QueryResult:
            idx, rows, topics = kv.list_prefix(store, key)
            authz = r.authz
            visible = [row for row in rows if authz.key_read(str(row["Key"]))]
            return QueryResult(idx, visible, topics, filtered=len(visible) != len(rows))

        res = await blocking_query(r, run_list, share=True)
        if not res.value:
            return query_response(r, QueryResult(res.index, None, (), filtered=res.filtered),
                                  not_found_when_none=True)
        return query_response(r, res)
    if key == "":
        raise HTTPError(400, "Missing key name")
    r.authz.check("key:read", key)

    def run_get() -> QueryResult:
        idx, row, topics = kv.get(store, key)
        return QueryResult(idx, [row] if row is not None else None, topics)

    res = await blocking_query(r, run_get, share=True)
    if res.value is None:
        return web.Response(status=404, headers=meta_headers(r, res.index))
    if r.has("raw"):
        value = res.value[0].get("Value")
        body = unb64(value) if value else b""
        headers = meta_headers(r, res.index)
        headers.update({"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"})
        return web.Response(body=body, headers=headers, content_type="text/plain")
    return query_response(r, res)


async def kv_put(r: Req) -> web.StreamResponse:
    key = _key(r)
    r.check_dc()
    if key == "":
        raise HTTPError(400, "Missing key name")
    _conflicting(r, "cas", "acquire", "release")
    r.authz.check("key:write", key)
    flags = r.uint_param("flags")
    cas = r.uint_param("cas") if r.has("cas") else None
    length = r.raw.content_length
    if length is not None and length > MAX_BODY:
        raise HTTPError(413, f"Request body({length} bytes) too large, max size: {MAX_BODY} bytes. "
                             f"See {TOO_LARGE_URL}.")
    data = await r.body(MAX_BODY, too_large=f"Request body too large, max size: {MAX_BODY} bytes. "
                                            f"See {TOO_LARGE_URL}.")
    value = b64(data) if data else None
    agent = r.agent
    with agent.store.write() as tx:
        try:
            if r.has("acquire"):
                session = r.param("acquire")
                if kv.lock_delay_active(agent.lock_delays, key):
                    ok = False
                else:
                    ok = kv.kv_lock(tx, key, value, flags, session)
            elif r.has("release"):
                ok = kv.kv_unlock(tx, key, value, flags, r.param("release"))
            elif cas is not None:
                ok = kv.kv_cas(tx, key, value, flags, cas)
            else:
                kv.kv_set(tx, key, value, flags)
                ok = True
        except kv.KVError as exc:
            raise HTTPError(500, str(exc)) from None
    return json_response(r, ok)


async def kv_delete(r: Req) -> web.StreamResponse:
    key = _key(r)
    r.check_dc()
    _conflicting(r, "recurse", "cas")
    store = r.agent.store
    if r.has("recurse"):
        r.authz.check_key_write_prefix(key)
        with store.write() as tx:
            kv.kv_delete_tree(store, tx, key)
        return json_response(r, True)
    if key == "":
        raise HTTPError(400, "Missing key name")
    r.authz.check("key:write", key)
    if r.has("cas"):
        cas = r.uint_param("cas")
        with store.write() as tx:
            ok = kv.kv_delete_cas(tx, key, cas)
        return json_response(r, ok)
    with store.write() as tx:
        kv.kv_delete(tx, key)
    return json_response(r, True)
