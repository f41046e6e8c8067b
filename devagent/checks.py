"""Health checks that really run: TTL, HTTP, TCP, gRPC (grpc.health.v1) and alias, plus the reaper
for ``DeregisterCriticalServiceAfter``.

One asyncio task per check of the local node whose row has a runnable ``_Type``; the task is
started when the check is written with a new definition and cancelled when the check is deleted or
re-defined (store triggers schedule this after the transaction commits). Probes never block the
event loop: HTTP uses aiohttp, TCP ``asyncio.open_connection``, gRPC grpcio's asyncio channel.
Status changes are written only when the status or output changes, as Consul does.

Outputs follow Consul's agent/checks: ``HTTP GET <url>: 200 OK Output: <body>``,
``TCP connect <addr>: Success``, ``gRPC check <target>: success``, ``TTL expired``, alias
``All checks passing.`` / ``Aliased check "<name>" failing: <output>`` / ``No checks found.``.
SuccessBeforePassing / FailuresBeforeWarning / FailuresBeforeCritical are honoured.

Reaper: every ``check_reap_interval`` (Consul's default 30s; ``-check-reap-interval``), a local
service whose check with ``DeregisterCriticalServiceAfter`` has been critical for longer than that
duration (raised to ``-check-deregister-interval-min``, Consul's 1m by default) is deregistered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog

from devagent import registry
from devagent import services as sv
from devagent.codec import MINUTE, SECOND, format_duration
from devagent.http import wait_for_change
from devagent.state import Row, Tx

if TYPE_CHECKING:
    from devagent.agent import Agent

log = structlog.get_logger("weft.devagent.checks")

DEFAULT_OUTPUT_MAX = 4096  # Consul's DefaultBufSize for check output
DEFAULT_TIMEOUT = 10 * SECOND
MIN_INTERVAL = 1 * SECOND  # Consul's checks.MinInterval
DEFAULT_REAP_INTERVAL = 30 * SECOND
DEFAULT_DEREGISTER_MIN = 1 * MINUTE
USER_AGENT = "Consul Health Check"

DEFAULT_SCRIPT_TIMEOUT = 30 * SECOND  # Consul's CheckMonitor default
RUNNABLE = ("ttl", "http", "tcp", "grpc", "alias", "script")


class OutputTail:
    """The last ``size`` bytes written (Consul's circbuf for script output) and how many were written."""

    def __init__(self, size: int) -> None:
        self.size = size if size > 0 else DEFAULT_OUTPUT_MAX
        self.data = bytearray()
        self.total = 0

    def write(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.data += chunk
        if len(self.data) > self.size:
            del self.data[:len(self.data) - self.size]

    def text(self) -> str:
        out = self.data.decode(errors="replace")
        if self.total > self.size:
            return f"Captured {self.size} of {self.total} bytes\n...\n{out}"
        return out


def script_status(exit_code: int) -> str:
    """Consul's CheckMonitor: exit 0 passing, 1 warning, anything else critical."""
    if exit_code == 0:
        return sv.PASSING
    if exit_code == 1:
        return sv.WARNING
    return sv.CRITICAL


def script_timeout_output(timeout_ns: int, tail: str) -> str:
    msg = f"Timed out ({format_duration(timeout_ns)}) running check"
    return f"{msg}\n\n{tail}" if tail else msg


def truncate(output: str, max_size: int) -> str:
    size = max_size if max_size > 0 else DEFAULT_OUTPUT_MAX
    data = output.encode()
    if len(data) <= size:
        return output
    return f"{data[:size].decode(errors='ignore')} ... (captured {size} of {len(data)} bytes)"


def ttl_expired_output(last: str) -> str:
    return f"TTL expired (last output before timeout follows): {last}" if last else "TTL expired"


def _os_error(err: BaseException, network: str, addr: str) -> str:
    """A Go-like dial error text."""
    if isinstance(err, ConnectionRefusedError):
        return f"dial {network} {addr}: connect: connection refused"
    if isinstance(err, (TimeoutError, asyncio.TimeoutError)):
        return f"dial {network} {addr}: i/o timeout"
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return f"dial {network} {addr}: {str(text).lower()}"


class _Thresholds:
    """Consul's StatusHandler: consecutive successes/failures before a status change."""

    def __init__(self, ct: dict[str, Any]) -> None:
        self.success_before = int(ct.get("SuccessBeforePassing") or 0)
        self.failures_before_critical = int(ct.get("FailuresBeforeCritical") or 0)
        fw = int(ct.get("FailuresBeforeWarning") or 0)
        self.failures_before_warning = fw if fw else self.failures_before_critical
        self.successes = 0
        self.failures = 0

    def judge(self, status: str) -> str | None:
        """The status to record for this result, or None to keep the current one."""
        if status in (sv.PASSING, sv.WARNING):
            self.successes += 1
            self.failures = 0
            return status if self.successes >= self.success_before else None
        self.failures += 1
        self.successes = 0
        if self.failures >= self.failures_before_critical:
            return sv.CRITICAL
        if self.failures >= self.failures_before_warning:
            return sv.WARNING
        return None


class CheckManager:
    """Runs the local node's checks and the critical-service reaper."""

    def __init__(self, agent: Agent, *, reap_interval_ns: int = DEFAULT_REAP_INTERVAL,
                 deregister_min_ns: int = DEFAULT_DEREGISTER_MIN) -> None:
        self.agent = agent
        self.reap_interval = reap_interval_ns / SECOND
        self.deregister_min = deregister_min_ns
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.ttl_touch: dict[str, asyncio.Event] = {}
        self.critical_since: dict[str, float] = {}
        self._started = False
        self._http: aiohttp.ClientSession | None = None
        self._http_insecure: aiohttp.ClientSession | None = None

    # ----- lifecycle -----
    def install(self) -> None:
        store = self.agent.store

        def on_put(tx: Tx, key: str, old: Row | None, new: Row | None) -> None:
            if new is None or new.get("Node") != self.agent.node_name:
                return
            if old is not None and old.get("_Type") == new.get("_Type") and key in self.tasks:
                return
            tx.after_commit.append(lambda: self.schedule(key))

        def on_delete(tx: Tx, key: str, old: Row | None, new: Row | None) -> None:
            if old is not None and old.get("Node") == self.agent.node_name:
                tx.after_commit.append(lambda: self.cancel(key))

        store.on_put("checks", on_put)
        store.on_delete("checks", on_delete)

    async def start(self) -> None:
        self._started = True
        for key, row in list(self.agent.store.rows("checks").items()):
            if row.get("Node") == self.agent.node_name:
                self.schedule(key)
        self.agent.spawn(self._reaper(), name="check-reaper")
        self.agent.on_stop(self.stop)

    async def stop(self) -> None:
        for key in list(self.tasks):
            self.cancel(key)
        for session in (self._http, self._http_insecure):
            if session is not None:
                await session.close()

    def schedule(self, key: str) -> None:
        """(Re)start the runner of check ``key`` from its current row."""
        if not self._started:
            return
        self.cancel(key)
        row = self.agent.store.get("checks", key)
        if row is None or not row.get("_Type"):
            return
        kind = row.get("Type", "")
        runner: Callable[[str, dict[str, Any]], Awaitable[None]] | None = {
            "ttl": self._run_ttl, "http": self._run_http, "tcp": self._run_tcp,
            "grpc": self._run_grpc, "alias": self._run_alias, "script": self._run_script,
        }.get(kind)
        if runner is None:
            return
        ct = dict(row["_Type"])
        task = self.agent.spawn(runner(key, ct), name=f"check {key}")
        self.tasks[key] = task

    def cancel(self, key: str) -> None:
        task = self.tasks.pop(key, None)
        if task is not None:
            task.cancel()
        self.ttl_touch.pop(key, None)
        self.critical_since.pop(key, None)

    # ----- status writes -----
    def _set(self, key: str, status: str, output: str) -> None:
        row = self.agent.store.get("checks", key)
        if row is None:
            return
        with self.agent.store.write() as tx:
            registry.set_status(tx, row["Node"], row["CheckID"], status, output)

    def ttl_update(self, key: str, status: str, output: str) -> None:
        """A TTL check was passed/warned/failed/updated: record it and restart its timer."""
        row = self.agent.store.get("checks", key)
        if row is None:
            return
        out = truncate(output, int((row.get("_Type") or {}).get("OutputMaxSize") or 0))
        with self.agent.store.write() as tx:
            registry.set_status(tx, row["Node"], row["CheckID"], status, out)
        ev = self.ttl_touch.get(key)
        if ev is not None:
            ev.set()

    # ----- runners -----
    async def _run_ttl(self, key: str, ct: dict[str, Any]) -> None:
        ttl = ct["TTL"] / SECOND
        ev = asyncio.Event()
        self.ttl_touch[key] = ev
        while True:
            ev.clear()
            try:
                await asyncio.wait_for(ev.wait(), timeout=ttl)
                continue  # updated: the TTL starts again
            except TimeoutError:
                pass
            row = self.agent.store.get("checks", key)
            if row is None:
                return
            if row["Status"] != sv.CRITICAL or not row["Output"].startswith("TTL expired"):
                log.warning("check TTL expired", check=row["CheckID"])
                self._set(key, sv.CRITICAL, ttl_expired_output(row["Output"]))
            await ev.wait()

    async def _interval_loop(self, key: str, ct: dict[str, Any],
                             probe: Callable[[float], Awaitable[tuple[str, str]]]) -> None:
        interval = max(ct.get("Interval", 0), MIN_INTERVAL) / SECOND  # Consul clamps to 1s
        timeout = (ct.get("Timeout") or DEFAULT_TIMEOUT) / SECOND
        gate = _Thresholds(ct)
        max_out = int(ct.get("OutputMaxSize") or 0)
        # Consul staggers the first run by a random fraction of the interval; a dev agent runs at once
        while True:
            try:
                status, output = await probe(timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a probe must never kill its runner
                status, output = sv.CRITICAL, str(exc) or type(exc).__name__
            decided = gate.judge(status)
            if decided is not None:
                self._set(key, decided, truncate(output, max_out))
            await asyncio.sleep(interval)

    async def _run_http(self, key: str, ct: dict[str, Any]) -> None:
        method = (ct.get("Method") or "GET").upper()
        url = ct["HTTP"]
        headers: dict[str, str] = {"User-Agent": USER_AGENT, "Accept": "text/plain, text/*, */*"}
        multi: list[tuple[str, str]] = []
        for name, values in (ct.get("Header") or {}).items():
            for v in values:
                multi.append((name, v))
        override = {n.lower() for n, _ in multi}
        base = [(k, v) for k, v in headers.items() if k.lower() not in override]
        all_headers = base + multi
        body = ct.get("Body") or None
        session = self._session(bool(ct.get("TLSSkipVerify")))
        max_out = int(ct.get("OutputMaxSize") or 0) or DEFAULT_OUTPUT_MAX

        async def probe(timeout: float) -> tuple[str, str]:
            try:
                async with session.request(method, url, headers=all_headers, data=body,
                                           allow_redirects=not ct.get("DisableRedirects"),
                                           server_hostname=ct.get("TLSServerName") or None,
                                           timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                    data = await resp.content.read(max_out)
                    text = data.decode(errors="replace")
                    result = f"HTTP {method} {url}: {resp.status} {resp.reason or ''} Output: {text}"
                    if 200 <= resp.status < 300:
                        return sv.PASSING, result
                    if resp.status == 429:
                        return sv.WARNING, result
                    return sv.CRITICAL, result
            except TimeoutError:
                return sv.CRITICAL, (f'{method.capitalize()} "{url}": context deadline exceeded '
                                     "(Client.Timeout exceeded while awaiting headers)")
            except aiohttp.ClientConnectorError as exc:
                addr = f"{exc.host}:{exc.port}"
                return sv.CRITICAL, f'{method.capitalize()} "{url}": {_os_error(exc.os_error, "tcp", addr)}'
            except aiohttp.ClientError as exc:
                return sv.CRITICAL, f'{method.capitalize()} "{url}": {exc}'

        await self._interval_loop(key, ct, probe)

    def _session(self, insecure: bool) -> aiohttp.ClientSession:
        if insecure:
            if self._http_insecure is None:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                self._http_insecure = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=0,
                                                                                           force_close=True))
            return self._http_insecure
        if self._http is None:
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
        return self._http

    async def _run_tcp(self, key: str, ct: dict[str, Any]) -> None:
        addr = ct["TCP"]
        host, _, port_text = addr.rpartition(":")
        host = host.strip("[]")

        async def probe(timeout: float) -> tuple[str, str]:
            try:
                port = int(port_text)
            except ValueError:
                return sv.CRITICAL, f"dial tcp {addr}: address {addr}: missing port in address"
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            except (OSError, TimeoutError) as exc:
                return sv.CRITICAL, _os_error(exc, "tcp", addr)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return sv.PASSING, f"TCP connect {addr}: Success"

        await self._interval_loop(key, ct, probe)

    async def _run_grpc(self, key: str, ct: dict[str, Any]) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        target = ct["GRPC"]
        addr, _, service = target.partition("/")
        if ct.get("GRPCUseTLS"):
            channel = grpc.aio.secure_channel(addr, grpc.ssl_channel_credentials(),
                                              options=_tls_options(ct))
        else:
            channel = grpc.aio.insecure_channel(addr)
        stub = health_pb2_grpc.HealthStub(channel)

        async def probe(timeout: float) -> tuple[str, str]:
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                return sv.CRITICAL, f"rpc error: code = {_grpc_code(exc.code())} desc = {exc.details()}"
            status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return sv.PASSING, f"gRPC check {target}: success"
            return sv.CRITICAL, f"gRPC {target} serving status: {status_name}"

        try:
            await self._interval_loop(key, ct, probe)
        finally:
            await channel.close(None)

    async def _run_script(self, key: str, ct: dict[str, Any]) -> None:
        """Consul's CheckMonitor: run ``ScriptArgs`` (no shell) every Interval, stdout and stderr
        together kept to their last OutputMaxSize bytes, killed (its whole process group) after
        Timeout (30s by default)."""
        if not self.agent.config.enable_script_checks:
            # e.g. restored from a data dir by an agent started without -enable-script-checks
            self._set(key, sv.CRITICAL, sv.SCRIPTS_DISABLED_REMOTE)
            return
        args = [str(a) for a in ct.get("ScriptArgs") or []]
        timeout_ns = int(ct.get("Timeout") or 0) or DEFAULT_SCRIPT_TIMEOUT
        max_out = int(ct.get("OutputMaxSize") or 0)

        async def probe(_timeout: float) -> tuple[str, str]:
            return await run_script(args, timeout_ns, max_out)

        await self._interval_loop(key, {**ct, "Timeout": timeout_ns}, probe)

    async def _run_alias(self, key: str, ct: dict[str, Any]) -> None:
        store = self.agent.store
        node = ct.get("AliasNode") or self.agent.node_name
        sid = ct.get("AliasService") or ""
        while not store.closing:  # shutting down: every watch returns at once, so stop here
            topics: list[Any] = [("nodehealth", node), ("svcchecks", node, sid)]
            rows = store.by_index("checks", "nodelevel", node)
            if sid:
                rows = rows + registry.service_checks(store, node, sid)
            checks = [c for c in rows if c["CheckID"] != ct.get("CheckID")]
            exists = store.get("services", registry.service_key(node, sid)) is not None if sid else True
            status, output = alias_status(checks, node, sid, exists)
            self._set(key, status, output)
            await wait_for_change(store, topics, None)

    # ----- reaper -----
    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval)
            try:
                self.reap(time.monotonic())
            except Exception as exc:  # the reaper must keep going
                log.error("check reaper failed", error=repr(exc))

    def reap(self, now: float) -> list[str]:
        """Deregister local services critical for longer than their DeregisterCriticalServiceAfter."""
        store = self.agent.store
        node = self.agent.node_name
        reaped: list[str] = []
        seen: set[str] = set()
        for chk in store.by_index("checks", "node", node):
            ct = chk.get("_Type") or {}
            after = int(ct.get("DeregisterCriticalServiceAfter") or 0)
            key = f"{node}/{chk['CheckID']}"
            if not after or not chk.get("ServiceID"):
                continue
            seen.add(key)
            if chk["Status"] != sv.CRITICAL:
                self.critical_since.pop(key, None)
                continue
            since = self.critical_since.setdefault(key, now)
            timeout = max(after, self.deregister_min) / SECOND
            if now - since > timeout and chk["ServiceID"] not in reaped:
                reaped.append(chk["ServiceID"])
        for key in list(self.critical_since):
            if key not in seen:
                del self.critical_since[key]
        for sid in reaped:
            log.info("check for service has been critical for too long; deregistered service", service=sid)
            with store.write() as tx:
                registry.remove_service(tx, node, sid)
                sidecar = store.get("services", registry.service_key(node, sid + sv.SIDECAR_SUFFIX))
                if sidecar is not None and sidecar.get("_Sidecar"):
                    registry.remove_service(tx, node, sidecar["ID"])
        return reaped


async def run_script(args: list[str], timeout_ns: int, max_out: int) -> tuple[str, str]:
    """Run one script check: (status, output) as Consul's CheckMonitor reports them."""
    tail = OutputTail(max_out)
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    except (OSError, ValueError) as exc:
        return sv.CRITICAL, _exec_error(args[0] if args else "", exc)
    assert proc.stdout is not None

    async def pump() -> int:
        assert proc.stdout is not None
        while True:
            chunk = await proc.stdout.read(65536)
            if not chunk:
                break
            tail.write(chunk)
        return await proc.wait()

    try:
        code = await asyncio.wait_for(pump(), timeout_ns / SECOND)
    except TimeoutError:
        _kill_group(proc)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)
        return sv.CRITICAL, script_timeout_output(timeout_ns, tail.text())
    except asyncio.CancelledError:
        _kill_group(proc)
        raise
    return script_status(code), tail.text()


