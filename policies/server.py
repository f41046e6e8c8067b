"""The policy service (``weft policy serve``): watch, compile, publish, explain.

Every replica watches both intention sources (:mod:`policies.sources`), compiles them
(:class:`policies.compile.Compiler`) and answers the gRPC API ``weft.policy.v1.Policy``
(``Check``, ``Validate``). One replica at a time, the holder of the session lock on
``weft/policy/leader``, publishes: it writes ``weft/policy/compiled/<destination>`` for every
destination whose table changed, and deletes the tables of destinations that no longer have
intentions (their sidecars then fall back to the wildcard table ``weft/policy/compiled/_wildcard``,
which holds exactly the
rules that still apply to them: the wildcard-destination ones and the default policy).

Publishing is done with ``PUT /v1/txn``: each transaction starts with ``check-session`` on the leader
key (a replica that lost the lock without noticing cannot write), then ``cas`` / ``delete-cas`` per
table against the index read just before (a concurrent writer makes it fail and it is redone). Each
table is one KV value written whole, so a reader never sees half a table; transactions hold at most
64 operations, so a change to thousands of tables is a few transactions. A table is written only
when its content differs from KV (the version is a content hash), so an unchanged policy causes no
write and no sidecar churn.

Destinations frozen by a bad document that has no last good version (see
:mod:`policies.compile`) keep whatever table KV holds: it is neither written nor deleted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import structlog

from policies.compile import Compiler, CompileResult, loads_table, validate_document
from policies.evaluate import authorize
from policies.model import (
    COMPILED_PREFIX,
    INTENTIONS_PREFIX,
    LEADER_KEY,
    TCP,
    WILDCARD,
    Action,
    CompiledTable,
    Decision,
    GrpcRequest,
    HttpRequest,
    Request,
    destination_of_key,
    table_key,
    table_version,
)
from policies.sources import SourcesAPI, SourceWatcher
from policies.v1 import policy_pb2, policy_pb2_grpc

log = structlog.get_logger("policies.server")

TXN_MAX_OPS = 64
# Consul limits a txn request to 512 KiB (txn_max_req_len) and a value to 512 KiB; values travel in
# base64 (4/3), so a batch carries at most ~384 KiB of tables and a table larger than that cannot
# be published at all (it is reported, and the table already in KV stays in force).
TXN_MAX_VALUE_BYTES = 384 * 1024
MAX_TABLE_BYTES = TXN_MAX_VALUE_BYTES


class PublishAPI(SourcesAPI, Protocol):
    """What publishing needs besides the source reads: ``PUT /v1/txn`` with Mapping operations."""

    async def txn(self, ops: Sequence[Mapping[str, Any]], *, token: str | None = None) -> Sequence[Any]: ...


class LockLike(Protocol):
    """One leadership term (``catalog.lock.LeaderLock`` has this shape)."""

    session_id: str
    lost: asyncio.Event

    @property
    def held(self) -> bool: ...

    def start(self) -> None: ...

    async def acquired(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(slots=True)
class PublishStats:
    written: int = 0
    deleted: int = 0
    unchanged: int = 0
    txns: int = 0
    conflicts: int = 0
    last_publish: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def plan_ops(result: CompileResult, current: Mapping[str, tuple[int, str]]) -> tuple[list[dict[str, Any]], int]:
    """The txn operations that bring KV's compiled tables to ``result`` (pure); and how many are unchanged.

    ``current``: key -> (modify index, version of the stored table; "" when unreadable) for every key
    under ``weft/policy/compiled/``. Versions are content hashes, so equal versions mean equal tables.
    """
    ops: list[dict[str, Any]] = []
    unchanged = 0
    for dest in sorted(result.tables):
        if result.is_frozen(dest):
            continue
        key = table_key(dest)
        table = result.tables[dest]
        cur = current.get(key)
        if cur is not None and cur[1] == table.version:
            unchanged += 1
            continue
        text = table.dumps()
        if len(text.encode()) > MAX_TABLE_BYTES:
            log.error("compiled table too large to publish", key=key, bytes=len(text.encode()),
                      limit=MAX_TABLE_BYTES, rules=len(table.rules),
                      in_force="the table already in KV" if cur is not None else "deny all (fail closed)")
            if cur is not None:
                continue  # the last published table stays in force, as for a bad document
            # Nothing in KV yet: falling back to the wildcard table could widen access, so fail closed.
            text = CompiledTable(destination=dest, default_policy="deny", rules=(), warnings=(
                f"the compiled table ({len(text.encode())} bytes) exceeds {MAX_TABLE_BYTES} bytes and cannot be "
                "published; every caller is denied until its intentions are reduced",)).with_version().dumps()
        ops.append({"KV": {"Verb": "cas", "Key": key, "Value": _b64(text),
                           "Index": cur[0] if cur is not None else 0}})
    for key in sorted(current):
        gone = destination_of_key(key)
        if gone is None or gone in result.tables or result.is_frozen(gone):
            continue
        ops.append({"KV": {"Verb": "delete-cas", "Key": key, "Index": current[key][0]}})
    return ops, unchanged


def batches(ops: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Split operations into transactions of at most 63 (plus the guard) and ~384 KiB of values."""
    out: list[list[dict[str, Any]]] = []
    batch: list[dict[str, Any]] = []
    size = 0
    for op in ops:
        op_size = len(op["KV"].get("Value", "")) * 3 // 4
        if batch and (len(batch) >= TXN_MAX_OPS - 1 or size + op_size > TXN_MAX_VALUE_BYTES):
            out.append(batch)
            batch, size = [], 0
        batch.append(op)
        size += op_size
    if batch:
        out.append(batch)
    return out


