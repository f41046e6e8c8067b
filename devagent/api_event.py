"""``/v1/event/fire/:name`` and ``/v1/event/list``: Consul user events, as one agent sees them.

Events are not in the state store (Consul gossips them; each agent keeps its last 256). The list's
X-Consul-Index is derived from the last event's ID, and a blocking list waits while the index is
exactly the one given, as Consul's event endpoint does.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from aiohttp import web

from devagent.agent import Agent
from devagent.codec import b64, new_uuid, uuid_to_uint64
from devagent.http import Endpoint, HTTPError, Req, json_response, wait_for_change

USER_EVENT_SIZE_LIMIT = 512  # Serf's default user event size limit, in bytes, before encoding
EVENTS_TOPIC = ("agent", "events")


def routes(agent: Agent) -> list[Endpoint]:
    return [
        Endpoint("/v1/event/fire/{name:.*}", {"PUT": fire}),
        Endpoint("/v1/event/list", {"GET": list_events}),
    ]


def _encoded_size(event: dict[str, Any], payload: bytes) -> int:
    """Roughly the msgpack size of Consul's UserEvent, which is what Serf limits."""
    fixed = 1 + 3 + 38 + 5 + 8 + 11 + 14 + 10 + 8 + 1  # map header, field names, ID, Version
    return fixed + len(event["Name"]) + len(payload) + len(event["NodeFilter"]) + len(event["ServiceFilter"]) \
        + len(event["TagFilter"]) + 8


def _compile(pattern: str, what: str) -> re.Pattern[str] | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise HTTPError(500, f"Invalid {what} filter: {exc}") from None


def _matches_agent(agent: Agent, event: dict[str, Any]) -> bool:
    """Consul's shouldProcessUserEvent: this agent keeps an event only if the filters match it."""
    node_re = _compile(event["NodeFilter"], "node")
    if node_re is not None and not node_re.search(agent.node_name):
        return False
    svc_re = _compile(event["ServiceFilter"], "service")
    if svc_re is not None:
        tag_re = _compile(event["TagFilter"], "tag")
        for svc in agent.store.by_index("services", "node", agent.node_name):
            if svc_re.search(str(svc.get("Service", ""))):
                if tag_re is None or any(tag_re.search(str(t)) for t in svc.get("Tags") or []):
                    return True
        return False
    return True


async def fire(r: Req) -> web.StreamResponse:
    r.check_dc()
    name = r.match("name")
    if not name:
        raise HTTPError(400, "Missing name")
    event: dict[str, Any] = {
        "ID": new_uuid(),
        "Name": name,
        "Payload": None,
        "NodeFilter": r.param("node"),
        "ServiceFilter": r.param("service"),
        "TagFilter": r.param("tag"),
        "Version": 1,
        "LTime": 0,
    }
    payload = await r.body(1 << 20)
    event["Payload"] = b64(payload) if payload else None
    if event["TagFilter"] and not event["ServiceFilter"]:
        raise HTTPError(500, "Cannot provide tag filter without service filter")
    for field, what in (("NodeFilter", "node"), ("ServiceFilter", "service"), ("TagFilter", "tag")):
        _compile(event[field], what)
    if not r.authz.event_write(name):
        raise HTTPError(403, "Permission denied")
    if _encoded_size(event, payload) > USER_EVENT_SIZE_LIMIT:
        raise HTTPError(500, f"user event exceeds configured limit of {USER_EVENT_SIZE_LIMIT} bytes before encoding")
    agent = r.agent
    if _matches_agent(agent, event):
        agent.event_ltime += 1
        agent.events.append({**event, "LTime": agent.event_ltime})
        agent.store.notify(EVENTS_TOPIC)
    return json_response(r, event)


async def list_events(r: Req) -> web.StreamResponse:
    r.check_dc()
    min_index, wait = r.blocking_options()
    name = r.param("name")
    agent = r.agent
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait

    def run() -> tuple[int, list[dict[str, Any]]]:
        authz = r.authz
        events = [e for e in agent.events if authz.event_read(str(e["Name"]))]
        if name:
            events = [e for e in events if e["Name"] == name]
        index = uuid_to_uint64(str(events[-1]["ID"])) if events else 1
        return index, events

    index, events = run()
    while min_index > 0 and index == min_index and not agent.store.closing:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        await wait_for_change(agent.store, [EVENTS_TOPIC], remaining)
        index, events = run()
    return json_response(r, events, headers={"X-Consul-Index": str(index)})
