"""``/v1/agent/metrics``, ``/v1/agent/monitor``, ``/v1/agent/force-leave/:node``: the agent's operational
endpoints, as Consul's agent/agent_endpoint.go serves them.

Metrics are real numbers the dev agent keeps (``telemetry.Metrics``): the runtime (tasks, memory,
collector), the state store (nodes, services, instances, KV entries, sessions, the applied index), the
leadership gauge, and a ``consul.api.http`` timing per method and route recorded by the dispatcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import time

from aiohttp import web

from devagent import logstream
from devagent.agent import Agent
from devagent.http import Endpoint, HTTPError, Req, json_response, text_response

PROMETHEUS_OFF = "Prometheus is not enabled since its retention time is not positive"
MONITOR_TOPIC = ("monitor", "closing")  # never touched: only the shutdown resolves a watch on it


def setup(agent: Agent) -> None:
    store = agent.store
    m = agent.metrics
    m.gauge("consul.runtime.num_goroutines", lambda: len(asyncio.all_tasks()))
    m.gauge("consul.runtime.alloc_bytes", _rss_bytes)
    m.gauge("consul.runtime.sys_bytes", _vm_bytes)
    m.gauge("consul.runtime.total_gc_runs", lambda: sum(s["collections"] for s in gc.get_stats()))
    m.gauge("consul.server.isLeader", lambda: 1)
    m.gauge("consul.raft.applied_index", lambda: store.current_index())
    m.gauge("consul.state.nodes", lambda: len(store.rows("nodes")))
    m.gauge("consul.state.service_instances", lambda: len(store.rows("services")))
    m.gauge("consul.state.services", lambda: len({r["Service"] for r in store.rows("services").values()}))
    m.gauge("consul.state.kv_entries", lambda: len(store.rows("kvs")))
    m.gauge("consul.session_ttl.active", lambda: sum(1 for s in store.rows("sessions").values() if s.get("TTL")))


def _statm(field: int) -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[field]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes() -> float:
    return _statm(1)


def _vm_bytes() -> float:
    return _statm(0)


def routes(agent: Agent) -> list[Endpoint]:
    return [
        Endpoint("/v1/agent/metrics", {"GET": metrics}),
        Endpoint("/v1/agent/monitor", {"GET": monitor}),
        Endpoint("/v1/agent/force-leave/{node:.*}", {"PUT": force_leave}),
    ]


def _wants_prometheus(r: Req) -> bool:
    """Consul's enablePrometheusOutput: ``?format=prometheus`` or an OpenMetrics/0.0.4 Accept header."""
    if r.param("format") == "prometheus":
        return True
    for part in r.raw.headers.get("Accept", "").split(","):
        mime = [p.strip() for p in part.split(";")]
        kind = mime[0].lower()
        if kind == "application/openmetrics-text":
            return True
        if kind == "text/plain" and len(mime) > 1 and mime[1] == "version=0.4.0":
            return True
    return False


async def metrics(r: Req) -> web.StreamResponse:
    r.authz.check("agent:read", r.agent.node_name)
    if _wants_prometheus(r):
        if r.agent.config.prometheus_retention_ns < 1:
            raise HTTPError(415, PROMETHEUS_OFF)
        return web.Response(status=200, body=r.agent.metrics.prometheus().encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
    return json_response(r, r.agent.metrics.display(time.time()))


async def monitor(r: Req) -> web.StreamResponse:
    """Stream the agent's log lines at ``loglevel`` (default INFO) or above until the client leaves
    or the agent stops; ``logjson`` switches to JSON lines."""
    r.authz.check("agent:read", r.agent.node_name)
    level = r.param("loglevel") or "INFO"
    if not logstream.valid_level(level):
        raise HTTPError(400, f"Unknown log level: {level}")
    hub = r.agent.logs
    mon = hub.open(logstream.level_number(level), r.has("logjson"))
    if mon is None:
        raise HTTPError(429, f"Too many monitors: at most {logstream.MAX_MONITORS} at once")
    store = r.agent.store
    closing = store.watch([MONITOR_TOPIC])
    policy = r.agent.config.acl_default_policy if r.agent.config.acl_enabled else "allow"
    resp = web.StreamResponse(status=200, headers={"Content-Type": "text/plain; charset=utf-8",
                                                   "X-Consul-Default-Acl-Policy": policy,
                                                   "Vary": "Accept-Encoding"})
    try:
        await resp.prepare(r.raw)
        while not closing.done():
            getter: asyncio.Future[str] = asyncio.ensure_future(mon.queue.get())
            waiting: set[asyncio.Future[object]] = {getter, closing}  # type: ignore[arg-type]
            try:
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                lines = [getter.result()]
                while not mon.queue.empty():  # what arrived meanwhile goes out in one write
                    lines.append(mon.queue.get_nowait())
                await resp.write("".join(lines).encode())
    except ConnectionError:
        return resp  # the client went away: that ends the stream
    finally:  # also when the handler is cancelled (the client left while nothing was written)
        hub.close(mon)
        store.unwatch(closing, [MONITOR_TOPIC])
    with contextlib.suppress(ConnectionError, RuntimeError):
        await resp.write_eof()
    return resp


async def force_leave(r: Req) -> web.StreamResponse:
    """The dev agent's only member is itself, alive: forcing it out changes nothing (as serf ignores an
    alive member); any other name is not a member (Consul's error, a 500). ``prune`` and ``wan`` are
    accepted; a WAN name that is not a member is ignored, as serf does."""
    r.authz.check("operator:write")
    node = r.match("node")
    if r.has("wan"):
        return web.Response(status=200)
    if node != r.agent.node_name:
        return text_response(f"agent: No node found with name '{node}'", 500)
    return web.Response(status=200)

