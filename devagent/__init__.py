"""The embedded Consul-compatible dev agent (``weft agent -dev``).

How the pieces fit (read this before adding an endpoint group):

Modules
    ``state.py``    the in-memory store: tables of rows in Consul's JSON shapes, ONE global modify
                    index, per-topic last indexes, push-based watches (pure, no I/O).
    ``codec.py``    Go durations (``parse_duration``/``format_duration``), Consul-style body decoding
                    (``decode_struct`` with a spec, ``lookup``, ``fold``: keys match
                    case-insensitively and snake_case == CamelCase), ``DecodeError`` (-> 400).
    ``acl.py``      ``Authorizer`` (allow-all when ACLs are off), Consul's rule engine.
    ``agent.py``    ``Agent``: config, store, ACL resolution, background tasks, the local node.
    ``http.py``     ``Endpoint``, ``Req``, ``HTTPError``, ``QueryResult``, ``blocking_query``,
                    ``hash_blocking``, ``json_response``, ``meta_headers``, ``query_response``.
    ``server.py``   discovers endpoint modules, builds the aiohttp app, ``serve``.
    ``persist.py``  ``-data-dir``: journal + snapshot of the whole store (every table, yours too).
    ``api_*.py``    endpoint groups (``api_kv``, ``api_session``, ``api_txn``, ``api_event``,
                    ``api_status``, ``api_agent_core``, ``api_acl``, ``api_operator`` are the core
                    ones); ``kv.py``, ``sessions.py``, ``aclstore.py`` hold their pure semantics.
    ``configentries.py`` / ``configcheck.py`` / ``discoverychain.py``  config entries: decoding,
                    Consul's Normalize/Validate per kind, and its write-time checks across entries.
    ``chaincompile.py`` Consul's discovery-chain compiler (served by ``api_discoverychain``; the
                    write-time graph checks compile with it too).
    ``gateways.py``, ``preparedqueries.py``, ``snapshotfile.py``  the pure parts of
                    gateway-services, prepared queries and ``/v1/snapshot`` archives.
    ``operator.py`` / ``acltemplates.py``  the pure parts of the operator endpoints (autopilot
                    configuration, raft refusals, keyring words, usage) and of ACL templated
                    policies (``api_operator``, ``api_keyring``, ``api_acl_templates`` serve them).

Adding an endpoint group
    Create ``devagent/api_<group>.py``; the server imports every ``api_*`` module and calls:

    - ``routes(agent: Agent) -> list[Endpoint]`` (required): ``Endpoint(path, {"GET": h, "PUT": h})``;
      ``path`` is an aiohttp pattern (``/v1/health/service/{service}``). Methods not listed answer
      405 with ``Allow`` as Consul does; unknown paths answer 404. A path may be served by one module.
    - ``setup(agent: Agent) -> None`` (optional): runs before the data dir is loaded; define extra
      tables (``agent.store.define_table``), secondary indexes (``agent.store.add_index``) and
      triggers (``agent.store.on_put/on_delete``) here.
    - ``async start(agent: Agent) -> None`` (optional): after load and after the local node exists;
      start background work with ``agent.spawn(coro, name=...)`` (cancelled at shutdown) and
      register cleanup with ``agent.on_stop(async_fn)``.

Handlers
    ``async def handler(r: Req) -> web.StreamResponse``. ``r.agent``, ``r.token``, ``r.authz``
    (raises ``acl.ACLNotFound`` -> 403 for an unknown token), ``r.has("passing")``,
    ``r.param``, ``r.uint_param``, ``r.match("service")``, ``await r.json(required=True)`` (bad
    JSON -> 400 ``Request decode failed: ...``), ``r.check_dc()`` (foreign ``?dc`` -> 500 "No path
    to datacenter"). Errors: raise ``HTTPError(status, text)`` (plain-text body), ``DecodeError``
    (400), ``r.authz.check("service:write", name)`` raises Consul's 403. Any other exception is a
    500 carrying its message; the process keeps serving.

Reads and blocking queries
    Write a function returning ``QueryResult(index, value, topics)`` and pass it to
    ``await blocking_query(r, run)``; answer with ``query_response(r, result)`` (sets
    X-Consul-Index, X-Consul-KnownLeader, X-Consul-LastContact, X-Consul-Effective-Consistency).
    ``index`` must be the index of the data read (e.g. ``store.topic_index("services", ...)`` or
    the max ModifyIndex of the rows); ``topics`` what to watch; the helper re-runs ``run`` whenever a
    topic fires and answers when the index exceeds ``?index`` or at ``wait`` (Consul's rules).
    ``blocking_query(r, run, share=True)`` computes ``run`` once per store index for all waiters of
    the same path+query+token (1,000 watchers of one service: one computation, one serialisation
    via ``query_response``); only for a ``run`` without side effects or captured per-request state.
    Set ``QueryResult(..., filtered=True)`` when ACLs hid part of the answer: ``query_response``
    then adds ``X-Consul-Results-Filtered-By-ACLs: true`` for a caller that sent a token.
    Agent-local endpoints use ``hash_blocking(r, run)`` where ``run`` returns (value, topics) and send
    the returned hash as ``X-Consul-ContentHash``. A hand-written wait loop uses
    ``await wait_for_change(store, topics, timeout)`` and must stop waiting once ``store.closing``
    is set (shutdown wakes every watcher and expects an answer at once).

Transactions
    ``/v1/txn`` serves KV and Session ops. Another module can serve ``Node``/``Service``/``Check`` ops
    with ``api_txn.register_op(kind, handler, is_write)`` from its ``setup``: ``handler(tx, op, r)``
    returns a list of results (``[{"Service": {...}}]``) or raises ``api_txn.TxnOpError(what)``.

Writes
    ``with agent.store.write() as tx:`` then ``tx.put(table, key, row)``, ``tx.delete(table, key)``,
    ``tx.touch(topic, ...)``; ``tx.index`` is the index this transaction commits at (use it for
    CreateIndex/ModifyIndex). Commit journals (with ``-data-dir``), bumps the global index and wakes
    every watcher of the touched topics in one pass. An exception in the block rolls everything back.
    With ``-data-dir`` the dispatcher holds every answer until the journal is fsynced
    (``agent.durable``): handlers and background writers need do nothing for durability.
    Rows are shared: never mutate a row you read; put a new dict.
    Every put/delete touches the table topic (``"services"``) and ``(table, key)``; extra topics such
    as ``("service", name)`` are yours to touch and to read with ``store.topic_index(...)``.

Tables (``state.TABLES``) and what the core puts there
    ``nodes``      key node name, catalog Node shape. At start-up the agent writes its own node
                   (``agent.node_name``, ID ``agent.node_id``, Address ``agent.config.advertise_addr``).
    ``checks``     key ``"<node>/<CheckID>"``, HealthCheck shape. At start-up the agent writes
                   ``"<node>/serfHealth"`` (Name "Serf Health Status", Status passing) and, in
                   ``services``, the ``consul`` service (port 8300), both marked ``_Server`` (a server's
                   leader writes them; ``/v1/agent/*`` does not list them: ``registry.is_agent_local``). Sessions
                   watch this table: a put with Status "critical" or a delete of a check that a
                   session lists in NodeChecks/ServiceChecks invalidates that session (as Consul).
                   Index ``node`` (value: node name) is defined by the core.
    ``services``   key ``"<node>/<ServiceID>"``; shape is the services module's (Consul's). Index
                   ``node`` is defined by the core; add your own (by name, by connect destination).
    ``config_entries`` key ``"<Kind>/<Name>"``; ``intentions`` key intention ID (free for you).
    ``kvs``, ``kv_tombstones``, ``sessions``, ``acl_tokens``, ``acl_policies``, ``meta``: core-owned.
    ``acl_roles``, ``acl_auth_methods``, ``acl_binding_rules``: ``aclroles`` (tokens' ``Roles`` count
    for permissions, so ``acl_roles`` is one of the ACL topics cached authorizers depend on).

Agent-wide instruments
    ``agent.metrics`` (``telemetry.Metrics``: gauges read at display, counters and timing samples per
    10 s interval; the dispatcher records ``consul.api.http`` per method and route) and
    ``agent.logs`` (``logstream.LogHub``: every structlog event, copied to ``/v1/agent/monitor``s).
    Deleting a node (``tx.delete("nodes", name)``) invalidates that node's sessions.
"""
