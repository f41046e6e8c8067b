"""Typed values for what Weft reads from and writes to Consul (pure: no I/O, no aiohttp/grpc/consul).

Every type is a frozen dataclass. `X.from_api(obj)` parses Consul's JSON (CamelCase as Consul answers;
snake_case keys as Consul accepts in definitions are read too) and raises `ValueError` naming the
offending field (e.g. ``"Service.Port: expected an integer, got 'x'"``). `to_api()` gives the JSON
Consul accepts where the value is written back (registrations, checks, upstreams, txn ops).

Types:
- `ServiceInstance`   one entry of `/v1/health/service/:name` or `/v1/health/connect/:name`.
- `HealthCheck`       one check of such an entry.
- `ServiceRegistration` what `/v1/agent/service/:id` returns and what `/v1/agent/service/register` takes.
- `ProxyConfig`, `Upstream`, `CheckDefinition`  parts of a registration.
- `KVEntry`, `Session`, `AclToken`, `AgentSelf`, `KVTxnOp`, `TxnOpError`.
- `ConsulSettings`    `CONSUL_HTTP_ADDR`/`CONSUL_HTTP_TOKEN`/... parsed from an environment mapping.
- `parse_duration` / `format_duration`  Go duration strings ("15s", "1m30s", "250ms") <-> seconds
  (re-exported from `consulkit.conventions`, with `aggregate_status`).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from consulkit.conventions import CHECK_STATUSES as CHECK_STATUSES
from consulkit.conventions import aggregate_status as aggregate_status
from consulkit.conventions import fold_key, format_duration_seconds, parse_duration_seconds

# the names the mesh has always called them by (one definition: consulkit.conventions)
parse_duration = parse_duration_seconds
format_duration = format_duration_seconds

JSON = Any
"""A decoded JSON value (dict/list/str/int/float/bool/None)."""

# ---------------------------------------------------------------------------------------------------------------
# Field readers: every parser goes through these so that errors name the field.


_NORM_CACHE: dict[str, str] = {}


def _norm(key: str) -> str:
    n = _NORM_CACHE.get(key)
    if n is None:
        n = fold_key(key)
        if len(_NORM_CACHE) < 4096:  # field names repeat; bound the cache against odd inputs
            _NORM_CACHE[key] = n
    return n


class _Obj:
    """Reads a JSON object by Consul's field names: the exact name first (fast path for Consul's own
    answers), then case- and underscore-insensitively (snake_case definitions, as Consul accepts)."""

    __slots__ = ("_keys", "_raw", "path")

    def __init__(self, raw: JSON, path: str) -> None:
        if not isinstance(raw, Mapping):
            raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        self._raw = raw
        self._keys: dict[str, Any] | None = None
        self.path = path

    def _key(self, name: str) -> Any:
        if name in self._raw:
            return name
        if self._keys is None:
            self._keys = {_norm(str(k)): k for k in self._raw}
        return self._keys.get(_norm(name))

    def has(self, name: str) -> bool:
        k = self._key(name)
        return k is not None and self._raw[k] is not None

    def raw(self, name: str) -> JSON:
        k = self._key(name)
        return None if k is None else self._raw[k]

    def where(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get_str(self, name: str, default: str = "") -> str:
        v = self.raw(name)
        if v is None:
            return default
        if not isinstance(v, str):
            raise ValueError(f"{self.where(name)}: expected a string, got {v!r}")
        return v

    def req_str(self, name: str) -> str:
        v = self.get_str(name)
        if not v:
            raise ValueError(f"{self.where(name)}: required, missing or empty")
        return v

    def get_int(self, name: str, default: int = 0) -> int:
        v = self.raw(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                return int(v)
            raise ValueError(f"{self.where(name)}: expected an integer, got {v!r}")
        return v

    def port(self, name: str, *, required: bool = False) -> int:
        v = self.get_int(name, -1)
        if v == -1:
            if required:
                raise ValueError(f"{self.where(name)}: required, missing")
            return 0
        if not 0 <= v <= 65535:
            raise ValueError(f"{self.where(name)}: port out of range 0..65535, got {v}")
        return v

    def get_bool(self, name: str, default: bool = False) -> bool:
        v = self.raw(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise ValueError(f"{self.where(name)}: expected true or false, got {v!r}")
        return v

    def str_list(self, name: str) -> tuple[str, ...]:
        v = self.raw(name)
        if v is None:
            return ()
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ValueError(f"{self.where(name)}: expected a list of strings, got {v!r}")
        return tuple(v)

    def str_map(self, name: str) -> tuple[tuple[str, str], ...]:
        v = self.raw(name)
        if v is None:
            return ()
        if not isinstance(v, Mapping) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
            raise ValueError(f"{self.where(name)}: expected an object of strings, got {v!r}")
        return tuple(sorted(v.items()))

    def obj(self, name: str) -> _Obj | None:
        v = self.raw(name)
        if v is None:
            return None
        return _Obj(v, self.where(name))

    def get_list(self, name: str) -> list[JSON]:
        v = self.raw(name)
        if v is None:
            return []
        if not isinstance(v, list):
            raise ValueError(f"{self.where(name)}: expected a list, got {type(v).__name__}")
        return v

    def get_dict(self, name: str) -> dict[str, JSON]:
        v = self.raw(name)
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            raise ValueError(f"{self.where(name)}: expected an object, got {type(v).__name__}")
        return dict(v)


def freeze_json(value: JSON) -> JSON:
    """A hashable, order-stable copy of a JSON value (objects become sorted tuples of pairs)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), freeze_json(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(freeze_json(v) for v in value)
    return value


_freeze = freeze_json


def _thaw(value: JSON) -> JSON:
    """Inverse of `_freeze` for values frozen from objects (tuples of 2-tuples with str keys)."""
    if isinstance(value, tuple):
        if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in value) and value:
            return {k: _thaw(v) for k, v in value}
        return [_thaw(v) for v in value]
    return value


