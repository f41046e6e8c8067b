"""Consul's service and check model for the dev agent (pure: no I/O, no timers).

Decodes ``/v1/agent/service/register``, ``/v1/agent/check/register`` and ``/v1/catalog/register``
bodies (CamelCase or snake_case keys, durations as Go strings or nanoseconds), validates them with
Consul's words, expands ``Connect.SidecarService`` as Consul's agent/sidecar_service.go does, and
renders the stored rows in the shapes Consul's endpoints answer with (AgentService, NodeService,
ServiceNode, HealthCheck).

Stored rows
    ``services`` ``"<node>/<ID>"``: NodeService fields (``Kind``, ``ID``, ``Service``, ``Tags``,
    ``Address``, ``TaggedAddresses``, ``Meta``, ``Port``, ``SocketPath``, ``Weights``,
    ``EnableTagOverride``, ``Proxy``, ``Connect``, ``CreateIndex``, ``ModifyIndex``) plus ``Node``
    and private keys starting with ``_`` (``_Sidecar``: registered through SidecarService) that are
    never served.
    ``checks`` ``"<node>/<CheckID>"``: HealthCheck fields plus ``_Type`` (the runnable check type:
    durations in nanoseconds) and ``_CriticalSince`` style private keys owned by the check runners.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from devagent.codec import (
    SECOND,
    DecodeError,
    decode_struct,
    duration_value,
    expect_bool,
    expect_int,
    expect_str,
    expect_str_list,
    expect_str_map,
    format_duration,
)
from devagent.state import Row

PASSING, WARNING, CRITICAL, MAINT = "passing", "warning", "critical", "maintenance"
STATUSES = (PASSING, WARNING, CRITICAL)
CONNECT_PROXY = "connect-proxy"
KINDS = ("", CONNECT_PROXY, "mesh-gateway", "terminating-gateway", "ingress-gateway", "api-gateway")
SIDECAR_SUFFIX = "-sidecar-proxy"
CONSUL_SERVICE_ID = "consul"  # the service every Consul server node carries in the catalog
SIDECAR_MIN_PORT = 21000  # Consul's ports.sidecar_min_port
SIDECAR_MAX_PORT = 21255  # and sidecar_max_port
SIDECAR_CHECK_INTERVAL = 10 * SECOND
DEFAULT_HTTP_TIMEOUT = 10 * SECOND  # Consul's default check timeout
SERVICE_MAINT_PREFIX = "_service_maintenance:"
NODE_MAINT_CHECK = "_node_maintenance"
DEFAULT_SERVICE_MAINT_REASON = ("Maintenance mode is enabled for this service, but no reason was provided. "
                                "This is a default message.")
DEFAULT_NODE_MAINT_REASON = ("Maintenance mode is enabled for this node, but no reason was provided. "
                             "This is a default message.")
META_MAX_PAIRS = 64
META_KEY_MAX = 128
META_VALUE_MAX = 512

CHECK_TYPE_SPEC: dict[str, Any] = {
    "CheckID": None, "ID": None, "Name": None, "Status": None, "Notes": None, "ScriptArgs": None,
    "Args": None, "HTTP": None, "Header": None, "Method": None, "Body": None, "DisableRedirects": None,
    "TCP": None, "TCPUseTLS": None, "UDP": None, "Interval": None, "AliasNode": None,
    "AliasService": None, "DockerContainerID": None, "Shell": None, "H2PING": None,
    "H2PingUseTLS": None, "GRPC": None, "GRPCUseTLS": None, "OSService": None, "TLSServerName": None,
    "TLSSkipVerify": None, "Timeout": None, "TTL": None, "SuccessBeforePassing": None,
    "FailuresBeforeWarning": None, "FailuresBeforeCritical": None, "DeregisterCriticalServiceAfter": None,
    "OutputMaxSize": None, "ServiceID": None, "Token": None, "Definition": None,
}
UPSTREAM_SPEC: dict[str, Any] = {
    "DestinationType": None, "DestinationNamespace": None, "DestinationPartition": None,
    "DestinationPeer": None, "DestinationName": None, "Datacenter": None, "LocalBindAddress": None,
    "LocalBindPort": None, "LocalBindSocketPath": None, "LocalBindSocketMode": None, "Config": None,
    "MeshGateway": None, "CentrallyConfigured": None,
}
PROXY_SPEC: dict[str, Any] = {
    "DestinationServiceName": None, "DestinationServiceID": None, "LocalServiceAddress": None,
    "LocalServicePort": None, "LocalServiceSocketPath": None, "Mode": None, "Config": None,
    "Upstreams": [UPSTREAM_SPEC], "MeshGateway": None, "Expose": None, "TransparentProxy": None,
    "AccessLogs": None, "EnvoyExtensions": None,
}
SERVICE_SPEC_BASE: dict[str, Any] = {
    "Kind": None, "ID": None, "Name": None, "Service": None, "Tags": None, "Address": None,
    "TaggedAddresses": None, "Meta": None, "Port": None, "SocketPath": None,
    "Check": CHECK_TYPE_SPEC, "Checks": [CHECK_TYPE_SPEC], "Weights": None, "Token": None,
    "EnableTagOverride": None, "Proxy": PROXY_SPEC, "Locality": None, "Namespace": None, "Partition": None,
}
SIDECAR_SPEC: dict[str, Any] = {**SERVICE_SPEC_BASE, "Connect": {"Native": None, "SidecarService": None}}
SERVICE_SPEC: dict[str, Any] = {**SERVICE_SPEC_BASE,
                                "Connect": {"Native": None, "SidecarService": SIDECAR_SPEC}}


class ServiceError(ValueError):
    """A registration Consul refuses with 400; the message is Consul's wording."""