def stored_version(value: bytes | None) -> str:
    """The version of a stored table, recomputed from its content ("" when it is not a readable table)."""
    try:
        data = json.loads(value or b"")
        if not isinstance(data, dict):
            return ""
        version = table_version(data)
        return version if data.get("Version") == version else ""
    except (ValueError, TypeError):
        return ""


class PolicyService:
    """Watches, compiles and (while leader) publishes; see the module docstring.

    ``lock_factory`` makes a new leadership term (a fresh lock) each time the previous one is lost;
    None runs as a standby forever (compiles and answers ``Check`` but never writes).
    """

    def __init__(self, api: PublishAPI, *, default_policy: Action = "deny",
                 lock_factory: Callable[[], LockLike] | None = None, wait: float = 30.0,
                 on_leadership: Callable[[bool], None] | None = None,
                 sources: Sequence[str] = ("kv", "native")) -> None:
        unknown = set(sources) - {"kv", "native"}
        if unknown:
            raise ValueError(f"unknown intention source(s) {sorted(unknown)}; use kv and/or native")
        self.api = api
        self.compiler = Compiler(default_policy)
        self.default_policy: Action = default_policy
        self.watcher = SourceWatcher(api, wait=wait, kv="kv" in sources, native="native" in sources)
        self.lock_factory = lock_factory
        self.on_leadership = on_leadership
        self.lock: LockLike | None = None
        self.result: CompileResult | None = None
        self.kv_tables: dict[str, CompiledTable] = {}
        self.stats = PublishStats()
        self.compiled = asyncio.Event()
        self._publish_needed = asyncio.Event()
        self._last_error_text: dict[str, str] = {}
        # what this leader knows KV holds under weft/policy/compiled/: key -> (modify index, version);
        # None: unknown, read it all before the next publish (new term, or after a failed txn)
        self._mirror: dict[str, tuple[int, str]] | None = None

    @property
    def is_leader(self) -> bool:
        return self.lock is not None and self.lock.held

    # -- reading -------------------------------------------------------------------------------------------

    def table_for(self, destination: str) -> CompiledTable | None:
        """The table a sidecar of ``destination`` enforces (own, else ``*``), as this replica sees it."""
        result = self.result
        if result is None:
            return None
        for dest in (destination, WILDCARD):
            if result.is_frozen(dest) or dest not in result.tables:
                kv = self.kv_tables.get(dest)
                if kv is not None:
                    return kv
                if result.is_frozen(dest):
                    continue
            else:
                return result.tables[dest]
        return None

    def check(self, source: str, destination: str, request: Request) -> tuple[Decision, CompiledTable | None]:
        table = self.table_for(destination)
        if table is None:
            return (Decision(allowed=False, reason=f"no compiled table for {destination!r} yet; sidecars fail "
                             "closed"), None)
        return authorize(table, source, request), table

    # -- running -------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [asyncio.create_task(self.watcher.run(stop), name="policy-watch"),
                 asyncio.create_task(self._compile_loop(stop), name="policy-compile")]
        if self.lock_factory is not None:
            tasks.append(asyncio.create_task(self._leader_loop(stop), name="policy-leader"))
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.lock is not None:
                with contextlib.suppress(Exception):
                    await self.lock.stop()

    async def _compile_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.watcher.changed.wait()
            await asyncio.sleep(0.005)  # coalesce a change seen by both watches
            self.watcher.changed.clear()
            snap = self.watcher.snapshot()
            if not snap.ready:
                continue
            started = time.perf_counter()
            try:
                result = self.compiler.compile(snap.documents())
            except Exception:  # a compiler bug must not stop the service: the tables in force stay
                log.exception("compiling intentions failed; the published tables stay in force")
                continue
            self._log_result(result, time.perf_counter() - started)
            self.result = result
            await self._refresh_kv_tables(result)
            self.compiled.set()
            self._publish_needed.set()

    def _log_result(self, result: CompileResult, seconds: float) -> None:
        texts = {e.ref: str(e) for e in result.errors}
        for ref, text in texts.items():
            if self._last_error_text.get(ref) != text:
                errors = next(e for e in result.errors if e.ref == ref).errors
                log.error("intention document rejected", document=ref, errors=errors,
                          last_good_in_force=ref in result.used_last_good)
        for ref in set(self._last_error_text) - set(texts):
            log.info("intention document accepted again", document=ref)
        self._last_error_text = texts
        for w in result.warnings:
            log.warning("intention warning", warning=w)
        log.info("intentions compiled", tables=len(result.tables), rejected=len(result.errors),
                 frozen="all" if result.frozen_all else sorted(result.frozen), ms=round(seconds * 1000, 2))

    async def _refresh_kv_tables(self, result: CompileResult) -> None:
        """Read the tables KV holds for frozen destinations: those stay in force and answer Check."""
        if not result.frozen and not result.frozen_all:
            self.kv_tables = {}
            return
        try:
            _, entries = await self.api.kv_get_recurse(COMPILED_PREFIX)
        except Exception as exc:
            log.warning("could not read compiled tables", error=str(exc) or type(exc).__name__)
            return
        tables = {}
        for e in entries:
            dest = destination_of_key(e.key)
            if dest is None or not result.is_frozen(dest):
                continue
            try:
                tables[dest] = loads_table(e.value or b"")
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("unreadable compiled table in KV", key=e.key, error=str(exc))
        self.kv_tables = tables

    async def _leader_loop(self, stop: asyncio.Event) -> None:
        assert self.lock_factory is not None
        while not stop.is_set():
            lock = self.lock_factory()
            self.lock = lock
            lock.start()
            try:
                await lock.acquired()
            except Exception as exc:  # stopped before acquiring
                log.info("leadership campaign ended", error=str(exc))
                return
            log.info("policy service is now the leader", key=LEADER_KEY)
            if self.on_leadership is not None:
                self.on_leadership(True)
            publisher = asyncio.create_task(self._publish_loop(lock, stop), name="policy-publish")
            lost = asyncio.create_task(lock.lost.wait())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({lost, stopped, publisher}, return_when=asyncio.FIRST_COMPLETED)
            for t in (lost, stopped, publisher):
                t.cancel()
            await asyncio.gather(lost, stopped, publisher, return_exceptions=True)
            if self.on_leadership is not None:
                self.on_leadership(False)
            log.warning("policy service is no longer the leader", key=LEADER_KEY)
            with contextlib.suppress(Exception):
                await lock.stop()

    async def _publish_loop(self, lock: LockLike, stop: asyncio.Event) -> None:
        self._mirror = None
        self._publish_needed.set()  # a new leader reconciles KV at once
        failures = 0
        while not stop.is_set() and lock.held:
            await self._publish_needed.wait()
            self._publish_needed.clear()
            if self.result is None:
                continue
            try:
                await self.publish(self.result, lock.session_id)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                delay = min(5.0, 0.05 * 2 ** failures)
                log.warning("publishing compiled tables failed; retrying", error=str(exc) or type(exc).__name__,
                            retry_in=delay)
                self.stats.conflicts += 1
                await asyncio.sleep(delay)
                self._publish_needed.set()

    async def publish(self, result: CompileResult, session_id: str) -> None:
        """Bring KV's compiled tables to ``result`` with check-session-guarded txns (see module doc)."""
        if self._mirror is None:
            _, entries = await self.api.kv_get_recurse(COMPILED_PREFIX)
            self._mirror = {e.key: (e.modify_index, stored_version(e.value)) for e in entries
                            if destination_of_key(e.key) is not None}
        ops, unchanged = plan_ops(result, self._mirror)
        self.stats.unchanged = unchanged
        if not ops:
            return
        guard = {"KV": {"Verb": "check-session", "Key": LEADER_KEY, "Session": session_id}}
        for batch in batches(ops):
            try:
                results = await self.api.txn([guard, *batch])
            except BaseException:
                self._mirror = None  # we no longer know what KV holds
                raise
            self.stats.txns += 1
            indexes = {getattr(r, "key", None): getattr(r, "modify_index", None) for r in results or ()}
            for op in batch:
                kv = op["KV"]
                dest = destination_of_key(kv["Key"]) or ""
                if kv["Verb"] == "cas":
                    self.stats.written += 1
                    index = indexes.get(kv["Key"])
                    if self._mirror is not None and isinstance(index, int):
                        self._mirror[kv["Key"]] = (index, result.tables[dest].version)
                    else:
                        self._mirror = None
                    log.info("compiled table written", key=kv["Key"], version=result.tables[dest].version)
                else:
                    self.stats.deleted += 1
                    if self._mirror is not None:
                        self._mirror.pop(kv["Key"], None)
                    log.info("compiled table deleted", key=kv["Key"])
        self.stats.last_publish = time.time()
        self.stats.versions = {d: t.version for d, t in result.tables.items()}