def _list_of(o: _Obj, name: str) -> list[tuple[str, JSON]]:
    """(path, item) for each item of a list field."""
    return [(f"{o.where(name)}[{i}]", item) for i, item in enumerate(o.get_list(name))]


# ---------------------------------------------------------------------------------------------------------------
# Health


@dataclass(frozen=True)
class HealthCheck:
    check_id: str
    name: str
    status: str
    node: str = ""
    output: str = ""
    notes: str = ""
    service_id: str = ""
    service_name: str = ""
    type: str = ""

    @classmethod
    def from_api(cls, obj: JSON, path: str = "Check") -> HealthCheck:
        o = _Obj(obj, path)
        status = o.get_str("Status")
        if status not in CHECK_STATUSES:
            raise ValueError(f"{o.where('Status')}: expected one of {', '.join(CHECK_STATUSES)}, got {status!r}")
        return cls(check_id=o.req_str("CheckID"), name=o.get_str("Name"), status=status, node=o.get_str("Node"),
                   output=o.get_str("Output"), notes=o.get_str("Notes"), service_id=o.get_str("ServiceID"),
                   service_name=o.get_str("ServiceName"), type=o.get_str("Type"))


@dataclass(frozen=True)
class Weights:
    passing: int = 1
    warning: int = 1

    @classmethod
    def from_api(cls, obj: JSON, path: str = "Weights") -> Weights:
        if obj is None:
            return cls()
        o = _Obj(obj, path)
        return cls(passing=o.get_int("Passing", 1), warning=o.get_int("Warning", 1))

    def to_api(self) -> dict[str, int]:
        return {"Passing": self.passing, "Warning": self.warning}


# ---------------------------------------------------------------------------------------------------------------
# Upstreams, proxies, registrations


