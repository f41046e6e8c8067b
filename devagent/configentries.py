"""Config entries (``/v1/config``) for the kinds the dev agent keeps (pure: no I/O).

Kinds: service-defaults, proxy-defaults (Name "global"), service-resolver, service-splitter,
service-router, service-intentions (see ``intentions.py``). Bodies are decoded as Consul's
DecodeConfigEntry does (keys case-insensitive, snake_case accepted), normalized and validated for
the fields Weft relies on; ACL rules follow each kind's CanRead/CanWrite in Consul.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from devagent import acl, intentions
from devagent.codec import DecodeError, decode_struct, expect_str, expect_str_map, fold

SERVICE_DEFAULTS = "service-defaults"
PROXY_DEFAULTS = "proxy-defaults"
SERVICE_RESOLVER = "service-resolver"
SERVICE_SPLITTER = "service-splitter"
SERVICE_ROUTER = "service-router"
SERVICE_INTENTIONS = intentions.KIND
KINDS = (SERVICE_DEFAULTS, PROXY_DEFAULTS, SERVICE_RESOLVER, SERVICE_SPLITTER, SERVICE_ROUTER, SERVICE_INTENTIONS)
PROXY_DEFAULTS_NAME = "global"
PROTOCOLS = ("tcp", "http", "http2", "grpc")

# Known top-level fields per kind (canonical spelling); unknown fields are refused as Consul does.
_COMMON = {"Kind": None, "Name": None, "Meta": None, "Namespace": None, "Partition": None,
           "CreateIndex": None, "ModifyIndex": None}
SPECS: dict[str, dict[str, Any]] = {
    SERVICE_DEFAULTS: {**_COMMON, "Protocol": None, "Mode": None, "TransparentProxy": None, "MutualTLSMode": None,
                       "MeshGateway": None, "Expose": None, "ExternalSNI": None, "UpstreamConfig": None,
                       "Destination": None, "MaxInboundConnections": None, "LocalConnectTimeoutMs": None,
                       "LocalRequestTimeoutMs": None, "BalanceInboundConnections": None, "RateLimits": None,
                       "EnvoyExtensions": None},
    PROXY_DEFAULTS: {**_COMMON, "Config": None, "Mode": None, "TransparentProxy": None, "MutualTLSMode": None,
                     "MeshGateway": None, "Expose": None, "AccessLogs": None, "EnvoyExtensions": None,
                     "FailoverPolicy": None, "PrioritizeByLocality": None},
    SERVICE_RESOLVER: {**_COMMON, "DefaultSubset": None, "Subsets": None, "Redirect": None, "Failover": None,
                       "ConnectTimeout": None, "RequestTimeout": None, "LoadBalancer": None,
                       "PrioritizeByLocality": None},
    SERVICE_SPLITTER: {**_COMMON, "Splits": None},
    SERVICE_ROUTER: {**_COMMON, "Routes": None},
    SERVICE_INTENTIONS: {**intentions.ENTRY_SPEC},
}


class ConfigEntryError(ValueError):
    """An entry Consul refuses; the message is Consul's wording."""


def kind_of(raw: Any) -> str:
    if not isinstance(raw, Mapping):
        raise DecodeError("expected a JSON object")
    for key, value in raw.items():
        if isinstance(key, str) and fold(key) == "kind":
            if not isinstance(value, str):
                raise DecodeError("Kind value in payload is not a string")
            return value
    raise DecodeError("Payload does not contain a kind/Kind key at the top level")


