"""`ConsulClient`: the one place in Weft that calls Consul's HTTP API.

Built on a small HTTP/1.1 client on asyncio streams (`catalog.http1`: h11 parses, sizes are bounded,
keep-alive pool) rather than aiohttp, which with yarl, multidict and friends costs a gRPC-only sidecar
several MB of RSS: one connection pool per client (address, scheme, TLS, unix sockets
from `ConsulSettings`) and one request path (`ConsulClient.request`). py-consul is not used here: its
package `__init__` loads its synchronous client and `requests` (about 7 MB of RSS in every sidecar) even
when only `consul.aio` is wanted, and its endpoint helpers return untyped dicts, fold errors into strings
(a txn 409 becomes a `ClientError` whose per-operation `Errors` must be re-parsed from text) and lack
what Weft's watches need (no `index`/`wait` on config-entry get/list and the intentions list, no
`hash`/`wait` and no `X-Consul-ContentHash` on `/v1/agent/service/:id`, no `/v1/agent/check/update`).
py-consul stays a test dependency: the dev agent's tests use it as a third-party Consul client. Here
every call has typed results and typed errors.

Configuration is read like Consul's own tools: `CONSUL_HTTP_ADDR` (``host:port``,
``http(s)://host:port`` or ``unix:///path``), `CONSUL_HTTP_TOKEN` / `CONSUL_HTTP_TOKEN_FILE`,
`CONSUL_HTTP_SSL`, `CONSUL_HTTP_SSL_VERIFY`, `CONSUL_CACERT`, `CONSUL_CAPATH`, `CONSUL_CLIENT_CERT`,
`CONSUL_CLIENT_KEY`, `CONSUL_DATACENTER`. See `catalog.models.ConsulSettings`.

Usage::

    async with ConsulClient.from_env() as consul:          # or: c = ConsulClient(); ...; await c.close()
        index, entry = await consul.kv_get("weft/ca/roots")            # entry: KVEntry | None
        index, entry = await consul.kv_get("weft/ca/roots", index=index, wait=30)   # blocks
        ok = await consul.kv_put("weft/x", b"v", cas=0)
        index, instances = await consul.health_connect("api")          # passing sidecars of "api"

API shape (for Protocols in `ca/` and `policies/`, which must not import `catalog`): plain async methods
with plain keyword arguments; durations are seconds (`float`); every blocking-capable read takes
``index: int = 0`` and ``wait: float | None = None`` and returns ``(index, value)``; agent-local reads
that block on a content hash take ``hash: str = ""`` and return ``(hash, value)``. Every method takes
``token=`` to override the client's token for that call.

Errors (all subclasses of `ConsulError`, which carries `status`, `method`, `path`, Consul's `message`):
`ConsulUnavailable` (connection refused/reset, timeout, 429, 5xx), `ConsulNotFound` (404),
`ConsulPermissionDenied` (403), `ConsulACLDisabled` (401), `ConsulBadRequest` (400, 413 and other 4xx),
`ConsulTxnConflict` (409 from `/v1/txn`, with `errors`), `ConsulInvalidResponse` (a body that is not
what Consul's API documents). Tokens never appear in errors or logs.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import structlog

from catalog import configentry, http1
from catalog.chain import CompiledChain, parse_chain
from catalog.models import (
    JSON,
    AclToken,
    AgentSelf,
    CheckDefinition,
    ConsulSettings,
    HealthCheck,
    KVEntry,
    KVTxnOp,
    ServiceInstance,
    ServiceRegistration,
    Session,
    TxnOpError,
    format_duration,
    parse_catalog_services,
    parse_duration,
    parse_instances,
    parse_kv_entries,
    parse_txn_errors,
    parse_txn_results,
)

log = structlog.get_logger(__name__)

Params = list[tuple[str, str]]
T = TypeVar("T")

__all__ = [
    "ConsulACLDisabled",
    "ConsulBadRequest",
    "ConsulClient",
    "ConsulError",
    "ConsulInvalidResponse",
    "ConsulNotFound",
    "ConsulPermissionDenied",
    "ConsulResponse",
    "ConsulTxnConflict",
    "ConsulUnavailable",
]


# ---------------------------------------------------------------------------------------------------------------
# Errors


class ConsulError(Exception):
    """A failed Consul call. `message` is Consul's own text (trimmed); the token is never included."""

    def __init__(self, message: str, *, status: int = 0, method: str = "", path: str = "") -> None:
        self.message = message
        self.status = status
        self.method = method
        self.path = path
        where = f"{method} {path}".strip()
        prefix = f"{where}: " if where else ""
        code = f"{status} " if status else ""
        super().__init__(f"{prefix}{code}{message}".strip())