@dataclass(frozen=True)
class Upstream:
    """One entry of `Proxy.Upstreams`."""

    destination_name: str
    local_bind_port: int
    local_bind_address: str = "127.0.0.1"
    destination_namespace: str = ""
    destination_type: str = "service"
    datacenter: str = ""
    config: tuple[tuple[str, JSON], ...] = ()
    """Free-form `Config` object, frozen (use `config_dict()` to read it)."""

    def config_dict(self) -> dict[str, JSON]:
        out = _thaw(self.config) if self.config else {}
        return out if isinstance(out, dict) else {}

    @classmethod
    def from_api(cls, obj: JSON, path: str = "Upstream") -> Upstream:
        o = _Obj(obj, path)
        dtype = o.get_str("DestinationType", "service") or "service"
        if dtype not in ("service", "prepared_query"):
            raise ValueError(f"{o.where('DestinationType')}: expected 'service' or 'prepared_query', got {dtype!r}")
        port = o.port("LocalBindPort", required=not o.has("LocalBindSocketPath"))
        return cls(destination_name=o.req_str("DestinationName"), local_bind_port=port,
                   local_bind_address=o.get_str("LocalBindAddress") or "127.0.0.1",
                   destination_namespace=o.get_str("DestinationNamespace"), destination_type=dtype,
                   datacenter=o.get_str("Datacenter"), config=_freeze(o.get_dict("Config")))

    def to_api(self) -> dict[str, JSON]:
        out: dict[str, JSON] = {"DestinationType": self.destination_type, "DestinationName": self.destination_name,
                                "LocalBindAddress": self.local_bind_address, "LocalBindPort": self.local_bind_port}
        if self.destination_namespace:
            out["DestinationNamespace"] = self.destination_namespace
        if self.datacenter:
            out["Datacenter"] = self.datacenter
        if self.config:
            out["Config"] = self.config_dict()
        return out


@dataclass(frozen=True)
class ProxyConfig:
    """A registration's `Proxy` block (connect-proxy services and `Connect.SidecarService`)."""

    destination_service_name: str = ""
    destination_service_id: str = ""
    local_service_address: str = ""
    local_service_port: int = 0
    upstreams: tuple[Upstream, ...] = ()
    config: tuple[tuple[str, JSON], ...] = ()
    mode: str = ""

    def config_dict(self) -> dict[str, JSON]:
        out = _thaw(self.config) if self.config else {}
        return out if isinstance(out, dict) else {}

    @classmethod
    def from_api(cls, obj: JSON, path: str = "Proxy") -> ProxyConfig:
        o = _Obj(obj, path)
        ups = tuple(Upstream.from_api(item, p) for p, item in _list_of(o, "Upstreams"))
        return cls(destination_service_name=o.get_str("DestinationServiceName"),
                   destination_service_id=o.get_str("DestinationServiceID"),
                   local_service_address=o.get_str("LocalServiceAddress"),
                   local_service_port=o.port("LocalServicePort"), upstreams=ups,
                   config=_freeze(o.get_dict("Config")), mode=o.get_str("Mode"))

    def to_api(self) -> dict[str, JSON]:
        out: dict[str, JSON] = {}
        if self.destination_service_name:
            out["DestinationServiceName"] = self.destination_service_name
        if self.destination_service_id:
            out["DestinationServiceID"] = self.destination_service_id
        if self.local_service_address:
            out["LocalServiceAddress"] = self.local_service_address
        if self.local_service_port:
            out["LocalServicePort"] = self.local_service_port
        if self.upstreams:
            out["Upstreams"] = [u.to_api() for u in self.upstreams]
        if self.config:
            out["Config"] = self.config_dict()
        if self.mode:
            out["Mode"] = self.mode
        return out


