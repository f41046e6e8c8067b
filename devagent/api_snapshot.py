"""``/v1/snapshot``: save (GET) and restore (PUT) the dev agent's whole state, as Consul's
agent/snapshot_endpoint.go does for its Raft state.

GET answers the archive (``snapshotfile.py``: gzip'd JSON of every table) with ``X-Consul-Index``;
PUT replaces the state with an archive's in ONE write transaction: rows the archive lacks are
deleted, rows it has are written, so every blocking query on changed data wakes, check runners and
session timers follow the restored checks and sessions, and with ``-data-dir`` the restore is
journaled like any write. The index never goes backwards: it continues from the higher of the
current index and the archive's. The agent's own node and serfHealth check are re-registered
afterwards, as a Consul agent's anti-entropy does. Both need a management-grade token
(``acl:write``), as Consul's snapshot ACL. A damaged or foreign archive is refused with a 500
naming the problem (Consul answers restore failures with 500) and changes nothing; bodies over
64 MiB answer 413.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from devagent import api_session, snapshotfile
from devagent.agent import Agent
from devagent.http import Endpoint, HTTPError, Req, meta_headers
from devagent.state import Store, Tx

MAX_PASSES = 5  # triggers (sessions, locks) may write rows back while we restore; converge or give up


def routes(agent: Agent) -> list[Endpoint]:
    return [Endpoint("/v1/snapshot", {"GET": save, "PUT": restore})]


async def save(r: Req) -> web.StreamResponse:
    r.check_dc()
    r.consistency()
    r.authz.check("acl:write")
    store = r.agent.store
    doc = store.dump()
    body = snapshotfile.encode(doc["tables"], store.index, r.agent.datacenter)
    headers = meta_headers(r, store.index)
    return web.Response(status=200, body=body, content_type="application/x-gzip", headers=headers)


def _config_kinds(store: Store) -> set[str]:
    return {str(row.get("Kind")) for row in store.rows("config_entries").values()}


def apply_tables(store: Store, tx: Tx, tables: dict[str, dict[str, Any]], names: list[str]) -> None:
    """Make every table in ``names`` hold exactly ``tables``' rows (absent table: empty)."""
    kinds = _config_kinds(store)
    for _ in range(MAX_PASSES):
        changed = False
        for name in names:
            want = tables.get(name, {})
            have = store.rows(name)
            for key in [k for k in have if k not in want]:
                tx.delete(name, key)
                changed = True
            for key, row in want.items():
                if have.get(key) != row:
                    tx.put(name, key, row)
                    changed = True
        if not changed:
            break
    else:
        raise HTTPError(500, "snapshot restore did not converge: the archive's state is inconsistent")
    kinds |= _config_kinds(store)
    tx.touch(*[("config", k) for k in kinds])


async def restore(r: Req) -> web.StreamResponse:
    r.check_dc()
    r.authz.check("acl:write")
    data = await r.body(snapshotfile.MAX_COMPRESSED)
    try:
        index, tables = snapshotfile.decode(data)
    except snapshotfile.SnapshotError as exc:
        raise HTTPError(500, str(exc)) from None
    agent = r.agent
    store = agent.store
    for name in tables:
        store.define_table(name)
    names = sorted(store.dump()["tables"])
    store.index = max(store.index, index)  # the next write commits above both
    with store.write() as tx:
        apply_tables(store, tx, tables, names)
    agent.ensure_local_node()
    timers = api_session.timers(agent)
    timers.prune()
    for row in list(store.rows("sessions").values()):
        timers.reset(row)
    return web.Response(status=200)