# ------------------------------------------------------------------------------------------------------------
# gRPC API
# ------------------------------------------------------------------------------------------------------------


def request_from_proto(req: policy_pb2.CheckRequest) -> Request:
    """The evaluator's request for a CheckRequest; ValueError naming the problem when malformed."""
    which = req.WhichOneof("request")
    if which is None or which == "tcp":
        return TCP
    if which == "grpc":
        method = req.grpc.method
        if not method.startswith("/") or method.count("/") != 2:
            raise ValueError(f"grpc.method must look like /pkg.Service/Method, not {method!r}")
        return GrpcRequest(method=method, metadata={h.name.lower(): h.value for h in req.grpc.metadata})
    method = req.http.method.upper() or "GET"
    path = req.http.path or "/"
    if not path.startswith("/"):
        raise ValueError(f"http.path must start with '/', not {path!r}")
    return HttpRequest(method=method, path=path, headers={h.name.lower(): h.value for h in req.http.headers})


def decision_to_proto(decision: Decision, table: CompiledTable | None) -> policy_pb2.CheckResponse:
    return policy_pb2.CheckResponse(
        allowed=decision.allowed, audited=decision.audited, reason=decision.reason, rule=decision.rule_label,
        rule_json=json.dumps(decision.rule.to_json(), sort_keys=True) if decision.rule is not None else "",
        table_version=table.version if table is not None else "",
        table=table.destination if table is not None else "", per_request=decision.per_request)