@dataclass(frozen=True)
class CheckDefinition:
    """A check as `/v1/agent/check/register` and a registration's `Checks` take it.

    Exactly one of ttl, http, tcp, grpc, alias_service is normally set."""

    name: str
    check_id: str = ""
    ttl: str = ""
    http: str = ""
    method: str = ""
    tcp: str = ""
    grpc: str = ""
    grpc_use_tls: bool = False
    tls_skip_verify: bool = False
    alias_service: str = ""
    interval: str = ""
    timeout: str = ""
    deregister_critical_service_after: str = ""
    notes: str = ""
    status: str = ""
    service_id: str = ""

    def __post_init__(self) -> None:
        for fname in ("ttl", "interval", "timeout", "deregister_critical_service_after"):
            v = getattr(self, fname)
            if v:
                parse_duration(v, f"Check {self.name!r}.{fname}")
        if self.status and self.status not in CHECK_STATUSES:
            raise ValueError(f"Check {self.name!r}.status: expected passing, warning or critical, got {self.status!r}")
        if (self.http or self.tcp or self.grpc) and not self.interval:
            raise ValueError(f"Check {self.name!r}.interval: required for HTTP, TCP and gRPC checks")

    @classmethod
    def from_api(cls, obj: JSON, path: str = "Check") -> CheckDefinition:
        o = _Obj(obj, path)

        def dur(name: str) -> str:
            v = o.raw(name)
            if v is None or v == "":
                return ""
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return format_duration(v / 1e9)  # Consul answers durations in nanoseconds in some places
            if not isinstance(v, str):
                raise ValueError(f"{o.where(name)}: expected a duration string, got {v!r}")
            parse_duration(v, o.where(name))
            return v

        try:
            return cls(name=o.get_str("Name") or o.get_str("CheckID"), check_id=o.get_str("CheckID") or o.get_str("ID"),
                       ttl=dur("TTL"), http=o.get_str("HTTP"), method=o.get_str("Method"), tcp=o.get_str("TCP"),
                       grpc=o.get_str("GRPC"), grpc_use_tls=o.get_bool("GRPCUseTLS"),
                       tls_skip_verify=o.get_bool("TLSSkipVerify"), alias_service=o.get_str("AliasService"),
                       interval=dur("Interval"), timeout=dur("Timeout"),
                       deregister_critical_service_after=dur("DeregisterCriticalServiceAfter"),
                       notes=o.get_str("Notes"), status=o.get_str("Status"), service_id=o.get_str("ServiceID"))
        except ValueError as exc:
            if str(exc).startswith(path):
                raise
            raise ValueError(f"{path}: {exc}") from None

    def to_api(self) -> dict[str, JSON]:
        out: dict[str, JSON] = {"Name": self.name}
        pairs: list[tuple[str, JSON]] = [
            ("CheckID", self.check_id), ("TTL", self.ttl), ("HTTP", self.http), ("Method", self.method),
            ("TCP", self.tcp), ("GRPC", self.grpc), ("AliasService", self.alias_service),
            ("Interval", self.interval), ("Timeout", self.timeout),
            ("DeregisterCriticalServiceAfter", self.deregister_critical_service_after),
            ("Notes", self.notes), ("Status", self.status), ("ServiceID", self.service_id)]
        for k, v in pairs:
            if v:
                out[k] = v
        if self.grpc:
            out["GRPCUseTLS"] = self.grpc_use_tls
        if self.tls_skip_verify:
            out["TLSSkipVerify"] = True
        return out


@dataclass(frozen=True)
class ServiceRegistration:
    """A service as registered with the local agent.

    Parsed from `/v1/agent/service/:id` (name in `Service`) or from a registration/definition (name in
    `Name`); `to_api()` gives the body of `PUT /v1/agent/service/register`."""

    name: str
    id: str = ""
    kind: str = ""
    """"" for a typical service, "connect-proxy" for a sidecar."""
    address: str = ""
    port: int = 0
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()
    weights: Weights | None = None
    proxy: ProxyConfig | None = None
    sidecar_service: ServiceRegistration | None = None
    """`Connect.SidecarService` (only in registrations; the agent expands it into a second service)."""
    connect_native: bool = False
    checks: tuple[CheckDefinition, ...] = ()
    content_hash: str = ""
    datacenter: str = ""

    @property
    def service_id(self) -> str:
        return self.id or self.name

    def meta_dict(self) -> dict[str, str]:
        return dict(self.meta)

    @classmethod
    def from_api(cls, obj: JSON, path: str = "Service", *, name_required: bool = True) -> ServiceRegistration:
        """`name_required=False` for a `Connect.SidecarService` block (its name defaults to
        `<parent>-sidecar-proxy`)."""
        o = _Obj(obj, path)
        name = o.get_str("Service") or o.get_str("Name")
        kind = o.get_str("Kind")
        if not name and name_required:
            raise ValueError(f"{o.where('Name')}: required, missing or empty")
        proxy_o = o.raw("Proxy")
        proxy = ProxyConfig.from_api(proxy_o, o.where("Proxy")) if proxy_o is not None else None
        if kind == "connect-proxy" and (proxy is None or not proxy.destination_service_name):
            raise ValueError(f"{o.where('Proxy.DestinationServiceName')}: required for a connect-proxy service")
        sidecar: ServiceRegistration | None = None
        native = False
        conn = o.obj("Connect")
        if conn is not None:
            native = conn.get_bool("Native")
            sc = conn.raw("SidecarService")
            if sc is not None:
                sidecar = ServiceRegistration.from_api(sc, conn.where("SidecarService"), name_required=False)
        checks = [CheckDefinition.from_api(item, p) for p, item in _list_of(o, "Checks")]
        if o.has("Check"):
            checks.insert(0, CheckDefinition.from_api(o.raw("Check"), o.where("Check")))
        weights = Weights.from_api(o.raw("Weights"), o.where("Weights")) if o.has("Weights") else None
        return cls(name=name, id=o.get_str("ID"), kind=kind, address=o.get_str("Address"), port=o.port("Port"),
                   tags=o.str_list("Tags"), meta=o.str_map("Meta"), weights=weights, proxy=proxy,
                   sidecar_service=sidecar, connect_native=native, checks=tuple(checks),
                   content_hash=o.get_str("ContentHash"), datacenter=o.get_str("Datacenter"))

    def to_api(self) -> dict[str, JSON]:
        out: dict[str, JSON] = {}
        if self.name:
            out["Name"] = self.name
        if self.id:
            out["ID"] = self.id
        if self.kind:
            out["Kind"] = self.kind
        if self.address:
            out["Address"] = self.address
        if self.port:
            out["Port"] = self.port
        if self.tags:
            out["Tags"] = list(self.tags)
        if self.meta:
            out["Meta"] = dict(self.meta)
        if self.weights is not None:
            out["Weights"] = self.weights.to_api()
        if self.proxy is not None:
            out["Proxy"] = self.proxy.to_api()
        connect: dict[str, JSON] = {}
        if self.connect_native:
            connect["Native"] = True
        if self.sidecar_service is not None:
            connect["SidecarService"] = self.sidecar_service.to_api()
        if connect:
            out["Connect"] = connect
        if self.checks:
            out["Checks"] = [c.to_api() for c in self.checks]
        return out


