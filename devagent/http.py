"""The HTTP toolkit endpoint modules use: ``Endpoint``, ``Req``, errors, responses, blocking queries.

A handler is ``async def handler(r: Req) -> web.StreamResponse``. Raise ``HTTPError(status, text)``
for a Consul-style error (plain-text body), ``DecodeError`` for a 400, ``acl.PermissionDenied`` for
a 403; anything else becomes a 500 with the exception's message, and the agent keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import weakref
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from devagent import acl
from devagent.codec import SECOND, DecodeError, parse_duration, parse_uint
from devagent.state import Store, Topic

if TYPE_CHECKING:
    from devagent.agent import Agent

Handler = Callable[["Req"], Awaitable[web.StreamResponse]]

DEFAULT_WAIT = 300 * SECOND  # Consul's default blocking wait (5m)
MAX_WAIT = 600 * SECOND  # and its cap (10m)
JITTER_FRACTION = 16
MAX_BODY = 512 * 1024  # Consul's kv_max_value_size and txn_max_req_len default


@dataclass(frozen=True)
class Endpoint:
    """One path and its handlers by HTTP method (``{"GET": get, "PUT": put}``).

    ``path`` is an aiohttp pattern: ``/v1/kv/{key:.*}``, ``/v1/session/info/{id}``. A method not in
    ``methods`` answers 405 with ``Allow`` as Consul does; OPTIONS answers 200 with ``Allow``.
    """

    path: str
    methods: Mapping[str, Handler]


class HTTPError(Exception):
    """An error answer: ``status`` with ``reason`` as the plain-text body (Consul's HTTPError)."""

    def __init__(self, status: int, reason: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = dict(headers or {})


class ACLDisabled(HTTPError):
    def __init__(self) -> None:
        super().__init__(401, "ACL support disabled")


@dataclass
class QueryResult:
    """What a query function returns to the blocking helper.

    ``index``: the X-Consul-Index of this answer (the index of the data it read);
    ``value``: the JSON-able answer (or None); ``topics``: what to watch for a change;
    ``filtered``: ACLs hid part of the answer (``query_response`` then sends
    ``X-Consul-Results-Filtered-By-ACLs: true`` to a caller that presented a token, as Consul does).
    """

    index: int
    value: Any
    topics: Collection[Topic]
    filtered: bool = False
    body: dict[bool, bytes] = field(default_factory=dict)  # serialised value by ``pretty``, filled lazily
    # optional: ``value`` is a list and ``parts[i]`` is the compact JSON of ``value[i]`` (cached per row
    # by the endpoint), so the compact body is a join instead of a serialisation of the whole list
    parts: list[bytes] | None = None


class Req:
    """A request as endpoint handlers see it (wraps aiohttp's request)."""

    def __init__(self, raw: web.Request, agent: Agent) -> None:
        self.raw = raw
        self.agent = agent
        self.query = raw.query
        # no token in the request: the agent's default token (PUT /v1/agent/token/default), as Consul
        self.token = _token(raw) or agent.tokens.get("default", "")
        self._authz: acl.Authorizer | None = None

    # ----- parameters -----
    def has(self, name: str) -> bool:
        """True when the query string has ``name`` at all (``?recurse``), as Consul tests flags."""
        return name in self.query

    def param(self, name: str, default: str = "") -> str:
        return self.query.get(name, default)

    def uint_param(self, name: str, default: int = 0) -> int:
        text = self.query.get(name)
        if text is None:
            return default
        return parse_uint(text, name)

    def match(self, name: str) -> str:
        return self.raw.match_info.get(name, "")

    @property
    def method(self) -> str:
        return self.raw.method

    # ----- ACLs -----
    @property
    def authz(self) -> acl.Authorizer:
        """The caller's authorizer (allow-all when ACLs are off). Raises ACLNotFound for an unknown token."""
        if self._authz is None:
            self._authz = self.agent.authorizer(self.token)
        return self._authz

    # ----- bodies -----
    async def body(self, limit: int = MAX_BODY, *, too_large: str | None = None) -> bytes:
        """The raw body; over ``limit`` bytes answers 413."""
        length = self.raw.content_length
        if length is not None and length > limit:
            raise HTTPError(413, too_large or f"Request body({length} bytes) too large, max size: {limit} bytes.")
        chunks: list[bytes] = []
        total = 0
        while total <= limit:  # read() answers with what has arrived, so gather until EOF or over the limit
            chunk = await self.raw.content.read(limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise HTTPError(413, too_large or f"Request body too large, max size: {limit} bytes.")
        return data

    async def json(self, *, required: bool = False, limit: int = MAX_BODY,
                   failed: str = "Request decode failed") -> Any:
        """The JSON body (None when empty and not ``required``). Bad JSON answers 400
        ``Request decode failed: ...`` (``failed`` changes the prefix, as some Consul endpoints do)."""
        data = await self.body(limit)
        if not data.strip():
            if required:
                raise HTTPError(400, f"{failed}: EOF")
            return None
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPError(400, f"{failed}: {exc}") from None

    # ----- blocking options -----
    def blocking_options(self) -> tuple[int, float]:
        """(min index, wait seconds including jitter) from ``?index`` and ``?wait`` (Consul's rules)."""
        index = 0
        text = self.query.get("index")
        if text:
            try:
                index = parse_uint(text, "index")
            except DecodeError:
                raise HTTPError(400, "Invalid index") from None
        wait_ns = 0
        text = self.query.get("wait")
        if text:
            try:
                wait_ns = parse_duration(text)
            except DecodeError:
                raise HTTPError(400, "Invalid wait time") from None
        if wait_ns <= 0:
            wait_ns = DEFAULT_WAIT
        wait_ns = min(wait_ns, MAX_WAIT)
        wait_ns += int(random.random() * (wait_ns / JITTER_FRACTION))
        return index, wait_ns / SECOND

    def consistency(self) -> str:
        stale, consistent = self.has("stale"), self.has("consistent")
        if stale and consistent:
            raise HTTPError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
        return "stale" if stale else "consistent" if consistent else "leader"

    def check_dc(self) -> None:
        dc = self.query.get("dc")
        if dc and dc != self.agent.datacenter:
            raise HTTPError(500, "No path to datacenter")


def _token(raw: web.Request) -> str:
    """Consul's order: ?token=, then X-Consul-Token, then Authorization: Bearer."""
    tok = raw.query.get("token", "")
    if tok:
        return tok
    tok = raw.headers.get("X-Consul-Token", "")
    if tok:
        return tok
    auth = raw.headers.get("Authorization", "")
    parts = auth.split(" ")
    if len(parts) > 1 and parts[0].lower() == "bearer":
        value = " ".join(parts[1:]).strip()
        return value.split(" ")[0].strip()
    return ""


# ----- responses -----
def _dumps(value: Any, pretty: bool) -> bytes:
    if pretty:
        return (json.dumps(value, indent=4) + "\n").encode()
    return json.dumps(value, separators=(",", ":")).encode()


def json_response(r: Req, value: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=_dumps(value, r.has("pretty")), content_type="application/json",
                        headers=headers)


def text_response(text: str, status: int, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/plain", charset="utf-8", headers=headers)


def meta_headers(r: Req, index: int) -> dict[str, str]:
    """The QueryMeta headers Consul sets on every read endpoint (setMeta)."""
    return {
        "X-Consul-Index": str(max(index, 1)),
        "X-Consul-KnownLeader": "true",
        "X-Consul-LastContact": "0",
        "X-Consul-Effective-Consistency": r.consistency(),
        "X-Consul-Query-Backend": "blocking-query",
    }


def query_response(r: Req, result: QueryResult, *, not_found_when_none: bool = False) -> web.Response:
    """A read answer with Consul's meta headers; ``None`` with ``not_found_when_none`` answers an empty 404.
    The serialised body is kept on the result, so waiters sharing a result serialise it once."""
    headers = meta_headers(r, result.index)
    if result.filtered and r.token:
        headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
    if result.value is None and not_found_when_none:
        return web.Response(status=404, headers=headers)
    pretty = r.has("pretty")
    body = result.body.get(pretty)
    if body is None:
        if result.parts is not None and not pretty:
            body = b"[" + b",".join(result.parts) + b"]"
        else:
            body = _dumps(result.value, pretty)
        result.body[pretty] = body
    return web.Response(status=200, body=body, content_type="application/json", headers=headers)


_BLOCKING_PARAMS = frozenset({"index", "wait", "hash", "stale", "consistent", "cached", "max_stale"})


def _share_key(r: Req) -> tuple[Any, ...]:
    params = tuple(sorted((k, v) for k, v in r.query.items() if k not in _BLOCKING_PARAMS))
    return (r.raw.path, params, r.token)


_ACL_TOPICS = ("acl_tokens", "acl_policies", "acl_roles")
_KEPT_MAX = 200_000  # list items (or results) kept across indexes (``reuse=True``) per store, in all


class _Kept:
    """A ``reuse=True`` result and what it was read at: the highest index of its topics and of the
    ACL tables. It stays valid while neither moves (and no transaction is open)."""

    __slots__ = ("acl_index", "result", "topic_index")

    def __init__(self, result: QueryResult, topic_index: int, acl_index: int) -> None:
        self.result = result
        self.topic_index = topic_index
        self.acl_index = acl_index


class _KeptResults:
    def __init__(self) -> None:
        self.results: dict[Any, _Kept] = {}
        self.size = 0  # list items (or 1 per other result) held: bounded by _KEPT_MAX


_KEPT: weakref.WeakKeyDictionary[Store, _KeptResults] = weakref.WeakKeyDictionary()


def _size(result: QueryResult) -> int:
    return len(result.value) if isinstance(result.value, list) else 1


def _kept_run(store: Store, key: Any, run: Callable[[], QueryResult]) -> QueryResult:
    kept = _KEPT.get(store)
    if kept is None:
        kept = _KEPT[store] = _KeptResults()
    hit = kept.results.get(key)
    acl_index = store.topic_index(*_ACL_TOPICS)
    if (hit is not None and not store.in_tx and hit.acl_index == acl_index
            and store.topic_index(*hit.result.topics) == hit.topic_index):
        return hit.result
    result = run()
    if not store.in_tx:
        if hit is not None:
            kept.size -= _size(hit.result)
        if kept.size + _size(result) > _KEPT_MAX:
            kept.results.clear()
            kept.size = 0
        kept.results[key] = _Kept(result, store.topic_index(*result.topics), acl_index)
        kept.size += _size(result)
    return result


def _shared_run(r: Req, run: Callable[[], QueryResult], reuse: bool = False) -> QueryResult:
    """``run()``, computed once per store index for every waiter with the same path, query and token
    (with ``reuse``, once for as long as none of the result's topics moves)."""
    store = r.agent.store
    memo: dict[Any, QueryResult] = store.memo()
    key = _share_key(r)
    result = memo.get(key)
    if result is None:
        result = _kept_run(store, key, run) if reuse else run()
        result.index = max(result.index, 1)
        memo[key] = result
    if r.token:
        r.authz  # noqa: B018 -- the token may have expired since: ACLNotFound (403) as run() would raise
    return result


async def blocking_query(r: Req, run: Callable[[], QueryResult], *, share: bool = False,
                         reuse: bool = False) -> QueryResult:
    """Run ``run`` under Consul's blocking rules and return the result to answer with.

    Without ``?index`` (or with 0) it answers at once. Otherwise it waits until the result's index
    exceeds the given one, re-running ``run`` each time a watched topic changes, or until ``wait``
    (default 5m, capped at 10m, plus up to wait/16 jitter) passes, then answers the current result.
    The result index is never below 1.

    ``share=True``: requests of the same query (same path, parameters other than index/wait, and
    token) at the same store index share one result: when a write wakes many waiters, and when
    they all come back with the new index, ``run`` executes once and ``query_response``
    serialises it once. Only for a ``run`` that depends on nothing but the
    request and the store: no side effects, no captured per-request state.

    ``reuse=True`` (with ``share``): the result is also kept across store indexes, for as long as
    none of its ``topics`` and no ACL table has moved (writes elsewhere do not recompute it). Only
    for a ``run`` whose every read is covered by one of the topics it returns, each a topic that
    remembers its index (a table, or one the writers ``tx.touch``; a bare ``(table, key)`` does not).
    """
    r.check_dc()
    r.consistency()
    min_index, wait = r.blocking_options()
    if share:  # also the first run: a storm of clients re-arming after a wake-up computes it once
        result = _shared_run(r, run, reuse)
    else:
        result = run()
        result.index = max(result.index, 1)
    if min_index == 0 or result.index > min_index:
        return result
    store = r.agent.store
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return result
        topics = list(result.topics)
        await wait_for_change(store, topics, remaining)
        if share:
            result = _shared_run(r, run, reuse)
        else:
            result = run()
            result.index = max(result.index, 1)
        if result.index > min_index or store.closing:
            return result


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def wait_for_change(store: Store, topics: list[Topic], timeout: float | None) -> None:
    """Wait until a commit touches one of ``topics`` or ``timeout`` seconds pass (``None``: no
    timeout); no polling. Once the store is closing it returns at once, so a caller's loop must stop
    on ``store.closing``; it still yields to the event loop every time, so a loop that forgets
    cannot starve it (and with it signal handling and the shutdown)."""
    fut = store.watch(topics)
    handle = None if timeout is None else asyncio.get_running_loop().call_later(timeout, _expire, fut)
    try:
        if fut.done():
            # awaiting a done future does not suspend: without this, `while ...: await wait_for_change()`
            # after close_watches() spins inside one event-loop step forever
            await asyncio.sleep(0)
        else:
            await fut
    finally:
        if handle is not None:
            handle.cancel()
        store.unwatch(fut, topics)




def content_hash(value: Any) -> str:
    """A stable 16-hex-digit hash of a JSON-able value (for ``X-Consul-ContentHash``)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


async def hash_blocking(r: Req, run: Callable[[], tuple[Any, Collection[Topic]]]) -> tuple[Any, str]:
    """Agent-local blocking on a content hash: with ``?hash=H`` wait until the answer's hash differs
    from H (or ``wait`` passes). Returns (value, hash); send the hash as ``X-Consul-ContentHash``."""
    want = r.param("hash")
    _, wait = r.blocking_options()
    value, topics = run()
    digest = content_hash(value)
    if not want or digest != want:
        return value, digest
    store = r.agent.store
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while digest == want and not store.closing:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        await wait_for_change(store, list(topics), remaining)
        value, topics = run()
        digest = content_hash(value)
    return value, digest