class PolicyServicer(policy_pb2_grpc.PolicyServicer):
    def __init__(self, service: PolicyService) -> None:
        self.service = service

    async def Check(self, request: policy_pb2.CheckRequest,
                    context: grpc.aio.ServicerContext[Any, Any]) -> policy_pb2.CheckResponse:
        if not request.source or not request.destination:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "source and destination are required")
        try:
            req = request_from_proto(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        decision, table = self.service.check(request.source, request.destination, req)
        return decision_to_proto(decision, table)

    async def Validate(self, request: policy_pb2.ValidateRequest,
                       context: grpc.aio.ServicerContext[Any, Any]) -> policy_pb2.ValidateResponse:
        ref = request.key or "document"
        errors = validate_document(request.document, ref)
        if not errors and request.key.startswith(INTENTIONS_PREFIX):
            from policies.compile import DocumentError, parse_entry

            try:
                parse_entry(request.document, ref, expect_name=request.key[len(INTENTIONS_PREFIX):])
            except DocumentError as exc:
                errors = exc.errors
        return policy_pb2.ValidateResponse(valid=not errors, errors=errors)


async def start_grpc(service: PolicyService, addr: str) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server on ``addr`` (host:port, port 0 picks one); returns it and the bound port."""
    server = grpc.aio.server()
    policy_pb2_grpc.add_PolicyServicer_to_server(PolicyServicer(service), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port(addr)
    if port == 0:
        raise OSError(f"cannot listen on {addr}")
    await server.start()
    return server, port