@dataclass(frozen=True)
class ServiceInstance:
    """One healthy-or-not instance from `/v1/health/service/:name` or `/v1/health/connect/:name`.

    `address` is the service address, falling back to the node's address when the service has none."""

    node: str
    node_address: str
    service_id: str
    service: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()
    kind: str = ""
    proxy: ProxyConfig | None = None
    checks: tuple[HealthCheck, ...] = ()
    weights: Weights = field(default_factory=Weights)
    datacenter: str = ""
    connect_native: bool = False

    @property
    def status(self) -> str:
        """Aggregated status of all the entry's checks (node checks included)."""
        return aggregate_status([c.status for c in self.checks])

    @property
    def destination(self) -> str:
        """The service this instance fronts: Proxy.DestinationServiceName for a sidecar, else itself."""
        if self.proxy is not None and self.proxy.destination_service_name:
            return self.proxy.destination_service_name
        return self.service

    def meta_dict(self) -> dict[str, str]:
        return dict(self.meta)

    @classmethod
    def from_api(cls, obj: JSON, path: str = "entry") -> ServiceInstance:
        o = _Obj(obj, path)
        node = o.obj("Node")
        svc = o.obj("Service")
        if node is None:
            raise ValueError(f"{o.where('Node')}: required, missing")
        if svc is None:
            raise ValueError(f"{o.where('Service')}: required, missing")
        node_address = node.get_str("Address")
        address = svc.get_str("Address") or node_address
        proxy_raw = svc.raw("Proxy")
        proxy = ProxyConfig.from_api(proxy_raw, svc.where("Proxy")) if proxy_raw is not None else None
        if proxy is not None and not proxy.destination_service_name and not proxy.upstreams:
            proxy = None if svc.get_str("Kind") == "" else proxy
        conn = svc.obj("Connect")
        checks = tuple(HealthCheck.from_api(item, p) for p, item in _list_of(o, "Checks"))
        return cls(node=node.req_str("Node"), node_address=node_address, service_id=svc.req_str("ID"),
                   service=svc.req_str("Service"), address=address, port=svc.port("Port"),
                   tags=svc.str_list("Tags"), meta=svc.str_map("Meta"), kind=svc.get_str("Kind"), proxy=proxy,
                   checks=checks, weights=Weights.from_api(svc.raw("Weights"), svc.where("Weights")),
                   datacenter=node.get_str("Datacenter"), connect_native=bool(conn and conn.get_bool("Native")))


def parse_instances(body: JSON, path: str = "entries") -> tuple[ServiceInstance, ...]:
    """A `/v1/health/service` or `/v1/health/connect` answer (a list, or null for none)."""
    if body is None:
        return ()
    if not isinstance(body, list):
        raise ValueError(f"{path}: expected a list, got {type(body).__name__}")
    return tuple(ServiceInstance.from_api(item, f"{path}[{i}]") for i, item in enumerate(body))


