"""The dev agent's core object: configuration, the state store, ACL resolution, background tasks.

One ``Agent`` per process. Endpoint modules receive it in ``routes(agent)`` and reach it from a
request as ``r.agent``. At start-up the agent registers its own node and that node's
``serfHealth`` check (passing) in the store, as a Consul agent does when it joins.
"""

from __future__ import annotations

import asyncio
import datetime
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from devagent import acl, logstream, telemetry
from devagent.codec import new_uuid
from devagent.state import Row, Store

log = structlog.get_logger("weft.devagent")

CONSUL_VERSION = "1.22.0"  # the Consul HTTP API version the dev agent follows
REVISION = "weft"
SERF_CHECK_ID = "serfHealth"
SERF_CHECK_NAME = "Serf Health Status"
SERVER_PORT = 8300  # Consul's server RPC port: the port of the ``consul`` service
RAFT_VERSION = 3
SERF_PROTOCOL = (1, 2, 5)  # min, current, max (the member's ProtocolMin/Cur/Max)
MAX_EVENTS = 256  # Consul's user event buffer


@dataclass
class AgentConfig:
    node_name: str = field(default_factory=socket.gethostname)
    datacenter: str = "dc1"
    client_addr: str = "127.0.0.1"
    http_port: int = 8500
    data_dir: str | None = None
    log_level: str = "info"
    acl_enabled: bool = False
    acl_default_policy: str = "deny"
    acl_initial_management: str | None = None
    node_id: str | None = None  # fixed by the data dir when one is given
    session_ttl_min_ns: int = 10 * 1_000_000_000  # Consul's session_ttl_min
    check_reap_interval_ns: int = 30 * 1_000_000_000  # Consul's check_reap_interval
    check_deregister_interval_min_ns: int = 60 * 1_000_000_000  # Consul's check_deregister_interval_min
    enable_script_checks: bool = False  # Consul's enable_script_checks: script checks from any source
    enable_local_script_checks: bool = False  # Consul's enable_local_script_checks: from local sources only
    prometheus_retention_ns: int = 60 * 1_000_000_000  # Consul's telemetry.prometheus_retention_time; 0 = off

    @property
    def advertise_addr(self) -> str:
        return "127.0.0.1" if self.client_addr in ("0.0.0.0", "::", "") else self.client_addr