def decode(raw: Any) -> dict[str, Any]:
    """Body -> canonical entry (without indexes); raises DecodeError / ConfigEntryError."""
    kind = kind_of(raw)
    if kind not in KINDS:
        raise DecodeError(f"invalid config entry kind: {kind}")
    spec = SPECS[kind]
    d = decode_struct(raw, spec, what=kind)
    unknown = sorted(k for k in d if k not in spec)
    if unknown:
        raise DecodeError(f"1 error(s) decoding:\n\n* invalid config key \"{unknown[0]}\"")
    d.pop("CreateIndex", None)
    d.pop("ModifyIndex", None)
    d["Kind"] = kind
    d["Name"] = expect_str(d.get("Name"), "Name")
    if d.get("Meta") is not None:
        d["Meta"] = expect_str_map(d["Meta"], "Meta")
    if kind == SERVICE_INTENTIONS:
        try:
            return intentions.normalize_entry(intentions.decode_entry(raw))
        except intentions.IntentionError as exc:
            raise ConfigEntryError(str(exc)) from None
    if kind == SERVICE_DEFAULTS and d.get("Protocol") is not None:
        d["Protocol"] = expect_str(d["Protocol"], "Protocol").lower()
    # the empty sub-objects Consul's API adds on read-back
    if kind == PROXY_DEFAULTS:
        for field in ("TransparentProxy", "MeshGateway", "Expose", "AccessLogs"):
            d.setdefault(field, {})
    elif kind == SERVICE_DEFAULTS:
        for field in ("TransparentProxy", "MeshGateway", "Expose"):
            d.setdefault(field, {})
    return d


def validate(entry: Mapping[str, Any]) -> None:
    kind, name = entry["Kind"], entry.get("Name", "")
    if kind == SERVICE_INTENTIONS:
        try:
            intentions.validate_entry(entry)
        except intentions.IntentionError as exc:
            raise ConfigEntryError(str(exc)) from None
        return
    if kind == PROXY_DEFAULTS:
        if name != PROXY_DEFAULTS_NAME:
            raise ConfigEntryError(f'invalid name ("{name}"), only "{PROXY_DEFAULTS_NAME}" is supported')
        cfg = entry.get("Config")
        if cfg is not None and not isinstance(cfg, Mapping):
            raise ConfigEntryError("Config: expected an object")
        return
    if not name:
        raise ConfigEntryError("Name is required")
    if kind == SERVICE_DEFAULTS:
        proto = entry.get("Protocol")
        if proto and proto not in PROTOCOLS:
            raise ConfigEntryError(f'invalid protocol "{proto}" (expected one of {", ".join(PROTOCOLS)})')
    elif kind == SERVICE_SPLITTER:
        splits = entry.get("Splits")
        if not isinstance(splits, list) or not splits:
            raise ConfigEntryError("no splits configured")
        total = 0.0
        for i, split in enumerate(splits):
            if not isinstance(split, Mapping):
                raise ConfigEntryError(f"Splits[{i}]: expected an object")
            weight = next((v for k, v in split.items() if fold(k) == "weight"), 0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ConfigEntryError(f"Splits[{i}].Weight: expected a number")
            total += float(weight)
        if round(total * 100) != 10000:
            raise ConfigEntryError(f"the sum of all split weights must be 100, not {total:.2f}")
    elif kind == SERVICE_ROUTER:
        routes = entry.get("Routes")
        if routes is not None and not isinstance(routes, list):
            raise ConfigEntryError("Routes: expected a list")
    elif kind == SERVICE_RESOLVER:
        for field in ("Subsets", "Redirect", "Failover", "LoadBalancer"):
            value = entry.get(field)
            if value is not None and not isinstance(value, Mapping):
                raise ConfigEntryError(f"{field}: expected an object")


def can_read(authz: acl.Authorizer, kind: str, name: str) -> bool:
    if kind == SERVICE_INTENTIONS:
        return authz.intention_read(name)
    if kind == PROXY_DEFAULTS:
        return True
    return authz.service_read(name)


def check_write(authz: acl.Authorizer, kind: str, name: str) -> None:
    if kind == SERVICE_INTENTIONS:
        authz.check("intention:write", name)
    elif kind == PROXY_DEFAULTS:
        authz.check("mesh:write")
    else:
        authz.check("service:write", name)


def check_read(authz: acl.Authorizer, kind: str, name: str) -> None:
    if kind == SERVICE_INTENTIONS:
        authz.check("intention:read", name)
    elif kind != PROXY_DEFAULTS:
        authz.check("service:read", name)


def public_entry(row: Mapping[str, Any]) -> dict[str, Any]:
    """The entry as served: private ``_`` keys removed (also inside intention sources)."""
    out = {k: v for k, v in row.items() if not k.startswith("_")}
    if isinstance(out.get("Sources"), list):
        out["Sources"] = [{k: v for k, v in s.items() if not k.startswith("_")} for s in out["Sources"]]
    return out


def key(kind: str, name: str) -> str:
    return f"{kind}/{name}"