# ---------------------------------------------------------------------------------------------------------------
# KV, sessions, txn


@dataclass(frozen=True)
class KVEntry:
    key: str
    value: bytes | None
    flags: int = 0
    create_index: int = 0
    modify_index: int = 0
    lock_index: int = 0
    session: str = ""

    def text(self, encoding: str = "utf-8") -> str:
        """The value decoded as text ("" for a null value)."""
        return (self.value or b"").decode(encoding)

    @classmethod
    def from_api(cls, obj: JSON, path: str = "KV") -> KVEntry:
        o = _Obj(obj, path)
        raw = o.raw("Value")
        value: bytes | None
        if raw is None:
            value = None
        elif isinstance(raw, str):
            try:
                value = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"{o.where('Value')}: not valid base64") from None
        else:
            raise ValueError(f"{o.where('Value')}: expected base64 text or null, got {type(raw).__name__}")
        flags = o.get_int("Flags")
        if flags < 0:
            raise ValueError(f"{o.where('Flags')}: must not be negative, got {flags}")
        return cls(key=o.req_str("Key"), value=value, flags=flags, create_index=o.get_int("CreateIndex"),
                   modify_index=o.get_int("ModifyIndex"), lock_index=o.get_int("LockIndex"),
                   session=o.get_str("Session"))


def parse_kv_entries(body: JSON, path: str = "KV") -> tuple[KVEntry, ...]:
    if body is None:
        return ()
    if not isinstance(body, list):
        raise ValueError(f"{path}: expected a list, got {type(body).__name__}")
    return tuple(KVEntry.from_api(item, f"{path}[{i}]") for i, item in enumerate(body))


SESSION_BEHAVIORS = ("release", "delete")


@dataclass(frozen=True)
class Session:
    id: str
    name: str = ""
    node: str = ""
    behavior: str = "release"
    ttl: float = 0.0
    """Seconds (0: no TTL)."""
    lock_delay: float = 0.0
    """Seconds."""
    node_checks: tuple[str, ...] = ()
    service_checks: tuple[str, ...] = ()
    create_index: int = 0
    modify_index: int = 0

    @classmethod
    def from_api(cls, obj: JSON, path: str = "Session") -> Session:
        o = _Obj(obj, path)
        behavior = o.get_str("Behavior") or "release"
        if behavior not in SESSION_BEHAVIORS:
            raise ValueError(f"{o.where('Behavior')}: expected 'release' or 'delete', got {behavior!r}")
        ttl_raw = o.raw("TTL")
        ttl = 0.0 if ttl_raw in (None, "") else parse_duration(ttl_raw, o.where("TTL"))
        ld = o.raw("LockDelay")
        if ld is None or ld == "":
            lock_delay = 0.0
        elif isinstance(ld, (int, float)) and not isinstance(ld, bool):
            lock_delay = float(ld) / 1e9  # Consul answers LockDelay in nanoseconds
        else:
            lock_delay = parse_duration(ld, o.where("LockDelay"))
        service_checks: list[str] = []
        for p, item in _list_of(o, "ServiceChecks"):
            if isinstance(item, str):
                service_checks.append(item)
            else:
                service_checks.append(_Obj(item, p).req_str("ID"))
        return cls(id=o.req_str("ID"), name=o.get_str("Name"), node=o.get_str("Node"), behavior=behavior, ttl=ttl,
                   lock_delay=lock_delay, node_checks=o.str_list("NodeChecks"),
                   service_checks=tuple(service_checks), create_index=o.get_int("CreateIndex"),
                   modify_index=o.get_int("ModifyIndex"))


KV_TXN_VERBS = ("set", "cas", "lock", "unlock", "get", "get-tree", "check-index", "check-session",
                "check-not-exists", "delete", "delete-tree", "delete-cas")