class ConsulUnavailable(ConsulError):
    """Consul could not be reached or could not answer (connection error, timeout, 429, 5xx)."""


class ConsulNotFound(ConsulError):
    """404."""


class ConsulPermissionDenied(ConsulError):
    """403: the token lacks a permission."""


class ConsulACLDisabled(ConsulError):
    """401: an ACL endpoint was called while ACLs are disabled."""


class ConsulBadRequest(ConsulError):
    """400, 413 and other 4xx: Consul rejected the request; `message` says why."""


class ConsulInvalidResponse(ConsulError):
    """Consul answered 2xx with a body that does not have the documented shape."""


class ConsulTxnConflict(ConsulError):
    """409 from `/v1/txn`: the transaction was rolled back; `errors` says which operation failed and why."""

    def __init__(self, errors: Sequence[TxnOpError], *, method: str = "PUT", path: str = "/v1/txn") -> None:
        self.errors = tuple(errors)
        text = "; ".join(f"op {e.op_index}: {e.what}" for e in self.errors) or "transaction rolled back"
        super().__init__(text, status=409, method=method, path=path)


# ---------------------------------------------------------------------------------------------------------------
# Responses


@dataclass(frozen=True)
class ConsulResponse:
    status: int
    headers: Mapping[str, str]
    """Lower-case header names."""
    body: str

    @property
    def index(self) -> int:
        """`X-Consul-Index` (0 when absent or not a number)."""
        raw = self.headers.get("x-consul-index", "")
        return int(raw) if raw.isdigit() else 0

    @property
    def content_hash(self) -> str:
        return self.headers.get("x-consul-contenthash", "")

    def json(self) -> JSON:
        if not self.body.strip():
            return None
        try:
            return json.loads(self.body)
        except json.JSONDecodeError as exc:
            raise ValueError(f"body is not JSON: {exc}") from None


def _message(body: str) -> str:
    text = body.strip()
    return text if len(text) <= 500 else text[:500] + "..."


# ---------------------------------------------------------------------------------------------------------------
# the transport: Weft's settings (unix sockets, TLS options, no pool-wide timeout) on one HTTP/1.1 connection pool


def _ssl_context(settings: ConsulSettings) -> ssl.SSLContext | bool:
    if settings.scheme != "https":
        return False
    if not settings.verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cafile=settings.ca_file or None, capath=settings.ca_path or None)
    if settings.client_cert:
        ctx.load_cert_chain(settings.client_cert, settings.client_key or None)
    return ctx


class _Transport:
    """The client's HTTP/1.1 connection pool (`catalog.http1`), built from `ConsulSettings` (TCP or unix
    socket, TLS options); no pool-wide timeout: blocking queries last up to wait + wait/16, and each call
    sets its own (waiting for a pooled connection included)."""

    def __init__(self, settings: ConsulSettings) -> None:
        if settings.scheme == "unix":
            self.host_header = "localhost"
            opener = http1.unix_opener(settings.unix_path)
        else:
            ctx = _ssl_context(settings)
            self.host_header = (f"[{settings.host}]:{settings.port}" if ":" in settings.host
                                else f"{settings.host}:{settings.port}")
            opener = http1.tcp_opener(settings.host, settings.port, ctx if isinstance(ctx, ssl.SSLContext) else None)
        self._pool = http1.Http1Pool(opener)

    @staticmethod
    def target(path: str, params: Sequence[tuple[str, str]]) -> str:
        target = urllib.parse.quote(path, safe="/:")
        return f"{target}?{urllib.parse.urlencode(params)}" if params else target

    async def request(self, method: str, path: str, params: Sequence[tuple[str, str]], data: bytes | str,
                      headers: dict[str, str], timeout: float | None) -> tuple[int, dict[str, str], str]:
        """(status, headers with lower-case names, body as UTF-8 text)."""
        body = data.encode() if isinstance(data, str) else data
        hs = [("Host", self.host_header), ("Accept", "application/json"), *headers.items()]
        async with asyncio.timeout(timeout):
            status, resp_headers, raw = await self._pool.request(method, self.target(path, params), hs, body)
        return status, dict(resp_headers), raw.decode("utf-8", errors="replace")

    async def close(self) -> None:
        self._pool.close()


