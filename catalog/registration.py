"""Register a service or a connect-proxy sidecar with the local agent, keep its TTL check passing, and
deregister it on shutdown.

    reg = sidecar_registration(service_id="web-1", service_name="web", port=21000, local_service_port=8080,
                               upstreams=[Upstream("api", 9191)], ttl="15s")
    async with Registered(client, reg) as r:           # registers; a TtlKeeper passes the TTL check
        r.keeper.set_status("passing", "ready")        # or "warning"/"critical" with a note
        ...
    # on exit: TTL check failed (critical, "shutting down"), service deregistered

Registrations have Consul's shape (see CONSUL-NOTES.md): a sidecar is `Kind: connect-proxy`,
`Name: <service>-sidecar-proxy`, `ID: <service id>-sidecar-proxy`, `Proxy.DestinationServiceName/ID`,
`Proxy.LocalServiceAddress/Port`, `Proxy.Upstreams`, so `/v1/health/connect/<service>?passing` lists it.

`TtlKeeper` reports the check's status every TTL/3 (`/v1/agent/check/pass|warn|fail/:id?note=`). When
the agent answers 404 (it restarted and forgot the check), it calls `on_missing` (`Registered` passes a
re-registration), so a sidecar comes back by itself after an agent restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING

import structlog

from catalog.client import ConsulError, ConsulNotFound
from catalog.models import (
    CheckDefinition,
    ProxyConfig,
    ServiceRegistration,
    Upstream,
    format_duration,
    freeze_json,
    parse_duration,
)
from catalog.watch import WatchPolicy, backoff_delay, wait_event

if TYPE_CHECKING:
    from catalog.client import ConsulClient

log = structlog.get_logger(__name__)

MIN_DEREGISTER_AFTER = 60.0
"""Consul's minimum for DeregisterCriticalServiceAfter (1m)."""


def ttl_check(service_id: str, ttl: float | str, *, name: str = "", check_id: str = "",
              deregister_critical_after: float | str | None = "1m", notes: str = "") -> CheckDefinition:
    """A TTL check for `service_id` (id `<service_id>:ttl` unless given); starts critical until first passed."""
    seconds = parse_duration(ttl, "ttl")
    if seconds <= 0:
        raise ValueError("ttl: must be greater than 0")
    dereg = ""
    if deregister_critical_after is not None:
        d = parse_duration(deregister_critical_after, "deregister_critical_after")
        if d < MIN_DEREGISTER_AFTER:
            raise ValueError(f"deregister_critical_after: Consul's minimum is 1m, got {deregister_critical_after!r}")
        dereg = format_duration(d)
    return CheckDefinition(name=name or f"{service_id} TTL", check_id=check_id or f"{service_id}:ttl",
                           ttl=format_duration(seconds), deregister_critical_service_after=dereg, notes=notes,
                           status="critical")


def service_registration(*, name: str, port: int, service_id: str = "", address: str = "",
                         tags: Sequence[str] = (), meta: Mapping[str, str] | None = None,
                         ttl: float | str | None = "15s", deregister_critical_after: float | str | None = "1m",
                         checks: Sequence[CheckDefinition] = ()) -> ServiceRegistration:
    """A plain service with an optional TTL check (plus any other `checks`)."""
    if not name:
        raise ValueError("name is required")
    _port(port, "port")
    sid = service_id or name
    all_checks = list(checks)
    if ttl is not None:
        all_checks.insert(0, ttl_check(sid, ttl, deregister_critical_after=deregister_critical_after))
    return ServiceRegistration(name=name, id=sid, address=address, port=port, tags=tuple(tags),
                               meta=tuple(sorted((meta or {}).items())), checks=tuple(all_checks))


def sidecar_registration(*, service_id: str, service_name: str, port: int, local_service_port: int,
                         local_service_address: str = "127.0.0.1", address: str = "",
                         upstreams: Sequence[Upstream] = (), tags: Sequence[str] = (),
                         meta: Mapping[str, str] | None = None, ttl: float | str | None = "15s",
                         deregister_critical_after: float | str | None = "1m", alias_check: bool = True,
                         proxy_config: Mapping[str, object] | None = None) -> ServiceRegistration:
    """A connect-proxy registration for the sidecar of `service_id`, as Consul registers one:
    ID `<service_id>-sidecar-proxy`, Name `<service_name>-sidecar-proxy`, a TTL check kept by the
    sidecar, and an alias check on the service it fronts (Consul's "Connect Sidecar Aliasing")."""
    if not service_id or not service_name:
        raise ValueError("service_id and service_name are required")
    _port(port, "port")
    _port(local_service_port, "local_service_port")
    names = [u.destination_name for u in upstreams]
    binds = [(u.local_bind_address, u.local_bind_port) for u in upstreams]
    if len(set(binds)) != len(binds):
        raise ValueError(f"upstreams: two upstreams bind the same local address and port: {binds}")
    sid = f"{service_id}-sidecar-proxy"
    checks: list[CheckDefinition] = []
    if ttl is not None:
        checks.append(ttl_check(sid, ttl, name="Weft sidecar TTL",
                                deregister_critical_after=deregister_critical_after))
    if alias_check:
        checks.append(CheckDefinition(name=f"Connect Sidecar Aliasing {service_id}", check_id=f"{sid}:alias",
                                      alias_service=service_id))
    proxy = ProxyConfig(destination_service_name=service_name, destination_service_id=service_id,
                        local_service_address=local_service_address, local_service_port=local_service_port,
                        upstreams=tuple(upstreams), config=freeze_json(dict(proxy_config or {})))
    log.debug("sidecar_registration", id=sid, upstreams=names)
    return ServiceRegistration(name=f"{service_name}-sidecar-proxy", id=sid, kind="connect-proxy",
                               address=address, port=port, tags=tuple(tags),
                               meta=tuple(sorted((meta or {}).items())), proxy=proxy, checks=tuple(checks))