@dataclass(frozen=True)
class KVTxnOp:
    """One `{"KV": {...}}` operation of `PUT /v1/txn`."""

    verb: str
    key: str
    value: bytes | None = None
    flags: int | None = None
    index: int | None = None
    session: str = ""

    def __post_init__(self) -> None:
        if self.verb not in KV_TXN_VERBS:
            raise ValueError(f"KV txn verb: expected one of {', '.join(KV_TXN_VERBS)}, got {self.verb!r}")
        if self.verb in ("cas", "check-index", "delete-cas") and self.index is None:
            raise ValueError(f"KV txn op {self.verb!r} on {self.key!r}: index is required")
        if self.verb in ("lock", "unlock", "check-session") and not self.session:
            raise ValueError(f"KV txn op {self.verb!r} on {self.key!r}: session is required")

    def to_api(self) -> dict[str, JSON]:
        kv: dict[str, JSON] = {"Verb": self.verb, "Key": self.key}
        if self.value is not None:
            kv["Value"] = base64.b64encode(self.value).decode("ascii")
        if self.flags is not None:
            kv["Flags"] = self.flags
        if self.index is not None:
            kv["Index"] = self.index
        if self.session:
            kv["Session"] = self.session
        return {"KV": kv}


@dataclass(frozen=True)
class TxnOpError:
    op_index: int
    what: str

    @classmethod
    def from_api(cls, obj: JSON, path: str = "Errors[]") -> TxnOpError:
        o = _Obj(obj, path)
        return cls(op_index=o.get_int("OpIndex"), what=o.get_str("What"))


def parse_txn_results(body: JSON) -> tuple[KVEntry | None, ...]:
    """`Results` of a successful txn: the KV entry of each KV result (None for a non-KV result)."""
    o = _Obj(body, "txn")
    out: list[KVEntry | None] = []
    for p, item in _list_of(o, "Results"):
        r = _Obj(item, p)
        kv = r.raw("KV")
        out.append(KVEntry.from_api(kv, r.where("KV")) if kv is not None else None)
    return tuple(out)


def parse_txn_errors(body: JSON) -> tuple[TxnOpError, ...]:
    o = _Obj(body, "txn")
    return tuple(TxnOpError.from_api(item, p) for p, item in _list_of(o, "Errors"))


# ---------------------------------------------------------------------------------------------------------------
# Agent and ACL


@dataclass(frozen=True)
class AgentSelf:
    datacenter: str
    node_name: str
    node_id: str = ""
    version: str = ""

    @classmethod
    def from_api(cls, obj: JSON, path: str = "self") -> AgentSelf:
        o = _Obj(obj, path)
        cfg = o.obj("Config")
        if cfg is None:
            raise ValueError(f"{o.where('Config')}: required, missing")
        return cls(datacenter=cfg.req_str("Datacenter"), node_name=cfg.req_str("NodeName"),
                   node_id=cfg.get_str("NodeID"), version=cfg.get_str("Version"))


@dataclass(frozen=True)
class AclToken:
    """`/v1/acl/token/self` (the secret is never kept)."""

    accessor_id: str
    description: str = ""
    policies: tuple[str, ...] = ()
    """Policy names."""
    service_identities: tuple[str, ...] = ()
    """Service names of the token's ServiceIdentities."""
    local: bool = False

    @classmethod
    def from_api(cls, obj: JSON, path: str = "token") -> AclToken:
        o = _Obj(obj, path)
        pols = tuple(_Obj(item, p).get_str("Name") or _Obj(item, p).get_str("ID")
                     for p, item in _list_of(o, "Policies"))
        sids = tuple(_Obj(item, p).req_str("ServiceName") for p, item in _list_of(o, "ServiceIdentities"))
        return cls(accessor_id=o.req_str("AccessorID"), description=o.get_str("Description"), policies=pols,
                   service_identities=sids, local=o.get_bool("Local"))


def parse_catalog_services(body: JSON) -> dict[str, tuple[str, ...]]:
    """`/v1/catalog/services`: {name: tags}."""
    if not isinstance(body, Mapping):
        raise ValueError(f"services: expected a JSON object, got {type(body).__name__}")
    return {str(name): _tags(tags, str(name)) for name, tags in body.items()}