def _exec_error(prog: str, exc: BaseException) -> str:
    """Go's os/exec error text for a command that cannot start."""
    if isinstance(exc, FileNotFoundError) and "/" not in prog:
        return f'exec: "{prog}": executable file not found in $PATH'
    reason = getattr(exc, "strerror", None) or str(exc)
    return f"fork/exec {prog}: {str(reason).lower()}"


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def alias_status(checks: list[Row], node: str, service_id: str, service_exists: bool) -> tuple[str, str]:
    """Consul's CheckAlias.processChecks over the aliased node's checks (pure)."""
    health, msg = sv.PASSING, "No checks found."
    found = False
    for chk in checks:
        if chk.get("Node") != node:
            continue
        match = bool(service_id) and chk.get("ServiceID") == service_id
        if chk.get("ServiceID") and not match:
            continue
        if match:
            found = True
        if chk["Status"] in (sv.CRITICAL, sv.WARNING):
            health = chk["Status"]
            msg = f'Aliased check "{chk["Name"]}" failing: {chk.get("Output", "")}'
            if chk["Status"] == sv.CRITICAL:
                break
        elif health == sv.PASSING:
            msg = "All checks passing."
    if service_id and not found and not service_exists:
        return sv.CRITICAL, f"Service {service_id} could not be found on node {node}"
    return health, msg


def _grpc_code(code: Any) -> str:
    name = str(getattr(code, "name", code))
    return "".join(p.capitalize() for p in name.split("_"))


def _tls_options(ct: dict[str, Any]) -> list[tuple[str, Any]]:
    if ct.get("TLSServerName"):
        return [("grpc.ssl_target_name_override", ct["TLSServerName"])]
    return []


_MANAGERS: dict[int, CheckManager] = {}


def manager(agent: Agent) -> CheckManager:
    """The agent's check manager (created on first use)."""
    m = _MANAGERS.get(id(agent))
    if m is None or m.agent is not agent:
        cfg = agent.config
        m = CheckManager(agent,
                         reap_interval_ns=int(getattr(cfg, "check_reap_interval_ns", DEFAULT_REAP_INTERVAL)),
                         deregister_min_ns=int(getattr(cfg, "check_deregister_interval_min_ns",
                                                       DEFAULT_DEREGISTER_MIN)))
        _MANAGERS[id(agent)] = m
    return m