def ttl_check_id(registration: ServiceRegistration) -> str:
    """The ID of the registration's first TTL check ("" when it has none)."""
    for c in registration.checks:
        if c.ttl:
            return c.check_id or f"service:{registration.service_id}"
    return ""


def _port(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 65535:
        raise ValueError(f"{name}: expected a port 1..65535, got {value!r}")


class TtlKeeper:
    """Keeps a TTL check at the status set with `set_status` (passing by default), reporting every
    `interval` (TTL/3 by default). `stop()` marks it critical with a note."""

    def __init__(self, client: ConsulClient, check_id: str, ttl: float | str, *, note: str = "",
                 interval: float | None = None,
                 on_missing: Callable[[], Awaitable[None]] | None = None) -> None:
        if not check_id:
            raise ValueError("check_id is required")
        self.client = client
        self.check_id = check_id
        self.ttl = parse_duration(ttl, "ttl")
        if self.ttl <= 0:
            raise ValueError("ttl: must be greater than 0")
        self.interval = interval if interval is not None else self.ttl / 3
        self.on_missing = on_missing
        self.status = "passing"
        self.note = note
        self.last_error: BaseException | None = None
        self.reports = 0
        """Successful reports so far."""
        self._changed = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._policy = WatchPolicy(backoff_base=0.5, backoff_max=max(1.0, self.interval))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"ttl-keeper:{self.check_id}")

    def set_status(self, status: str, note: str = "") -> None:
        """Report `status` (passing|warning|critical) with `note` from now on (sent at once)."""
        if status not in ("passing", "warning", "critical"):
            raise ValueError(f"status: expected passing, warning or critical, got {status!r}")
        self.status, self.note = status, note
        self._changed.set()

    async def report(self) -> None:
        """Send the current status once (raises ConsulError)."""
        if self.status == "passing":
            await self.client.agent_check_pass(self.check_id, self.note)
        elif self.status == "warning":
            await self.client.agent_check_warn(self.check_id, self.note)
        else:
            await self.client.agent_check_fail(self.check_id, self.note)
        self.reports += 1

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            self._changed.clear()
            try:
                await self.report()
                failures = 0
                self.last_error = None
                delay = self.interval
            except asyncio.CancelledError:
                raise
            except ConsulNotFound as exc:
                self.last_error = exc
                failures += 1
                if self.on_missing is not None:
                    log.warning("ttl_check_missing_reregistering", check=self.check_id)
                    try:
                        await self.on_missing()
                    except ConsulError as exc2:
                        self.last_error = exc2
                # report again at once after a re-registration, but never spin if it did not help
                delay = 0.0 if failures == 1 else backoff_delay(failures - 1, self._policy, random.random())
            except Exception as exc:  # ConsulError expected; nothing may end the keeper silently
                self.last_error = exc
                failures += 1
                if failures == 1:
                    log.warning("ttl_check_report_failed", check=self.check_id, error=str(exc),
                                exc_info=not isinstance(exc, ConsulError))
                delay = backoff_delay(failures, self._policy, random.random())
            await wait_event(self._changed, delay)

    async def stop(self, note: str = "shutting down", *, fail: bool = True) -> None:
        """Stop reporting; with `fail`, mark the check critical with `note` (best effort)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if fail:
            try:
                await self.client.agent_check_fail(self.check_id, note)
            except ConsulError as exc:
                log.info("ttl_check_fail_on_stop_failed", check=self.check_id, error=str(exc))


class Registered:
    """`async with Registered(client, registration):` registers on entry (raises ConsulError if the
    agent refuses), keeps the first TTL check passing with a `TtlKeeper` (`self.keeper`, None without a
    TTL check), re-registers when the agent forgot the check, and on exit marks the check critical and
    deregisters the service (best effort)."""

    def __init__(self, client: ConsulClient, registration: ServiceRegistration, *, note: str = "",
                 replace_existing_checks: bool = True) -> None:
        self.client = client
        self.registration = registration
        self.replace_existing_checks = replace_existing_checks
        self.keeper: TtlKeeper | None = None
        check_id = ttl_check_id(registration)
        if check_id:
            ttl = next(c.ttl for c in registration.checks if c.ttl)
            self.keeper = TtlKeeper(client, check_id, ttl, note=note, on_missing=self.register)

    @property
    def service_id(self) -> str:
        return self.registration.service_id

    async def register(self) -> None:
        await self.client.agent_service_register(self.registration,
                                                 replace_existing_checks=self.replace_existing_checks)
        log.info("service_registered", id=self.service_id, kind=self.registration.kind or "typical")

    async def deregister(self) -> None:
        try:
            await self.client.agent_service_deregister(self.service_id)
            log.info("service_deregistered", id=self.service_id)
        except ConsulError as exc:
            log.warning("service_deregister_failed", id=self.service_id, error=str(exc))

    async def __aenter__(self) -> Registered:
        await self.register()
        if self.keeper is not None:
            self.keeper.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self.keeper is not None:
            await self.keeper.stop()
        await self.deregister()
