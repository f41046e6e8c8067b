"""``/v1/session/*``: create, destroy, renew, info, list, node; TTL timers that invalidate sessions."""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from devagent import sessions
from devagent.agent import Agent
from devagent.codec import SECOND, DecodeError, new_uuid
from devagent.http import (
    Endpoint,
    HTTPError,
    QueryResult,
    Req,
    blocking_query,
    json_response,
    meta_headers,
    query_response,
)
from devagent.state import Row, Tx

log = structlog.get_logger("weft.devagent")


class SessionTimers:
    """One timer per TTL session: fires at 2 x TTL after the last create/renew (as Consul)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._handles: dict[str, asyncio.TimerHandle] = {}

    def reset(self, session: Row) -> None:
        sid = str(session["ID"])
        self.clear(sid)
        ttl = sessions.ttl_ns(session)
        if ttl <= 0:
            return
        loop = asyncio.get_running_loop()
        self._handles[sid] = loop.call_later(ttl * sessions.SESSION_TTL_MULTIPLIER / SECOND, self._expire, sid)

    def clear(self, sid: str) -> None:
        handle = self._handles.pop(sid, None)
        if handle is not None:
            handle.cancel()

    def _expire(self, sid: str) -> None:
        self._handles.pop(sid, None)
        store = self.agent.store
        try:
            with store.write() as tx:
                if sessions.destroy(store, tx, sid, self.agent.lock_delays):
                    log.info("session TTL expired", session=sid)
        except Exception as exc:  # a failed journal write: try again shortly
            log.error("session invalidation failed", session=sid, error=repr(exc))
            self._handles[sid] = asyncio.get_running_loop().call_later(1.0, self._expire, sid)

    def prune(self) -> None:
        for sid in [s for s in self._handles if self.agent.store.get("sessions", s) is None]:
            self.clear(sid)

    def stop(self) -> None:
        for sid in list(self._handles):
            self.clear(sid)


TIMERS_ATTR = "_session_timers"


def timers(agent: Agent) -> SessionTimers:
    t: SessionTimers | None = getattr(agent, TIMERS_ATTR, None)
    if t is None:
        t = SessionTimers(agent)
        setattr(agent, TIMERS_ATTR, t)
    return t


def setup(agent: Agent) -> None:
    sessions.install_triggers(agent.store, agent.lock_delays)

    def on_delete(tx: Tx, key: str, old: Row | None, new: Row | None) -> None:
        timers(agent).clear(key)

    agent.store.on_delete("sessions", on_delete)


async def start(agent: Agent) -> None:
    t = timers(agent)
    for row in list(agent.store.rows("sessions").values()):  # restored from the data dir: fresh timers
        t.reset(row)

    async def stop() -> None:
        t.stop()

    agent.on_stop(stop)


def routes(agent: Agent) -> list[Endpoint]:
    return [
        Endpoint("/v1/session/create", {"PUT": create}),
        Endpoint("/v1/session/destroy/{id:.*}", {"PUT": destroy}),
        Endpoint("/v1/session/renew/{id:.*}", {"PUT": renew}),
        Endpoint("/v1/session/info/{id:.*}", {"GET": info}),
        Endpoint("/v1/session/node/{node:.*}", {"GET": node}),
        Endpoint("/v1/session/list", {"GET": list_all}),
    ]


async def create(r: Req) -> web.StreamResponse:
    r.check_dc()
    body = None
    if r.raw.content_length is None or r.raw.content_length > 0:
        body = await r.json()
    agent = r.agent
    try:
        session = sessions.build(body, default_node=agent.node_name, session_id=new_uuid(),
                                 ttl_min=agent.config.session_ttl_min_ns)
    except DecodeError as exc:
        raise HTTPError(400, f"Request decode failed: {exc}") from None
    except sessions.SessionError as exc:
        raise HTTPError(500, str(exc)) from None
    r.authz.check("session:write", str(session["Node"]))
    with agent.store.write() as tx:
        try:
            row = sessions.create(tx, session)
        except sessions.SessionError as exc:
            raise HTTPError(500, str(exc)) from None
    timers(agent).reset(row)
    return json_response(r, {"ID": row["ID"]})


def _session_id(r: Req) -> str:
    sid = r.match("id")
    if not sid:
        raise HTTPError(400, "Missing session")
    return sid


async def destroy(r: Req) -> web.StreamResponse:
    r.check_dc()
    sid = _session_id(r)
    agent = r.agent
    existing = agent.store.get("sessions", sid)
    if existing is not None:
        r.authz.check("session:write", str(existing["Node"]))
    with agent.store.write() as tx:
        sessions.destroy(agent.store, tx, sid, agent.lock_delays)
    return json_response(r, True)


async def renew(r: Req) -> web.StreamResponse:
    r.check_dc()
    r.consistency()
    sid = _session_id(r)
    agent = r.agent
    session = agent.store.get("sessions", sid)
    headers = meta_headers(r, agent.store.topic_index("sessions"))
    if session is None:
        raise HTTPError(404, f"Session id '{sid}' not found", headers)
    r.authz.check("session:write", str(session["Node"]))
    timers(agent).reset(session)
    return json_response(r, [session], headers=headers)


def _filtered(r: Req, index: int, rows: list[Row]) -> QueryResult:
    authz = r.authz
    visible = [s for s in rows if authz.session_read(str(s["Node"]))]
    return QueryResult(index, visible, ["sessions"], filtered=len(visible) != len(rows))


async def info(r: Req) -> web.StreamResponse:
    sid = _session_id(r)
    store = r.agent.store

    def run() -> QueryResult:
        row = store.get("sessions", sid)
        return _filtered(r, store.topic_index("sessions"), [row] if row else [])

    return query_response(r, await blocking_query(r, run, share=True))


async def node(r: Req) -> web.StreamResponse:
    name = r.match("node")
    if not name:
        raise HTTPError(400, "Missing node name")
    store = r.agent.store

    def run() -> QueryResult:
        rows = sorted(store.by_index("sessions", "node", name), key=lambda s: str(s["ID"]))
        return _filtered(r, store.topic_index("sessions"), rows)

    return query_response(r, await blocking_query(r, run, share=True))


async def list_all(r: Req) -> web.StreamResponse:
    store = r.agent.store

    def run() -> QueryResult:
        rows = [row for _, row in sorted(store.rows("sessions").items())]
        return _filtered(r, store.topic_index("sessions"), rows)

    return query_response(r, await blocking_query(r, run, share=True))