# ---------------------------------------------------------------------------------------------------------------
# The client


def _blocking(params: Params, index: int, wait: float | None) -> float | None:
    """Add index/wait; return the wait that the call's timeout must allow for (None: not blocking)."""
    if index < 0:
        raise ValueError(f"index must not be negative, got {index}")
    if index > 0:
        params.append(("index", str(index)))
        if wait is not None:
            params.append(("wait", format_duration(wait)))
            return wait
        return 300.0  # Consul's default wait (5m)
    return None


def _hash_blocking(params: Params, hash_: str, wait: float | None) -> float | None:
    if hash_:
        params.append(("hash", hash_))
        if wait is not None:
            params.append(("wait", format_duration(wait)))
            return wait
        return 300.0
    return None


def _as_dict(value: JSON, what: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return dict(value)


def _as_list_of_dicts(value: JSON, what: str) -> tuple[dict[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"{what}: expected a list, got {type(value).__name__}")
    return tuple(_as_dict(v, f"{what}[{i}]") for i, v in enumerate(value))


def _bool_body(value: JSON, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if value is None:  # some write endpoints answer an empty body
        return True
    raise ValueError(f"{what}: expected true or false, got {value!r}")


class ConsulClient:
    """Typed async access to Consul's HTTP API over one connection pool (created on first use, inside
    the running event loop; `await close()` when done, or use `async with`)."""

    def __init__(self, settings: ConsulSettings | None = None, *, request_timeout: float = 30.0) -> None:
        self.settings = settings if settings is not None else ConsulSettings.from_env(os.environ)
        self.request_timeout = request_timeout
        token = self.settings.token
        if not token and self.settings.token_file:
            try:
                token = Path(self.settings.token_file).read_text().strip()
            except OSError as exc:
                raise ValueError(f"CONSUL_HTTP_TOKEN_FILE: cannot read {self.settings.token_file}: "
                                 f"{exc.strerror}") from None
        self._token = token
        self._transport: _Transport | None = None
        self._closed = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, request_timeout: float = 30.0) -> ConsulClient:
        return cls(ConsulSettings.from_env(os.environ if env is None else env), request_timeout=request_timeout)

    @property
    def address(self) -> str:
        """Where this client sends requests (for logs; never includes the token)."""
        s = self.settings
        return f"unix://{s.unix_path}" if s.scheme == "unix" else s.base_url

    @property
    def _http(self) -> _Transport:
        """The session, created on first use (inside the running event loop)."""
        if self._closed:
            raise RuntimeError("ConsulClient is closed")
        if self._transport is None:
            self._transport = _Transport(self.settings)
        return self._transport

    @property
    def token(self) -> str:
        """The token sent with every call ("" for none): CONSUL_HTTP_TOKEN, else CONSUL_HTTP_TOKEN_FILE's
        content. Never log it."""
        return self._token

    async def close(self) -> None:
        self._closed = True
        if self._transport is not None:
            t, self._transport = self._transport, None
            await t.close()

    async def __aenter__(self) -> ConsulClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- the request path -----------------------------------------------------------------------------------------

    async def request(self, method: str, path: str, *, params: Sequence[tuple[str, str]] | None = None,
                      body: bytes | str | JSON = None, token: str | None = None, timeout: float | None = None,
                      allow_404: bool = False, ok_statuses: Sequence[int] = ()) -> ConsulResponse:
        """One HTTP call; non-2xx statuses raise typed errors (404 is returned when `allow_404`, and any
        status in `ok_statuses` is returned as is). `body` may be bytes/str (sent as is) or a JSON value.
        Use this for endpoints without a typed method; it shares the one session."""
        if not path.startswith("/v1/"):
            raise ValueError(f"path must start with /v1/, got {path!r}")
        http = self._http
        headers: dict[str, str] = {}
        tok = self._token if token is None else token
        if tok:
            headers["X-Consul-Token"] = tok
        data: bytes | str
        if body is None:
            data = ""
        elif isinstance(body, (bytes, str)):
            data = body
        else:
            data = json.dumps(body)
            headers["Content-Type"] = "application/json"
        plist = list(params or ())
        if self.settings.datacenter and not path.startswith("/v1/agent/") and not any(k == "dc" for k, _ in plist):
            plist.append(("dc", self.settings.datacenter))
        total = timeout if timeout is not None else self.request_timeout
        verb = method.upper()
        if verb not in ("GET", "PUT", "DELETE", "POST"):
            raise ValueError(f"unsupported method {method!r}")
        # (the pool resends a GET once when a pooled keep-alive connection turns out to have been closed by
        # the server, e.g. after an agent restart; other methods fail with ConsulUnavailable)
        try:
            status, resp_headers, text = await http.request(verb, path, plist, data, headers, total)
        except asyncio.CancelledError:
            raise
        except http1.ResponseError as exc:
            raise ConsulInvalidResponse(f"bad HTTP response from Consul at {self.address}: {exc}",
                                        method=verb, path=path) from None
        except (TimeoutError, http1.ConnectionLost, OSError) as exc:
            raise ConsulUnavailable(f"cannot reach Consul at {self.address}: {type(exc).__name__}: {exc}",
                                    method=verb, path=path) from None
        out = ConsulResponse(status=status, headers=resp_headers, body=text)
        return _check(out, verb, path, allow_404=allow_404, ok_statuses=ok_statuses)

    def _timeout_for(self, wait: float | None) -> float | None:
        if wait is None:
            return None
        return wait + wait / 16 + self.request_timeout

    async def _get(self, path: str, params: Params, *, token: str | None, wait: float | None,
                   allow_404: bool = False) -> ConsulResponse:
        return await self.request("GET", path, params=params, token=token, timeout=self._timeout_for(wait),
                                  allow_404=allow_404)

    # -- status / agent -------------------------------------------------------------------------------------------

    async def status_leader(self, *, token: str | None = None) -> str:
        """`/v1/status/leader`: the leader's address ("" when there is none)."""
        r = await self.request("GET", "/v1/status/leader", token=token)
        return _parse(r, "GET /v1/status/leader", lambda v: v if isinstance(v, str) else _bad_type(v, "a string"))

    async def agent_self(self, *, token: str | None = None) -> AgentSelf:
        r = await self.request("GET", "/v1/agent/self", token=token)
        return _parse(r, "agent self", AgentSelf.from_api)

    async def agent_service(self, service_id: str, *, hash: str = "", wait: float | None = None,
                            token: str | None = None) -> tuple[str, ServiceRegistration | None]:
        """`/v1/agent/service/:id` -> (content hash, registration or None when not registered).

        Blocks while the content hash equals `hash` (agent-local blocking)."""
        _require(service_id, "service_id")
        params: Params = []
        w = _hash_blocking(params, hash, wait)
        r = await self._get(f"/v1/agent/service/{service_id}", params, token=token, wait=w, allow_404=True)
        if r.status == 404:
            return ("", None)
        reg = _parse(r, "agent service", ServiceRegistration.from_api)
        return (r.content_hash or reg.content_hash, reg)

    async def agent_service_register(self, registration: ServiceRegistration | Mapping[str, Any], *,
                                     replace_existing_checks: bool = False, token: str | None = None) -> None:
        body = registration.to_api() if isinstance(registration, ServiceRegistration) else dict(registration)
        params: Params = [("replace-existing-checks", "true")] if replace_existing_checks else []
        await self.request("PUT", "/v1/agent/service/register", params=params, body=body, token=token)

    async def agent_service_deregister(self, service_id: str, *, token: str | None = None) -> None:
        _require(service_id, "service_id")
        await self.request("PUT", f"/v1/agent/service/deregister/{service_id}", token=token)

    async def agent_checks(self, *, filter: str = "", token: str | None = None) -> dict[str, HealthCheck]:
        """`/v1/agent/checks`: this agent's checks, by check ID."""
        params: Params = [("filter", filter)] if filter else []
        r = await self.request("GET", "/v1/agent/checks", params=params, token=token)

        def conv(v: JSON) -> dict[str, HealthCheck]:
            return {cid: HealthCheck.from_api(c, f"checks[{cid!r}]") for cid, c in _as_dict(v, "checks").items()}

        return _parse(r, "agent checks", conv)

    async def agent_check_register(self, check: CheckDefinition | Mapping[str, Any], *,
                                   token: str | None = None) -> None:
        body = check.to_api() if isinstance(check, CheckDefinition) else dict(check)
        await self.request("PUT", "/v1/agent/check/register", body=body, token=token)

    async def agent_check_deregister(self, check_id: str, *, token: str | None = None) -> None:
        _require(check_id, "check_id")
        await self.request("PUT", f"/v1/agent/check/deregister/{check_id}", token=token)

    async def agent_check_pass(self, check_id: str, note: str = "", *, token: str | None = None) -> None:
        await self._ttl("pass", check_id, note, token)

    async def agent_check_warn(self, check_id: str, note: str = "", *, token: str | None = None) -> None:
        await self._ttl("warn", check_id, note, token)

    async def agent_check_fail(self, check_id: str, note: str = "", *, token: str | None = None) -> None:
        await self._ttl("fail", check_id, note, token)

    async def _ttl(self, verb: str, check_id: str, note: str, token: str | None) -> None:
        _require(check_id, "check_id")
        params: Params = [("note", note)] if note else []
        await self.request("PUT", f"/v1/agent/check/{verb}/{check_id}", params=params, token=token)

    async def agent_check_update(self, check_id: str, status: str, output: str = "", *,
                                 token: str | None = None) -> None:
        """`PUT /v1/agent/check/update/:id` with Status (passing|warning|critical) and Output."""
        _require(check_id, "check_id")
        if status not in ("passing", "warning", "critical"):
            raise ValueError(f"status: expected passing, warning or critical, got {status!r}")
        await self.request("PUT", f"/v1/agent/check/update/{check_id}", body={"Status": status, "Output": output},
                           token=token)

    # -- health / catalog -----------------------------------------------------------------------------------------

    async def health_service(self, service: str, *, passing: bool = True, tag: str | Sequence[str] = "",
                             filter: str = "",
                             index: int = 0, wait: float | None = None,
                             token: str | None = None) -> tuple[int, tuple[ServiceInstance, ...]]:
        """`/v1/health/service/:name`; by default only instances whose checks all pass (`?passing`).
        `tag`: one tag, or several (an instance must have all of them)."""
        return await self._health("service", service, passing, tag, filter, index, wait, token)

    async def health_connect(self, service: str, *, passing: bool = True, tag: str | Sequence[str] = "",
                             filter: str = "",
                             index: int = 0, wait: float | None = None,
                             token: str | None = None) -> tuple[int, tuple[ServiceInstance, ...]]:
        """`/v1/health/connect/:name`: the connect-proxy (sidecar) and Connect-native instances for `service`,
        with the proxies' own addresses and ports; by default passing only."""
        return await self._health("connect", service, passing, tag, filter, index, wait, token)

    async def _health(self, kind: str, service: str, passing: bool, tag: str | Sequence[str], filter: str,
                      index: int, wait: float | None, token: str | None) -> tuple[int, tuple[ServiceInstance, ...]]:
        _require(service, "service")
        params: Params = []
        if passing:
            params.append(("passing", "1"))
        for t in ([tag] if isinstance(tag, str) else list(tag)):
            if t:
                params.append(("tag", t))
        if filter:
            params.append(("filter", filter))
        w = _blocking(params, index, wait)
        r = await self._get(f"/v1/health/{kind}/{service}", params, token=token, wait=w)
        return (r.index, _parse(r, f"health {kind}", parse_instances))

    async def catalog_services(self, *, index: int = 0, wait: float | None = None,
                               token: str | None = None) -> tuple[int, dict[str, tuple[str, ...]]]:
        """`/v1/catalog/services`: {service name: tags}."""
        params: Params = []
        w = _blocking(params, index, wait)
        r = await self._get("/v1/catalog/services", params, token=token, wait=w)
        return (r.index, _parse(r, "catalog services", parse_catalog_services))

    # -- KV ---------------------------------------------------------------------------------------------------------

    async def kv_get(self, key: str, *, index: int = 0, wait: float | None = None,
                     token: str | None = None) -> tuple[int, KVEntry | None]:
        """One key -> (index, entry or None when missing). A missing key still carries an index to block on."""
        _check_key(key)
        params: Params = []
        w = _blocking(params, index, wait)
        r = await self._get(f"/v1/kv/{key}", params, token=token, wait=w, allow_404=True)
        if r.status == 404:
            return (r.index, None)
        entries = _parse(r, "kv get", parse_kv_entries)
        match = [e for e in entries if e.key == key]
        return (r.index, match[0] if match else (entries[0] if entries else None))

    async def kv_get_recurse(self, prefix: str, *, index: int = 0, wait: float | None = None,
                             token: str | None = None) -> tuple[int, tuple[KVEntry, ...]]:
        """Every key under `prefix` (sorted by key; empty when none)."""
        _check_key(prefix, allow_empty=True)
        params: Params = [("recurse", "1")]
        w = _blocking(params, index, wait)
        r = await self._get(f"/v1/kv/{prefix}", params, token=token, wait=w, allow_404=True)
        if r.status == 404:
            return (r.index, ())
        return (r.index, tuple(sorted(_parse(r, "kv recurse", parse_kv_entries), key=lambda e: e.key)))

    async def kv_keys(self, prefix: str = "", *, separator: str = "", index: int = 0, wait: float | None = None,
                      token: str | None = None) -> tuple[int, tuple[str, ...]]:
        _check_key(prefix, allow_empty=True)
        params: Params = [("keys", "1")]
        if separator:
            params.append(("separator", separator))
        w = _blocking(params, index, wait)
        r = await self._get(f"/v1/kv/{prefix}", params, token=token, wait=w, allow_404=True)
        if r.status == 404:
            return (r.index, ())

        def conv(v: JSON) -> tuple[str, ...]:
            if v is None:
                return ()
            if not isinstance(v, list) or not all(isinstance(k, str) for k in v):
                raise ValueError("keys: expected a list of strings")
            return tuple(v)

        return (r.index, _parse(r, "kv keys", conv))

    async def kv_put(self, key: str, value: bytes | str | None = b"", *, flags: int | None = None,
                     cas: int | None = None, acquire: str = "", release: str = "",
                     token: str | None = None) -> bool:
        """Write a key; False when a `cas` index does not match or a lock is not acquired/released."""
        _check_key(key)
        params: Params = []
        if flags is not None:
            if flags < 0:
                raise ValueError(f"flags must not be negative, got {flags}")
            params.append(("flags", str(flags)))
        if cas is not None:
            params.append(("cas", str(cas)))
        if acquire:
            params.append(("acquire", acquire))
        if release:
            params.append(("release", release))
        data = value.encode() if isinstance(value, str) else (value or b"")
        r = await self.request("PUT", f"/v1/kv/{key}", params=params, body=data, token=token)
        return _parse(r, "kv put", lambda v: _bool_body(v, "kv put"))

    async def kv_delete(self, key: str, *, recurse: bool = False, cas: int | None = None,
                        token: str | None = None) -> bool:
        _check_key(key, allow_empty=recurse)
        params: Params = []
        if recurse:
            params.append(("recurse", "1"))
        if cas is not None:
            params.append(("cas", str(cas)))
        r = await self.request("DELETE", f"/v1/kv/{key}", params=params, token=token)
        return _parse(r, "kv delete", lambda v: _bool_body(v, "kv delete"))

    async def txn(self, ops: Sequence[KVTxnOp | Mapping[str, Any]], *,
                  token: str | None = None) -> tuple[KVEntry | None, ...]:
        """`PUT /v1/txn`, all or nothing. Returns each operation's KV result (None for results without KV;
        `delete`/`check-*` verbs return none, so the tuple may be shorter than `ops`).
        Raises `ConsulTxnConflict` (with per-operation errors) when Consul rolls the transaction back."""
        if not ops:
            raise ValueError("txn: at least one operation is required")
        body = [op.to_api() if isinstance(op, KVTxnOp) else dict(op) for op in ops]
        r = await self.request("PUT", "/v1/txn", body=body, token=token, ok_statuses=(409,))
        if r.status == 409:
            try:
                errors = parse_txn_errors(r.json())
            except ValueError as exc:
                raise ConsulInvalidResponse(f"txn 409 body: {exc}", status=409, method="PUT",
                                            path="/v1/txn") from None
            raise ConsulTxnConflict(errors)
        return _parse(r, "txn", parse_txn_results)

    # -- sessions ---------------------------------------------------------------------------------------------------

    async def session_create(self, *, name: str = "", ttl: float | str | None = None, behavior: str = "release",
                             lock_delay: float | str | None = None, node: str = "",
                             node_checks: Sequence[str] | None = None, service_checks: Sequence[str] | None = None,
                             token: str | None = None) -> str:
        """`PUT /v1/session/create` -> session ID. `ttl` 10s..86400s; `behavior` release|delete."""
        if behavior not in ("release", "delete"):
            raise ValueError(f"behavior: expected 'release' or 'delete', got {behavior!r}")
        body: dict[str, Any] = {"Behavior": behavior}
        if name:
            body["Name"] = name
        if ttl is not None:
            body["TTL"] = format_duration(parse_duration(ttl, "ttl"))
        if lock_delay is not None:
            body["LockDelay"] = format_duration(parse_duration(lock_delay, "lock_delay"))
        if node:
            body["Node"] = node
        if node_checks is not None:
            body["NodeChecks"] = list(node_checks)
        if service_checks is not None:
            body["ServiceChecks"] = [{"ID": c} for c in service_checks]
        r = await self.request("PUT", "/v1/session/create", body=body, token=token)

        def conv(v: JSON) -> str:
            sid = _as_dict(v, "session").get("ID")
            if not isinstance(sid, str) or not sid:
                raise ValueError("session.ID: missing")
            return sid

        return _parse(r, "session create", conv)

    async def session_renew(self, session_id: str, *, token: str | None = None) -> Session:
        """Renew a TTL session. Raises `ConsulNotFound` when the session no longer exists."""
        _require(session_id, "session_id")
        r = await self.request("PUT", f"/v1/session/renew/{session_id}", token=token)
        sessions = _parse(r, "session renew", _parse_sessions)
        if not sessions:
            raise ConsulNotFound(f"session {session_id} not found", status=404, method="PUT",
                                 path=f"/v1/session/renew/{session_id}")
        return sessions[0]

    async def session_destroy(self, session_id: str, *, token: str | None = None) -> bool:
        _require(session_id, "session_id")
        r = await self.request("PUT", f"/v1/session/destroy/{session_id}", token=token)
        return _parse(r, "session destroy", lambda v: _bool_body(v, "session destroy"))

    async def session_info(self, session_id: str, *, index: int = 0, wait: float | None = None,
                           token: str | None = None) -> tuple[int, Session | None]:
        _require(session_id, "session_id")
        params: Params = []
        w = _blocking(params, index, wait)
        r = await self._get(f"/v1/session/info/{session_id}", params, token=token, wait=w, allow_404=True)
        if r.status == 404:
            return (r.index, None)
        sessions = _parse(r, "session info", _parse_sessions)
        return (r.index, sessions[0] if sessions else None)

    # -- config entries and intentions ----------------------------------------------------------------------------

    async def config_get(self, kind: str, name: str, *, index: int = 0, wait: float | None = None,
                         token: str | None = None) -> tuple[int, dict[str, Any] | None]:
        """`GET /v1/config/:kind/:name` -> (index, entry as JSON, or None when there is none)."""
        _require(kind, "kind")
        _require(name, "name")
        params: Params = []
        w = _blocking(params, index, wait)
        r = await self._get(f"/v1/config/{kind}/{name}", params, token=token, wait=w, allow_404=True)
        if r.status == 404:
            return (r.index, None)
        return (r.index, _parse(r, "config entry", lambda v: _as_dict(v, "config entry")))

    async def config_list(self, kind: str, *, index: int = 0, wait: float | None = None,
                          token: str | None = None) -> tuple[int, tuple[dict[str, Any], ...]]:
        _require(kind, "kind")
        params: Params = []
        w = _blocking(params, index, wait)
        r = await self._get(f"/v1/config/{kind}", params, token=token, wait=w)
        return (r.index, _parse(r, "config entries", lambda v: _as_list_of_dicts(v, "config entries")))

    async def config_put(self, entry: Mapping[str, Any], *, cas: int | None = None,
                         token: str | None = None) -> bool:
        """`PUT /v1/config` (entry needs Kind and Name); False when `cas` does not match."""
        kind, name = configentry.kind_and_name(entry)
        if not kind:
            raise ValueError("config entry: Kind is required")
        if not name:
            raise ValueError("config entry: Name is required")
        params: Params = [("cas", str(cas))] if cas is not None else []
        r = await self.request("PUT", "/v1/config", params=params, body=dict(entry), token=token)
        return _parse(r, "config put", lambda v: _bool_body(v, "config put"))

    async def config_delete(self, kind: str, name: str, *, cas: int | None = None,
                            token: str | None = None) -> bool:
        _require(kind, "kind")
        _require(name, "name")
        params: Params = [("cas", str(cas))] if cas is not None else []
        r = await self.request("DELETE", f"/v1/config/{kind}/{name}", params=params, token=token)

        def conv(v: JSON) -> bool:
            if isinstance(v, Mapping):  # Consul answers {} without cas
                return True
            return _bool_body(v, "config delete")

        return _parse(r, "config delete", conv)

    async def discovery_chain(self, service: str, *, compile_dc: str = "", index: int = 0,
                              wait: float | None = None, token: str | None = None) -> tuple[int, CompiledChain]:
        """`GET /v1/discovery-chain/:service` -> (index, the compiled chain, typed and checked)."""
        _require(service, "service")
        params: Params = [("compile-dc", compile_dc)] if compile_dc else []
        w = _blocking(params, index, wait)
        r = await self._get(f"/v1/discovery-chain/{service}", params, token=token, wait=w)
        return (r.index, _parse(r, "discovery chain", parse_chain))

    async def intentions_list(self, *, filter: str = "", index: int = 0, wait: float | None = None,
                              token: str | None = None) -> tuple[int, tuple[dict[str, Any], ...]]:
        """`GET /v1/connect/intentions` (every intention, as Consul's JSON)."""
        params: Params = [("filter", filter)] if filter else []
        w = _blocking(params, index, wait)
        r = await self._get("/v1/connect/intentions", params, token=token, wait=w)
        return (r.index, _parse(r, "intentions", lambda v: _as_list_of_dicts(v, "intentions")))

    async def intention_get(self, source: str, destination: str, *,
                            token: str | None = None) -> dict[str, Any] | None:
        """`GET /v1/connect/intentions/exact` -> the intention, or None when there is none."""
        params = _src_dst(source, destination)
        r = await self.request("GET", "/v1/connect/intentions/exact", params=params, token=token, allow_404=True)
        if r.status == 404:
            return None
        return _parse(r, "intention", lambda v: _as_dict(v, "intention"))

    async def intention_put(self, source: str, destination: str, intention: Mapping[str, Any], *,
                            token: str | None = None) -> bool:
        """`PUT /v1/connect/intentions/exact` (body: Action or Permissions, Description, Meta...)."""
        params = _src_dst(source, destination)
        r = await self.request("PUT", "/v1/connect/intentions/exact", params=params, body=dict(intention),
                               token=token)
        return _parse(r, "intention put", lambda v: _bool_body(v, "intention put"))

    async def intention_delete(self, source: str, destination: str, *, token: str | None = None) -> bool:
        params = _src_dst(source, destination)
        r = await self.request("DELETE", "/v1/connect/intentions/exact", params=params, token=token)
        return _parse(r, "intention delete", lambda v: _bool_body(v, "intention delete"))

    # -- ACL ----------------------------------------------------------------------------------------------------------

    async def acl_token_self(self, *, token: str | None = None) -> AclToken:
        """`/v1/acl/token/self` for the client's token, or `token` (e.g. to identify a caller's token)."""
        r = await self.request("GET", "/v1/acl/token/self", token=token)
        return _parse(r, "acl token self", AclToken.from_api)


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _check(r: ConsulResponse, method: str, path: str, *, allow_404: bool,
           ok_statuses: Sequence[int]) -> ConsulResponse:
    s = r.status
    if 200 <= s < 300 or s in ok_statuses or (s == 404 and allow_404):
        return r
    msg = _message(r.body) or f"HTTP {s}"
    kw: dict[str, Any] = {"status": s, "method": method, "path": path}
    if s == 404:
        raise ConsulNotFound(msg, **kw)
    if s == 403:
        raise ConsulPermissionDenied(msg, **kw)
    if s == 401:
        raise ConsulACLDisabled(msg, **kw)
    if s == 429 or s >= 500:
        raise ConsulUnavailable(msg, **kw)
    raise ConsulBadRequest(msg, **kw)


def _parse(r: ConsulResponse, what: str, conv: Callable[[JSON], T]) -> T:
    try:
        return conv(r.json())
    except ValueError as exc:
        raise ConsulInvalidResponse(f"{what}: {exc}", status=r.status) from None


def _bad_type(v: JSON, expected: str) -> str:
    raise ValueError(f"expected {expected}, got {v!r}")


def _parse_sessions(v: JSON) -> tuple[Session, ...]:
    if v is None:
        return ()
    if not isinstance(v, list):
        raise ValueError(f"sessions: expected a list, got {type(v).__name__}")
    return tuple(Session.from_api(s, f"sessions[{i}]") for i, s in enumerate(v))


def _require(value: str, name: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} is required")


def _check_key(key: str, *, allow_empty: bool = False) -> None:
    if not isinstance(key, str):
        raise ValueError(f"KV key must be a string, got {type(key).__name__}")
    if not key and not allow_empty:
        raise ValueError("KV key is required")
    if key.startswith("/"):
        raise ValueError(f"KV key must not start with '/': {key!r}")


def _src_dst(source: str, destination: str) -> Params:
    _require(source, "source")
    _require(destination, "destination")
    return [("source", source), ("destination", destination)]