class Agent:
    """Configuration + store + ACLs + the tasks that run beside the HTTP server."""

    def __init__(self, config: AgentConfig, store: Store | None = None) -> None:
        self.config = config
        self.store = store or Store()
        self.node_id = config.node_id or new_uuid()
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.event_ltime = 0
        self.lock_delays: dict[str, float] = {}  # KV key -> monotonic time its lock-delay ends
        self.started_at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        # with -data-dir: awaited before any answer leaves, so nothing unsynced is ever acknowledged
        self.durable: Callable[[], Awaitable[None]] | None = None
        self.request_stop: Callable[[], None] | None = None  # set by the server: a graceful shutdown
        self.tokens: dict[str, str] = {}  # agent tokens set with PUT /v1/agent/token/<kind> (in memory)
        self.metrics = telemetry.Metrics()  # /v1/agent/metrics
        self.logs = logstream.LogHub()  # /v1/agent/monitor
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stoppers: list[Callable[[], Awaitable[None]]] = []
        self._policy_cache: dict[tuple[str, int], acl.Policy] = {}
        # token secret -> (ACL tables' index, token row, authorizer): resolved once per ACL change
        self._authz_cache: dict[str, tuple[int, Row | None, acl.Authorizer]] = {}
        self.store.add_index("acl_tokens", "secret", lambda row: [row["SecretID"]] if row.get("SecretID") else [])
        self.store.add_index("acl_policies", "name", lambda row: [row["Name"]])
        self.store.add_index("sessions", "node", lambda row: [row["Node"]])
        self.store.add_index("kvs", "session", lambda row: [row["Session"]] if row.get("Session") else [])
        self.store.add_index("checks", "node", lambda row: [row["Node"]])
        self.store.add_index("services", "node", lambda row: [row["Node"]])

    @property
    def node_name(self) -> str:
        return self.config.node_name

    @property
    def datacenter(self) -> str:
        return self.config.datacenter

    # ----- background tasks -----
    def spawn(self, coro: Awaitable[Any], *, name: str) -> asyncio.Task[Any]:
        """Run a background task that is cancelled when the agent stops; its crash is logged."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)

        def _done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background task failed", task=name, error=repr(t.exception()))

        task.add_done_callback(_done)
        return task

    def on_stop(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._stoppers.append(fn)

    async def stop(self) -> None:
        for fn in reversed(self._stoppers):
            try:
                await fn()
            except Exception as exc:  # stopping must go on
                log.error("stop hook failed", error=repr(exc))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ----- the local node -----
    def ensure_local_node(self) -> None:
        """Register this agent's node, its passing serfHealth check and the ``consul`` service, as a
        Consul server's leader does for every alive server member."""
        from devagent import registry  # local: registry depends on the services model, the core does not
        addr = self.config.advertise_addr
        with self.store.write() as tx:
            node = self.store.get("nodes", self.node_name)
            want = {
                "ID": self.node_id,
                "Node": self.node_name,
                "Address": addr,
                "Datacenter": self.datacenter,
                "TaggedAddresses": {"lan": addr, "lan_ipv4": addr, "wan": addr, "wan_ipv4": addr},
                "Meta": {"consul-network-segment": "", "consul-version": CONSUL_VERSION},
            }
            if node is None or any(node.get(k) != v for k, v in want.items()):
                create = node["CreateIndex"] if node else tx.index
                tx.put("nodes", self.node_name, {**want, "CreateIndex": create, "ModifyIndex": tx.index})
            key = f"{self.node_name}/{SERF_CHECK_ID}"
            check = self.store.get("checks", key)
            if check is None or check.get("Status") != "passing" or not check.get("_Server"):
                tx.put("checks", key, serf_check(self.node_name, check["CreateIndex"] if check else tx.index,
                                                 tx.index))
            lo, cur, hi = SERF_PROTOCOL
            registry.put_server_service(tx, self.node_name, {
                "non_voter": "false", "read_replica": "false", "raft_version": str(RAFT_VERSION),
                "serf_protocol_current": str(cur), "serf_protocol_min": str(lo), "serf_protocol_max": str(hi),
                "version": CONSUL_VERSION,
            }, SERVER_PORT)

    # ----- ACLs -----
    def authorizer(self, token: str) -> acl.Authorizer:
        """The authorizer for a token secret ("" = anonymous). Raises ``acl.ACLNotFound``."""
        if not self.config.acl_enabled:
            return acl.ALLOW_ALL
        from devagent.aclstore import expired

        version = self.store.topic_index("acl_tokens", "acl_policies", "acl_roles")
        hit = self._authz_cache.get(token)
        if hit is not None and hit[0] == version and (hit[1] is None or not expired(hit[1])):
            return hit[2]
        authz = self._resolve(token)
        if len(self._authz_cache) > 4096:
            self._authz_cache.clear()
        self._authz_cache[token] = (version, self.token_by_secret(token) if token else None, authz)
        return authz

    def _resolve(self, token: str) -> acl.Authorizer:
        row = self.token_by_secret(token or acl.ANONYMOUS_SECRET)
        if row is None:
            if not token:
                return acl.PolicyAuthorizer(acl.ANONYMOUS_ACCESSOR, acl.Policy(),
                                            default_allow=self.config.acl_default_policy == "allow")
            raise acl.ACLNotFound()
        return self.authorizer_for_token(row)

    def token_by_secret(self, secret: str) -> Row | None:
        """The live token with this secret (an expired token no longer exists, as in Consul)."""
        from devagent.aclstore import expired

        rows = self.store.by_index("acl_tokens", "secret", secret)
        return rows[0] if rows and not expired(rows[0]) else None

    def authorizer_for_token(self, row: Row) -> acl.Authorizer:
        accessor = str(row.get("AccessorID", ""))
        policies: list[acl.Policy] = []
        for link in row.get("Policies") or []:
            prow = self.store.get("acl_policies", str(link.get("ID", "")))
            if prow is None:
                named = self.store.by_index("acl_policies", "name", str(link.get("Name", "")))
                prow = named[0] if named else None
            if prow is None:
                continue  # Consul ignores links to deleted policies
            if prow["ID"] == acl.GLOBAL_MANAGEMENT_ID:
                return acl.ManagementAuthorizer(accessor)
            policies.append(self._parsed_policy(prow))
        services = list(row.get("ServiceIdentities") or [])
        nodes = list(row.get("NodeIdentities") or [])
        for link in row.get("Roles") or []:  # a role adds its policies and identities (deleted: ignored)
            role = self.store.get("acl_roles", str(link.get("ID", "")))
            if role is None:
                continue
            for plink in role.get("Policies") or []:
                prow = self.store.get("acl_policies", str(plink.get("ID", "")))
                if prow is None:
                    continue
                if prow["ID"] == acl.GLOBAL_MANAGEMENT_ID:
                    return acl.ManagementAuthorizer(accessor)
                policies.append(self._parsed_policy(prow))
            services.extend(role.get("ServiceIdentities") or [])
            nodes.extend(role.get("NodeIdentities") or [])
        for ident in services:
            dcs = ident.get("Datacenters") or []
            if not dcs or self.datacenter in dcs:
                policies.append(acl.service_identity_policy(str(ident.get("ServiceName", ""))))
        for ident in nodes:
            if ident.get("Datacenter", self.datacenter) == self.datacenter:
                policies.append(acl.node_identity_policy(str(ident.get("NodeName", ""))))
        return acl.PolicyAuthorizer(accessor, acl.merge(policies),
                                    default_allow=self.config.acl_default_policy == "allow")

    def _parsed_policy(self, prow: Row) -> acl.Policy:
        key = (str(prow["ID"]), int(prow.get("ModifyIndex", 0)))
        cached = self._policy_cache.get(key)
        if cached is None:
            try:
                cached = acl.parse_rules(str(prow.get("Rules", "")))
            except acl.RuleError:
                cached = acl.Policy()  # stored rules were validated on write; be safe anyway
            self._policy_cache[key] = cached
        return cached


def serf_check(node: str, create_index: int, modify_index: int) -> Row:
    return {
        "Node": node,
        "CheckID": SERF_CHECK_ID,
        "Name": SERF_CHECK_NAME,
        "Status": "passing",
        "Notes": "",
        "Output": "Agent alive and reachable",
        "ServiceID": "",
        "ServiceName": "",
        "ServiceTags": [],
        "Type": "",
        "Interval": "",
        "Timeout": "",
        "ExposedPort": 0,
        "Definition": {},
        "CreateIndex": create_index,
        "ModifyIndex": modify_index,
        "_Server": True,  # written by the server, not held by the agent: not in /v1/agent/checks
    }