class NoSidecarPort(ServiceError):
    """No free sidecar port (Consul's agent answers this one with 500)."""


# ----- durations and small helpers -----
def _dur(value: Any, what: str) -> int:
    if value is None or value == "":
        return 0
    return duration_value(value, what=what)


def _multierror(errors: list[str]) -> str:
    """hashicorp/go-multierror's text."""
    if len(errors) == 1:
        return f"1 error occurred:\n\t* {errors[0]}\n\n"
    points = "\n\t* ".join(errors)
    return f"{len(errors)} errors occurred:\n\t* {points}\n\n"


def public(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row without the private ``_`` keys."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


def is_any_address(addr: str) -> bool:
    """Consul's ipaddr.IsAny: 0.0.0.0, ::, [::]."""
    addr = addr.strip("[]")
    try:
        return ipaddress.ip_address(addr).is_unspecified
    except ValueError:
        return False


def format_addr_port(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


# ----- check types -----
def decode_check_type(raw: Any, what: str = "Check") -> dict[str, Any]:
    """A CheckType (or CheckDefinition) body -> canonical dict, durations in ns. Raises DecodeError."""
    d = decode_struct(raw, CHECK_TYPE_SPEC, what=what)
    header = d.get("Header")
    if header is not None:
        if not isinstance(header, Mapping) or not all(
                isinstance(v, list) and all(isinstance(x, str) for x in v) for v in header.values()):
            raise DecodeError(f"{what}.Header: expected an object of string lists")
    args = d.get("ScriptArgs") if d.get("ScriptArgs") is not None else d.get("Args")
    ct: dict[str, Any] = {
        "CheckID": expect_str(d.get("CheckID") if d.get("CheckID") is not None else d.get("ID"), f"{what}.CheckID"),
        "Name": expect_str(d.get("Name"), f"{what}.Name"),
        "Status": expect_str(d.get("Status"), f"{what}.Status"),
        "Notes": expect_str(d.get("Notes"), f"{what}.Notes"),
        "ServiceID": expect_str(d.get("ServiceID"), f"{what}.ServiceID"),
        "ScriptArgs": expect_str_list(args, f"{what}.ScriptArgs"),
        "HTTP": expect_str(d.get("HTTP"), f"{what}.HTTP"),
        "Header": dict(header) if header else {},
        "Method": expect_str(d.get("Method"), f"{what}.Method"),
        "Body": expect_str(d.get("Body"), f"{what}.Body"),
        "DisableRedirects": expect_bool(d.get("DisableRedirects"), f"{what}.DisableRedirects"),
        "TCP": expect_str(d.get("TCP"), f"{what}.TCP"),
        "TCPUseTLS": expect_bool(d.get("TCPUseTLS"), f"{what}.TCPUseTLS"),
        "UDP": expect_str(d.get("UDP"), f"{what}.UDP"),
        "AliasNode": expect_str(d.get("AliasNode"), f"{what}.AliasNode"),
        "AliasService": expect_str(d.get("AliasService"), f"{what}.AliasService"),
        "DockerContainerID": expect_str(d.get("DockerContainerID"), f"{what}.DockerContainerID"),
        "H2PING": expect_str(d.get("H2PING"), f"{what}.H2PING"),
        "GRPC": expect_str(d.get("GRPC"), f"{what}.GRPC"),
        "GRPCUseTLS": expect_bool(d.get("GRPCUseTLS"), f"{what}.GRPCUseTLS"),
        "OSService": expect_str(d.get("OSService"), f"{what}.OSService"),
        "TLSServerName": expect_str(d.get("TLSServerName"), f"{what}.TLSServerName"),
        "TLSSkipVerify": expect_bool(d.get("TLSSkipVerify"), f"{what}.TLSSkipVerify"),
        "Interval": _dur(d.get("Interval"), f"{what}.Interval"),
        "Timeout": _dur(d.get("Timeout"), f"{what}.Timeout"),
        "TTL": _dur(d.get("TTL"), f"{what}.TTL"),
        "DeregisterCriticalServiceAfter": _dur(d.get("DeregisterCriticalServiceAfter"),
                                               f"{what}.DeregisterCriticalServiceAfter"),
        "SuccessBeforePassing": expect_int(d.get("SuccessBeforePassing"), f"{what}.SuccessBeforePassing"),
        "FailuresBeforeWarning": expect_int(d.get("FailuresBeforeWarning"), f"{what}.FailuresBeforeWarning"),
        "FailuresBeforeCritical": expect_int(d.get("FailuresBeforeCritical"), f"{what}.FailuresBeforeCritical"),
        "OutputMaxSize": expect_int(d.get("OutputMaxSize"), f"{what}.OutputMaxSize"),
    }
    return ct


def check_type_empty(ct: Mapping[str, Any]) -> bool:
    """Consul's CheckType.Empty(): nothing but zero values."""
    return not any(v for v in ct.values())


def check_kind(ct: Mapping[str, Any]) -> str:
    """Consul's CheckType.Type()."""
    if ct.get("ScriptArgs") and ct.get("DockerContainerID"):
        return "docker"
    if ct.get("ScriptArgs"):
        return "script"
    for field, name in (("HTTP", "http"), ("TCP", "tcp"), ("UDP", "udp"), ("GRPC", "grpc"),
                        ("H2PING", "h2ping"), ("OSService", "os_service")):
        if ct.get(field):
            return name
    if ct.get("AliasService") or ct.get("AliasNode"):
        return "alias"
    if ct.get("TTL"):
        return "ttl"
    return ""


def validate_check_type(ct: Mapping[str, Any]) -> None:
    """Consul's CheckType.Validate(); raises ServiceError with its words."""
    interval_check = bool(ct.get("ScriptArgs") or ct.get("HTTP") or ct.get("TCP") or ct.get("UDP")
                          or ct.get("GRPC") or ct.get("H2PING") or ct.get("OSService"))
    alias = bool(ct.get("AliasService") or ct.get("AliasNode"))
    if ct.get("Interval", 0) > 0 and ct.get("TTL", 0) > 0:
        raise ServiceError("Interval and TTL cannot both be specified")
    if interval_check and ct.get("Interval", 0) <= 0:
        raise ServiceError("Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks")
    if interval_check and alias:
        raise ServiceError("Interval cannot be set for Alias checks")
    if alias and ct.get("TTL", 0) > 0:
        raise ServiceError("TTL must be not be set for Alias checks")
    if not interval_check and not alias and ct.get("TTL", 0) <= 0:
        raise ServiceError("TTL must be > 0 for TTL checks")
    if ct.get("OutputMaxSize", 0) < 0:
        raise ServiceError("MaxOutputMaxSize must be positive")


SCRIPTS_DISABLED_REMOTE = ("Scripts are disabled on this agent from remote calls; to enable, configure "
                           "'enable_script_checks' to true")


def validate_status(status: str) -> None:
    if status and status not in STATUSES:
        raise ServiceError("Status for checks must 'passing', 'warning', 'critical'")


def check_definition(ct: Mapping[str, Any]) -> dict[str, Any]:
    """HealthCheck.Definition as Consul serves it (omitempty, durations as Go strings)."""
    out: dict[str, Any] = {}
    for field in ("HTTP", "TLSServerName", "TLSSkipVerify", "Header", "Method", "Body", "DisableRedirects",
                  "TCP", "TCPUseTLS", "UDP", "H2PING", "OSService", "GRPC", "GRPCUseTLS", "AliasNode",
                  "AliasService", "ScriptArgs", "DockerContainerID"):
        value = ct.get(field)
        if value:
            out[field] = value
    for field in ("Interval", "Timeout", "TTL", "DeregisterCriticalServiceAfter"):
        if ct.get(field):
            out[field] = format_duration(int(ct[field]))
    if ct.get("OutputMaxSize"):
        out["OutputMaxSize"] = ct["OutputMaxSize"]
    return out


def health_check_row(node: str, check_id: str, ct: Mapping[str, Any], service: Mapping[str, Any] | None,
                     *, create_index: int, modify_index: int, status: str | None = None,
                     output: str = "") -> Row:
    """A HealthCheck row (with its private ``_Type``) for a check of ``node`` (and ``service``)."""
    kind = check_kind(ct)
    interval = ct.get("Interval", 0)
    timeout = ct.get("Timeout", 0)
    return {
        "Node": node,
        "CheckID": check_id,
        "Name": ct.get("Name") or "",
        "Status": status or ct.get("Status") or CRITICAL,
        "Notes": ct.get("Notes") or "",
        "Output": output,
        "ServiceID": service["ID"] if service else "",
        "ServiceName": service["Service"] if service else "",
        "ServiceTags": list(service.get("Tags") or []) if service else [],
        "Type": kind,
        "Interval": format_duration(interval) if interval else "",
        "Timeout": format_duration(timeout) if timeout else "",
        "ExposedPort": 0,
        "Definition": check_definition(ct),
        "CreateIndex": create_index,
        "ModifyIndex": modify_index,
        "_Type": dict(ct),
    }


def service_check_ids(service_id: str, checks: list[dict[str, Any]]) -> list[str]:
    """CheckIDs for a service's checks: given ones, else ``service:<ID>`` or ``service:<ID>:<n>``."""
    out = []
    for i, ct in enumerate(checks):
        cid = ct.get("CheckID") or ""
        if not cid:
            cid = f"service:{service_id}" if len(checks) == 1 else f"service:{service_id}:{i + 1}"
        out.append(cid)
    return out


def default_check_name(ct: Mapping[str, Any], service_name: str) -> str:
    return ct.get("Name") or f"Service '{service_name}' check"


# ----- service definitions -----
def _str_map(value: Any, what: str) -> dict[str, str]:
    return expect_str_map(value, what)


def _tagged_addresses(value: Any, what: str) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise DecodeError(f"{what}: expected an object")
    out: dict[str, dict[str, Any]] = {}
    for k, v in value.items():
        sa = decode_struct(v, {"Address": None, "Port": None}, what=f"{what}.{k}")
        out[str(k)] = {"Address": expect_str(sa.get("Address"), f"{what}.{k}.Address"),
                       "Port": expect_int(sa.get("Port"), f"{what}.{k}.Port")}
    return out


def decode_locality(value: Any, what: str = "Locality") -> dict[str, str] | None:
    """Consul's Locality ``{Region, Zone}`` (both optional strings); None when absent or empty."""
    if value is None:
        return None
    d = decode_struct(value, {"Region": None, "Zone": None}, what=what)
    out = {k: expect_str(d.get(k), f"{what}.{k}") for k in ("Region", "Zone")}
    out = {k: v for k, v in out.items() if v}  # Consul's fields are omitempty
    return out or None


def _weights(value: Any) -> dict[str, int] | None:
    if value is None:
        return None
    w = decode_struct(value, {"Passing": None, "Warning": None}, what="Weights")
    return {"Passing": expect_int(w.get("Passing"), "Weights.Passing"),
            "Warning": expect_int(w.get("Warning"), "Weights.Warning")}


def _upstreams(value: Any) -> list[dict[str, Any]]:
    out = []
    for i, u in enumerate(value or []):
        what = f"Proxy.Upstreams[{i}]"
        up: dict[str, Any] = {k: v for k, v in u.items() if v is not None and k in UPSTREAM_SPEC}
        up["DestinationType"] = expect_str(u.get("DestinationType"), f"{what}.DestinationType") or "service"
        up["DestinationName"] = expect_str(u.get("DestinationName"), f"{what}.DestinationName")
        up["LocalBindAddress"] = expect_str(u.get("LocalBindAddress"), f"{what}.LocalBindAddress") or "127.0.0.1"
        up["LocalBindPort"] = expect_int(u.get("LocalBindPort"), f"{what}.LocalBindPort")
        if "Datacenter" in up:
            up["Datacenter"] = expect_str(up["Datacenter"], f"{what}.Datacenter")
        if up.get("Config") is not None and not isinstance(up["Config"], Mapping):
            raise DecodeError(f"{what}.Config: expected an object")
        up.setdefault("MeshGateway", {})
        out.append(up)
    return out


def _proxy(value: Any) -> dict[str, Any]:
    if not value:
        return {}
    p: dict[str, Any] = {k: v for k, v in value.items() if v is not None and k in PROXY_SPEC}
    for field in ("DestinationServiceName", "DestinationServiceID", "LocalServiceAddress",
                  "LocalServiceSocketPath", "Mode"):
        if field in p:
            p[field] = expect_str(p[field], f"Proxy.{field}")
    if "LocalServicePort" in p:
        p["LocalServicePort"] = expect_int(p["LocalServicePort"], "Proxy.LocalServicePort")
    if p.get("Config") is not None and not isinstance(p["Config"], Mapping):
        raise DecodeError("Proxy.Config: expected an object")
    if "Upstreams" in p:
        if not isinstance(p["Upstreams"], list):
            raise DecodeError("Proxy.Upstreams: expected a list")
        p["Upstreams"] = _upstreams(p["Upstreams"])
    return p


def decode_service(raw: Any, *, what: str = "body", spec: Mapping[str, Any] = SERVICE_SPEC) -> dict[str, Any]:
    """A ServiceDefinition body -> canonical dict with ``NodeService`` fields and ``CheckTypes``.

    Raises DecodeError for wrong types (answered as 400 "Request decode failed: ...")."""
    d = decode_struct(raw, spec, what=what)
    name = d.get("Name") if d.get("Name") is not None else d.get("Service")
    svc: dict[str, Any] = {
        "Kind": expect_str(d.get("Kind"), "Kind"),
        "ID": expect_str(d.get("ID"), "ID"),
        "Service": expect_str(name, "Name"),
        "Tags": expect_str_list(d.get("Tags"), "Tags"),
        "Address": expect_str(d.get("Address"), "Address"),
        "TaggedAddresses": _tagged_addresses(d.get("TaggedAddresses"), "TaggedAddresses"),
        "Meta": _str_map(d.get("Meta"), "Meta"),
        "Port": expect_int(d.get("Port"), "Port"),
        "SocketPath": expect_str(d.get("SocketPath"), "SocketPath"),
        "Weights": _weights(d.get("Weights")),
        "EnableTagOverride": expect_bool(d.get("EnableTagOverride"), "EnableTagOverride"),
        "Proxy": _proxy(d.get("Proxy")),
        "Connect": {},
    }
    locality = decode_locality(d.get("Locality"))
    if locality is not None:
        svc["Locality"] = locality
    connect = d.get("Connect") or {}
    if not isinstance(connect, Mapping):
        raise DecodeError("Connect: expected an object")
    if expect_bool(connect.get("Native"), "Connect.Native"):
        svc["Connect"] = {"Native": True}
    checks: list[dict[str, Any]] = []
    single = d.get("Check")
    if single is not None:
        ct = decode_check_type(single, "Check")
        if not check_type_empty(ct):
            checks.append(ct)
    multi = d.get("Checks")
    if multi is not None:
        if not isinstance(multi, list):
            raise DecodeError("Checks: expected a list")
        for i, c in enumerate(multi):
            checks.append(decode_check_type(c, f"Checks[{i}]"))
    sidecar = connect.get("SidecarService")
    return {"service": svc, "checks": checks,
            "sidecar": sidecar if sidecar is not None else None,
            "token": expect_str(d.get("Token"), "Token")}


def validate_weights(weights: Mapping[str, int] | None) -> None:
    if weights is None:
        return
    if weights["Passing"] < 1:
        raise ServiceError("Invalid Weights: Passing must be greater than 0")
    if weights["Warning"] < 0:
        raise ServiceError("Invalid Weights: Warning must be greater or equal than 0")


def validate_meta(meta: Mapping[str, str]) -> None:
    """Consul's ValidateServiceMetadata."""
    if len(meta) > META_MAX_PAIRS:
        raise ServiceError(f"Invalid Service Meta: Node metadata cannot contain more than {META_MAX_PAIRS} "
                           "key/value pairs")
    for k, v in meta.items():
        if not k:
            raise ServiceError("Invalid Service Meta: Couldn't load metadata pair ('', ''): Key cannot be blank")
        if len(k) > META_KEY_MAX:
            raise ServiceError(f"Invalid Service Meta: Key is too long (limit: {META_KEY_MAX} characters)")
        if k.startswith("consul-") and k not in ("consul-virtual", "consul-version"):
            raise ServiceError("Invalid Service Meta: Key prefix 'consul-' is reserved for internal use")
        if len(v) > META_VALUE_MAX:
            raise ServiceError(f"Invalid Service Meta: Value is too long (limit: {META_VALUE_MAX} characters)")


def validate_service(svc: Mapping[str, Any], *, for_agent: bool = True) -> None:
    """Consul's NodeService.Validate (and ValidateForAgent): 400 "Validation failed: ..." on error."""
    errors: list[str] = []
    kind = svc.get("Kind", "")
    proxy = svc.get("Proxy") or {}
    if kind not in KINDS:
        errors.append(f"Invalid service kind: {kind!r}")
    if kind == CONNECT_PROXY:
        dest = str(proxy.get("DestinationServiceName", "")).strip()
        if not dest:
            errors.append("Proxy.DestinationServiceName must be non-empty for Connect proxy services")
        elif dest == "*":
            errors.append("Proxy.DestinationServiceName must not be a wildcard for Connect proxy services")
        if svc.get("Port", 0) == 0 and not svc.get("SocketPath"):
            errors.append("Port or SocketPath must be set for a Connect proxy")
        if (svc.get("Connect") or {}).get("Native"):
            errors.append("A Proxy cannot also be Connect Native, only typical services")
        seen: set[str] = set()
        for u in proxy.get("Upstreams") or []:
            if for_agent and not u.get("DestinationName"):
                errors.append("upstream destination name cannot be empty")
            if for_agent and not u.get("LocalBindPort") and not u.get("LocalBindSocketPath") \
                    and not u.get("CentrallyConfigured"):
                errors.append(f"upstream local bind port cannot be zero for {u.get('DestinationName', '')}")
            bind = u.get("LocalBindSocketPath") or format_addr_port(u.get("LocalBindAddress") or "127.0.0.1",
                                                                    int(u.get("LocalBindPort") or 0))
            if u.get("LocalBindPort") or u.get("LocalBindSocketPath"):
                if bind in seen:
                    errors.append(f"upstreams cannot contain duplicates by local bind address and port or "
                                  f"unix path: {bind}")
                seen.add(bind)
    elif proxy.get("DestinationServiceName") or proxy.get("Upstreams"):
        errors.append("Proxy configuration is only valid for Connect proxies and gateways")
    if svc.get("Port") and svc.get("SocketPath"):
        errors.append("Only one of Port or SocketPath can be set")
    if errors:
        raise ServiceError("Validation failed: " + _multierror(errors))


def normalize_service(svc: dict[str, Any]) -> dict[str, Any]:
    """Defaults Consul applies when it stores a NodeService (ID defaults to the name)."""
    out = dict(svc)
    if not out.get("ID"):
        out["ID"] = out["Service"]
    if out.get("Weights") is None:
        out["Weights"] = {"Passing": 1, "Warning": 1}
    return out


def default_tagged_addresses(svc: dict[str, Any]) -> dict[str, Any]:
    """The agent's defaults: ``lan_ipv4``/``wan_ipv4`` (or ``_ipv6``) from an IP service Address."""
    addr = svc.get("Address") or ""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return svc
    tagged = dict(svc.get("TaggedAddresses") or {})
    fam = "ipv4" if ip.version == 4 else "ipv6"
    for kind in ("lan", "wan"):
        tagged.setdefault(f"{kind}_{fam}", {"Address": addr, "Port": svc.get("Port", 0)})
    return {**svc, "TaggedAddresses": tagged}


def expand_sidecar(parent: Mapping[str, Any], sidecar_raw: Any, used_ports: Mapping[str, int],
                   *, min_port: int = SIDECAR_MIN_PORT, max_port: int = SIDECAR_MAX_PORT
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Consul's sidecarServiceFromNodeService: the ``<ID>-sidecar-proxy`` registration and its checks.

    ``parent`` is the normalized parent service; ``used_ports`` maps service IDs already registered
    on this agent to their ports (a re-registration keeps its auto-assigned port). Raises
    ServiceError / DecodeError."""
    if not isinstance(sidecar_raw, Mapping):
        raise DecodeError("Connect.SidecarService: expected an object")
    dec = decode_service(sidecar_raw, what="Connect.SidecarService", spec=SIDECAR_SPEC)
    if "Connect" in {k for k in sidecar_raw} and isinstance(sidecar_raw.get("Connect"), Mapping) and \
            sidecar_raw["Connect"].get("SidecarService") is not None:
        raise ServiceError("Invalid SidecarService: SidecarService cannot have a nested SidecarService")
    sc = dict(dec["service"])
    sc["ID"] = parent["ID"] + SIDECAR_SUFFIX  # always derived from the parent (Consul relies on it)
    if sc.get("Meta"):
        validate_meta(sc["Meta"])
    if not sc.get("Meta") and parent.get("Meta"):
        sc["Meta"] = dict(parent["Meta"])
    if not sc.get("Tags") and parent.get("Tags"):
        sc["Tags"] = list(parent["Tags"])
    if not sc.get("Kind"):
        sc["Kind"] = CONNECT_PROXY
    if not sc.get("Service"):
        sc["Service"] = parent["Service"] + SIDECAR_SUFFIX
    if not sc.get("Address"):
        sc["Address"] = parent.get("Address", "")
    proxy = dict(sc.get("Proxy") or {})
    proxy["DestinationServiceName"] = proxy.get("DestinationServiceName") or parent["Service"]
    proxy["DestinationServiceID"] = proxy.get("DestinationServiceID") or parent["ID"]
    if not proxy.get("LocalServiceSocketPath") and (not proxy.get("LocalServiceAddress")
                                                   or int(proxy.get("LocalServicePort") or 0) < 1):
        if parent.get("SocketPath"):
            proxy["LocalServiceSocketPath"] = parent["SocketPath"]
        else:
            proxy["LocalServiceAddress"] = proxy.get("LocalServiceAddress") or "127.0.0.1"
            if int(proxy.get("LocalServicePort") or 0) < 1:
                proxy["LocalServicePort"] = parent.get("Port", 0)
    sc["Proxy"] = proxy
    if sc.get("Port", 0) < 1 and min_port > 0 and max_port >= min_port:
        used: set[int] = set()
        for sid, port in used_ports.items():
            if min_port <= port <= max_port:
                if sid == sc["ID"]:
                    sc["Port"] = port
                    break
                used.add(port)
        if sc.get("Port", 0) < 1:
            for p in range(min_port, max_port + 1):
                if p not in used:
                    sc["Port"] = p
                    break
    if sc.get("Port", 0) < 1:
        raise NoSidecarPort(f"no port provided for sidecar_service and none left in the configured range "
                            f"[{min_port}, {max_port}]")
    checks = dec["checks"]
    for ct in checks:
        validate_check_type(ct)
    if not checks:
        addr = sc.get("Address") or proxy.get("LocalServiceAddress") or "127.0.0.1"
        checks = [
            {**decode_check_type({}), "Name": "Connect Sidecar Listening",
             "TCP": format_addr_port(addr, sc["Port"]), "Interval": SIDECAR_CHECK_INTERVAL},
            {**decode_check_type({}), "Name": f"Connect Sidecar Aliasing {parent['ID']}",
             "AliasService": parent["ID"]},
        ]
    return normalize_service(sc), checks


# ----- renderings -----
def _proxy_out(proxy: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(proxy)
    out.setdefault("MeshGateway", {})
    out.setdefault("Expose", {})
    return out


def agent_service(row: Mapping[str, Any], datacenter: str) -> dict[str, Any]:
    """Consul's api.AgentService (buildAgentService)."""
    weights = row.get("Weights") or {"Passing": 1, "Warning": 1}
    out: dict[str, Any] = {}
    if row.get("Kind"):
        out["Kind"] = row["Kind"]
    out.update({
        "ID": row["ID"],
        "Service": row["Service"],
        "Tags": list(row.get("Tags") or []),
        "Meta": dict(row.get("Meta") or {}),
        "Port": row.get("Port", 0),
        "Address": row.get("Address", ""),
    })
    if row.get("SocketPath"):
        out["SocketPath"] = row["SocketPath"]
    if row.get("TaggedAddresses"):
        out["TaggedAddresses"] = row["TaggedAddresses"]
    out["Weights"] = {"Passing": weights.get("Passing", 1), "Warning": weights.get("Warning", 1)}
    out["EnableTagOverride"] = bool(row.get("EnableTagOverride"))
    if row.get("Kind"):
        out["Proxy"] = _proxy_out(row.get("Proxy") or {})
    if row.get("Connect"):
        out["Connect"] = dict(row["Connect"])
    out["Datacenter"] = datacenter
    if row.get("Locality"):
        out["Locality"] = dict(row["Locality"])
    return out


def node_service(row: Mapping[str, Any]) -> dict[str, Any]:
    """Consul's structs.NodeService JSON (health endpoints' ``Service``)."""
    out: dict[str, Any] = {}
    if row.get("Kind"):
        out["Kind"] = row["Kind"]
    out.update({
        "ID": row["ID"],
        "Service": row["Service"],
        "Tags": list(row.get("Tags") or []),
        "Address": row.get("Address", ""),
    })
    if row.get("TaggedAddresses"):
        out["TaggedAddresses"] = row["TaggedAddresses"]
    out["Meta"] = dict(row.get("Meta") or {})
    out["Port"] = row.get("Port", 0)
    if row.get("SocketPath"):
        out["SocketPath"] = row["SocketPath"]
    out["Weights"] = row.get("Weights") or {"Passing": 1, "Warning": 1}
    out["EnableTagOverride"] = bool(row.get("EnableTagOverride"))
    out["Proxy"] = _proxy_out(row.get("Proxy") or {})
    out["Connect"] = dict(row.get("Connect") or {})
    out["PeerName"] = ""
    if row.get("Locality"):
        out["Locality"] = dict(row["Locality"])
    out["CreateIndex"] = row.get("CreateIndex", 0)
    out["ModifyIndex"] = row.get("ModifyIndex", 0)
    return out


def service_node(row: Mapping[str, Any], node: Mapping[str, Any]) -> dict[str, Any]:
    """Consul's structs.ServiceNode JSON (``/v1/catalog/service/:name``)."""
    out: dict[str, Any] = {
        "ID": node.get("ID", ""),
        "Node": node.get("Node", ""),
        "Address": node.get("Address", ""),
        "Datacenter": node.get("Datacenter", ""),
        "TaggedAddresses": node.get("TaggedAddresses") or {},
        "NodeMeta": node.get("Meta") or {},
        "ServiceKind": row.get("Kind", ""),
        "ServiceID": row["ID"],
        "ServiceName": row["Service"],
        "ServiceTags": list(row.get("Tags") or []),
        "ServiceAddress": row.get("Address", ""),
        "ServiceWeights": row.get("Weights") or {"Passing": 1, "Warning": 1},
        "ServiceMeta": dict(row.get("Meta") or {}),
        "ServicePort": row.get("Port", 0),
        "ServiceSocketPath": row.get("SocketPath", ""),
        "ServiceEnableTagOverride": bool(row.get("EnableTagOverride")),
        "ServiceProxy": _proxy_out(row.get("Proxy") or {}),
        "ServiceConnect": dict(row.get("Connect") or {}),
        "CreateIndex": row.get("CreateIndex", 0),
        "ModifyIndex": row.get("ModifyIndex", 0),
    }
    if row.get("TaggedAddresses"):
        out["ServiceTaggedAddresses"] = row["TaggedAddresses"]
    if row.get("Locality"):
        out["ServiceLocality"] = dict(row["Locality"])
    return out


class _RenderCache:
    """Renderings of immutable store rows, keyed by the row's identity (rows are never mutated:
    a write puts a new dict). Bounded; the cached row is kept so an id is never reused wrongly.
    Renderings are shared between answers: callers must not mutate them."""

    def __init__(self, limit: int = 200_000) -> None:
        self.limit = limit
        self.entries: dict[int, tuple[Mapping[str, Any], dict[str, Any]]] = {}

    def get(self, row: Mapping[str, Any], render: Any) -> dict[str, Any]:
        hit = self.entries.get(id(row))
        if hit is not None and hit[0] is row:
            return hit[1]
        out: dict[str, Any] = render(row)
        if len(self.entries) >= self.limit:
            self.entries.clear()
        self.entries[id(row)] = (row, out)
        return out


_CHECKS = _RenderCache()
_NODES = _RenderCache()
_NODE_SERVICES = _RenderCache()


def _check_out(row: Mapping[str, Any]) -> dict[str, Any]:
    out = public(row)
    if out.get("ServiceTags") is None:
        out["ServiceTags"] = []
    return out


def node_out(node: Mapping[str, Any]) -> dict[str, Any]:
    """The node row as served (shared rendering: do not mutate)."""
    return _NODES.get(node, public)


def check_out(row: Mapping[str, Any]) -> dict[str, Any]:
    """The check row as served (shared rendering: do not mutate)."""
    return _CHECKS.get(row, _check_out)


def node_service_cached(row: Mapping[str, Any]) -> dict[str, Any]:
    """``node_service`` of a stored row (shared rendering: do not mutate)."""
    return _NODE_SERVICES.get(row, node_service)


def has_tags(row: Mapping[str, Any], tags: Iterable[str]) -> bool:
    """Every tag present (Consul's tag filter, case-sensitive)."""
    have = set(row.get("Tags") or [])
    return all(t in have for t in tags)