def _tags(value: JSON, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ValueError(f"services.{name}: expected a list of tags, got {value!r}")
    return tuple(value)


# ---------------------------------------------------------------------------------------------------------------
# Settings from the environment, as Consul's own tools read them


@dataclass(frozen=True)
class ConsulSettings:
    """Where and how to reach Consul.

    `scheme` is "http", "https" or "unix"; for "unix", `unix_path` is the socket and host/port are unused."""

    scheme: str = "http"
    host: str = "127.0.0.1"
    port: int = 8500
    unix_path: str = ""
    token: str = field(default="", repr=False)
    token_file: str = ""
    ca_file: str = ""
    ca_path: str = ""
    client_cert: str = ""
    client_key: str = ""
    verify: bool = True
    datacenter: str = ""

    @property
    def base_url(self) -> str:
        if self.scheme == "unix":
            return "http://localhost"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ConsulSettings:
        """Read CONSUL_HTTP_ADDR (host:port, http(s)://host:port or unix:///path; default 127.0.0.1:8500),
        CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE, CONSUL_HTTP_SSL, CONSUL_HTTP_SSL_VERIFY, CONSUL_CACERT,
        CONSUL_CAPATH, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY, CONSUL_DATACENTER (unset or empty: default)."""
        ssl_raw = env.get("CONSUL_HTTP_SSL", "")
        ssl = _env_bool(ssl_raw, "CONSUL_HTTP_SSL") if ssl_raw else None
        verify_raw = env.get("CONSUL_HTTP_SSL_VERIFY", "")
        verify = _env_bool(verify_raw, "CONSUL_HTTP_SSL_VERIFY") if verify_raw else True
        scheme, host, port, path = parse_http_addr(env.get("CONSUL_HTTP_ADDR", ""), ssl=ssl)
        return cls(scheme=scheme, host=host, port=port, unix_path=path, token=env.get("CONSUL_HTTP_TOKEN", ""),
                   token_file=env.get("CONSUL_HTTP_TOKEN_FILE", ""), ca_file=env.get("CONSUL_CACERT", ""),
                   ca_path=env.get("CONSUL_CAPATH", ""), client_cert=env.get("CONSUL_CLIENT_CERT", ""),
                   client_key=env.get("CONSUL_CLIENT_KEY", ""), verify=verify,
                   datacenter=env.get("CONSUL_DATACENTER", ""))


def _env_bool(value: str, name: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "t", "true", "yes", "on"):
        return True
    if v in ("0", "f", "false", "no", "off"):
        return False
    raise ValueError(f"{name}: expected true or false, got {value!r}")


def parse_http_addr(addr: str, *, ssl: bool | None = None) -> tuple[str, str, int, str]:
    """(scheme, host, port, unix_path) from a CONSUL_HTTP_ADDR value, as Consul's CLI reads it.

    "" -> 127.0.0.1:8500; "host:port"; "http://host:port"; "https://host[:port]"; "unix:///path".
    `ssl` (CONSUL_HTTP_SSL) turns a scheme-less address into https (True) or http (False).
    Raises ValueError naming CONSUL_HTTP_ADDR on anything else."""
    text = addr.strip()
    if not text:
        return ("https" if ssl else "http", "127.0.0.1", 8500, "")
    if text.startswith("unix://"):
        path = text[len("unix://"):]
        if not path:
            raise ValueError(f"CONSUL_HTTP_ADDR: unix socket path missing in {addr!r}")
        return ("unix", "", 0, path)
    scheme = "https" if ssl else "http"
    rest = text
    if "://" in text:
        scheme, rest = text.split("://", 1)
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"CONSUL_HTTP_ADDR: unsupported scheme {scheme!r} in {addr!r} (http, https or unix)")
        if ssl is True:
            scheme = "https"
    rest = rest.rstrip("/")
    if not rest or "/" in rest:
        raise ValueError(f"CONSUL_HTTP_ADDR: expected host:port, got {addr!r}")
    default_port = 443 if scheme == "https" and "://" in text else 8500
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise ValueError(f"CONSUL_HTTP_ADDR: unterminated IPv6 address in {addr!r}")
        host, tail = rest[1:end], rest[end + 1:]
        port_s = tail[1:] if tail.startswith(":") else ("" if not tail else "x")
    elif rest.count(":") == 1:
        host, port_s = rest.split(":")
    elif ":" in rest:
        host, port_s = rest, ""  # bare IPv6
    else:
        host, port_s = rest, ""
    if not host:
        raise ValueError(f"CONSUL_HTTP_ADDR: host missing in {addr!r}")
    if port_s == "":
        port = default_port
    else:
        if not port_s.isdigit() or not 0 < int(port_s) <= 65535:
            raise ValueError(f"CONSUL_HTTP_ADDR: invalid port {port_s!r} in {addr!r}")
        port = int(port_s)
    return (scheme, host, port, "")
