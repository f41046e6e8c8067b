"""Consul's Normalize and Validate for one config entry (pure: no I/O).

``normalize_and_validate(entry)`` returns the entry as Consul stores it (protocols lowercased,
durations as Go strings, split weights rounded to 0.01, gateway listener defaults) or raises:
``DecodeError`` for a value of the wrong JSON type (Consul's decoder refuses it: 400) and
``ConfigEntryError`` with Consul's words for what its Validate refuses (Consul answers those with
500, as every error its RPC layer returns). Checks that look at other entries (protocols along a
discovery chain, subsets, gateways' listener protocols) are in ``discoverychain.py``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from typing import Any

from devagent import bexpr, intentions
from devagent import configentries as ce
from devagent.codec import DecodeError, duration_value, expect_str_list, format_duration
from devagent.configentries import ConfigEntryError

HTTP_LIKE = ("http", "http2", "grpc")
WILDCARD = "*"
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE")
RETRY_CONDITIONS = ("5xx", "gateway-error", "reset", "connect-failure", "envoy-ratelimited", "retriable-4xx",
                    "refused-stream", "cancelled", "deadline-exceeded", "internal", "resource-exhausted",
                    "unavailable")
LB_POLICIES = ("", "random", "round_robin", "least_request", "ring_hash", "maglev")
HASH_FIELDS = ("header", "cookie", "query_parameter")
INGRESS_PROTOCOLS = ("tcp", "http", "http2", "grpc")
API_GATEWAY_PROTOCOLS = ("tcp", "http")
_SUBSET_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^(\*|[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)$")
META_MAX_PAIRS = 64
META_KEY_MAX = 128
META_VALUE_MAX = 512


def is_http_like(protocol: str) -> bool:
    return protocol in HTTP_LIKE


def multierror(errors: list[str]) -> str:
    """hashicorp/go-multierror's text, which several Validate functions return."""
    noun = "error" if len(errors) == 1 else "errors"
    return f"{len(errors)} {noun} occurred:\n" + "".join(f"\t* {e}\n" for e in errors) + "\n"


# ----- typed field access (a wrong JSON type is a decoding error, 400) -----
def _str(obj: Mapping[str, Any], field: str, what: str) -> str:
    value = obj.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DecodeError(f"{what}.{field}: expected a string")
    return value


def _bool(obj: Mapping[str, Any], field: str, what: str) -> bool:
    value = obj.get(field)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise DecodeError(f"{what}.{field}: expected a bool")
    return value


def _int(obj: Mapping[str, Any], field: str, what: str) -> int:
    value = obj.get(field)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise DecodeError(f"{what}.{field}: expected an integer")
    return int(value)


def _num(obj: Mapping[str, Any], field: str, what: str) -> float:
    value = obj.get(field)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DecodeError(f"{what}.{field}: expected a number")
    return float(value)


def _strs(obj: Mapping[str, Any], field: str, what: str) -> list[str]:
    return expect_str_list(obj.get(field), f"{what}.{field}")


def _list(obj: Mapping[str, Any], field: str) -> list[dict[str, Any]]:
    value = obj.get(field)
    return list(value) if isinstance(value, list) else []


def _duration(obj: dict[str, Any], field: str, what: str) -> int:
    """A duration field as nanoseconds, rewritten in place as Consul serialises it ("15s"; absent when 0)."""
    if obj.get(field) is None:
        return 0
    ns = duration_value(obj[field], what=f"{what}.{field}")
    if ns:
        obj[field] = format_duration(ns)
    else:
        obj.pop(field)
    return ns


def _meta(entry: Mapping[str, Any]) -> None:
    meta = entry.get("Meta") or {}
    if len(meta) > META_MAX_PAIRS:
        raise ConfigEntryError(f"Meta exceeds maximum element count {META_MAX_PAIRS}")
    for k, v in meta.items():
        if len(k) > META_KEY_MAX:
            raise ConfigEntryError(f"Meta key {k!r} exceeds maximum length {META_KEY_MAX}".replace("'", '"'))
        if len(v) > META_VALUE_MAX:
            raise ConfigEntryError(f"Meta value for key {k!r} exceeds maximum length {META_VALUE_MAX}"
                                   .replace("'", '"'))


def _name_required(entry: Mapping[str, Any]) -> None:
    if not entry.get("Name"):
        raise ConfigEntryError("Name is required")


# ----- per kind -----
def _service_defaults(e: dict[str, Any]) -> None:
    e["Protocol"] = _str(e, "Protocol", e["Kind"]).lower()
    if not e["Protocol"]:
        del e["Protocol"]
    _name_required(e)
    if e["Name"] == WILDCARD:
        raise ConfigEntryError("service-defaults name must be the name of a service, and not a wildcard")
    _meta(e)
    errors = []
    balance = _str(e, "BalanceInboundConnections", e["Kind"])
    if balance not in ("", "exact_balance"):
        errors.append(f"invalid value for balance_inbound_connections: {balance}")
    if e.get("UpstreamConfig") is not None and e.get("Destination") is not None:
        errors.append("UpstreamConfig and Destination are mutually exclusive for service defaults")
    _modes(e, errors)
    if errors:
        raise ConfigEntryError(multierror(errors))
    for field in ("TransparentProxy", "MeshGateway", "Expose"):  # Consul's API serialises these always
        e.setdefault(field, {})


def _modes(e: Mapping[str, Any], errors: list[str]) -> None:
    mode = _str(e, "Mode", e["Kind"])
    if mode not in ("", "direct", "transparent"):
        errors.append(f"invalid mode: {mode}")
    mtls = _str(e, "MutualTLSMode", e["Kind"])
    if mtls not in ("", "strict", "permissive"):
        errors.append(f'Invalid MutualTLSMode "{mtls}". Must be one of "", "strict", or "permissive".')


def _proxy_defaults(e: dict[str, Any]) -> None:
    if e["Name"] != ce.PROXY_DEFAULTS_NAME:
        raise ConfigEntryError(f'invalid name ("{e["Name"]}"), only "{ce.PROXY_DEFAULTS_NAME}" is supported')
    cfg = e.get("Config")
    if cfg is not None and not isinstance(cfg, Mapping):
        raise DecodeError(f"{e['Kind']}.Config: expected an object")
    _meta(e)
    errors: list[str] = []
    _modes(e, errors)
    if errors:
        raise ConfigEntryError(errors[0])
    for field in ("TransparentProxy", "MeshGateway", "Expose", "AccessLogs"):
        e.setdefault(field, {})


def _router(e: dict[str, Any]) -> None:
    kind = e["Kind"]
    for route in _list(e, "Routes"):
        http = (route.get("Match") or {}).get("HTTP")
        if isinstance(http, dict) and isinstance(http.get("Methods"), list):
            http["Methods"] = [str(m).upper() for m in http["Methods"]]
        dest = route.get("Destination")
        if isinstance(dest, dict):
            for field in ("RequestTimeout", "IdleTimeout"):
                _duration(dest, field, f"{kind}.Destination")
    _name_required(e)
    _meta(e)
    for i, route in enumerate(_list(e, "Routes")):
        what = f"Routes[{i}]"
        prefix_rewrite_ok = False
        http = (route.get("Match") or {}).get("HTTP")
        if http:
            parts = 0
            for field in ("PathExact", "PathPrefix"):
                value = _str(http, field, what)
                if value:
                    prefix_rewrite_ok = True
                    parts += 1
                    if not value.startswith("/"):
                        raise ConfigEntryError(f"Route[{i}] {field} doesn't start with '/': \"{value}\"")
            if _str(http, "PathRegex", what):
                parts += 1
            if parts > 1:
                raise ConfigEntryError(
                    f"Route[{i}] should only contain at most one of PathExact, PathPrefix, or PathRegex")
            for j, hdr in enumerate(_list(http, "Header")):
                if not _str(hdr, "Name", what):
                    raise ConfigEntryError(f"Route[{i}] Header[{j}] missing required Name field")
                n = int(_bool(hdr, "Present", what)) + sum(
                    1 for f in ("Exact", "Regex", "Prefix", "Suffix") if _str(hdr, f, what))
                if n != 1:
                    raise ConfigEntryError(f"Route[{i}] Header[{j}] should only contain one of Present, Exact, "
                                           "Prefix, Suffix, or Regex")
            for j, qp in enumerate(_list(http, "QueryParam")):
                if not _str(qp, "Name", what):
                    raise ConfigEntryError(f"Route[{i}] QueryParam[{j}] missing required Name field")
                n = int(_bool(qp, "Present", what)) + sum(1 for f in ("Exact", "Regex") if _str(qp, f, what))
                if n != 1:
                    raise ConfigEntryError(f"Route[{i}] QueryParam[{j}] should only contain one of Present, "
                                           "Exact, or Regex")
            seen: set[str] = set()
            for method in _strs(http, "Methods", what):
                if method not in HTTP_METHODS:
                    raise ConfigEntryError(f'Route[{i}] Methods contains an invalid method "{method}"')
                if method in seen:
                    raise ConfigEntryError(f'Route[{i}] Methods contains "{method}" more than once')
                seen.add(method)
        dest = route.get("Destination")
        if dest:
            if _str(dest, "PrefixRewrite", what) and not prefix_rewrite_ok:
                raise ConfigEntryError(f"Route[{i}] cannot make use of PrefixRewrite without configuring either "
                                       "PathExact or PathPrefix")
            for cond in _strs(dest, "RetryOn", what):
                if cond not in RETRY_CONDITIONS:
                    raise ConfigEntryError(f'Route[{i}] contains an invalid retry condition: "{cond}"')


def _weight(value: float) -> int:
    """Consul's scaleWeight: a weight in 0.01 % units, rounded half away from zero."""
    scaled = value * 100.0
    return int(scaled + 0.5) if scaled >= 0 else -int(-scaled + 0.5)


def _splitter(e: dict[str, Any]) -> None:
    splits = _list(e, "Splits")
    for i, split in enumerate(splits):
        w = _weight(_num(split, "Weight", f"Splits[{i}]")) / 100
        split["Weight"] = int(w) if w == int(w) else w
    _name_required(e)
    if not splits:
        raise ConfigEntryError("no splits configured")
    _meta(e)
    seen: set[tuple[str, str, str, str]] = set()
    for i, split in enumerate(splits):
        what = f"Splits[{i}]"
        k = (_str(split, "Service", what) or e["Name"], _str(split, "ServiceSubset", what),
             _str(split, "Namespace", what), _str(split, "Partition", what))
        if k in seen:
            raise ConfigEntryError(f'split destination occurs more than once: service="{k[0]}", subset="{k[1]}", '
                                   f'namespace="{k[2]}", partition="{k[3]}"')
        seen.add(k)
    total = sum(_weight(_num(s, "Weight", "Splits")) for s in splits)
    if total != 10000:
        raise ConfigEntryError(f"the sum of all split weights must be 100, not {total / 100:f}")


def _resolver(e: dict[str, Any]) -> None:
    kind = e["Kind"]
    connect_timeout = _duration(e, "ConnectTimeout", kind)
    request_timeout = _duration(e, "RequestTimeout", kind)
    _name_required(e)
    _meta(e)
    subsets: dict[str, Any] = e.get("Subsets") or {}
    _resolver_subsets(subsets)
    default_subset = _str(e, "DefaultSubset", kind)
    if default_subset and default_subset not in subsets:
        raise ConfigEntryError(f'DefaultSubset "{default_subset}" is not a valid subset')
    failover: dict[str, Any] = e.get("Failover") or {}
    redirect = e.get("Redirect")
    if redirect is not None:
        _resolver_redirect(redirect, e["Name"], subsets, with_failover=bool(failover))
    for subset, f in failover.items():
        _resolver_failover(subset, f, e["Name"], subsets)
    if connect_timeout < 0:
        raise ConfigEntryError(f"Bad ConnectTimeout '{format_duration(connect_timeout)}', must be >= 0")
    if request_timeout < 0:
        raise ConfigEntryError(f"Bad RequestTimeout '{format_duration(request_timeout)}', must be >= 0")
    lb = e.get("LoadBalancer")
    if lb is not None:
        _load_balancer(lb)


def _resolver_subsets(subsets: Mapping[str, Any]) -> None:
    """Subset names (DNS labels) and their filters (bexpr)."""
    for name, subset in subsets.items():
        if not name:
            raise ConfigEntryError("Subset defined with empty name")
        if len(name) > 63 or not _SUBSET_NAME.match(name):
            raise ConfigEntryError(f'Subset "{name}" is invalid: must be non-empty and contain only lowercase '
                                   "alphanumeric characters or '-', start with an alphanumeric character, "
                                   "and end with an alphanumeric character")
        flt = _str(subset, "Filter", f"Subsets[{name!r}]")
        if flt:
            try:
                bexpr.compile(flt)
            except bexpr.FilterError as exc:
                raise ConfigEntryError(f'Filter for subset "{name}" is not a valid expression: {exc}') from None
        _bool(subset, "OnlyPassing", f"Subsets[{name!r}]")


def _resolver_redirect(redirect: Mapping[str, Any], name: str, subsets: Mapping[str, Any], *,
                       with_failover: bool) -> None:
    """A redirect (never with a failover) names where to go, with no field that contradicts another."""
    r = {f: _str(redirect, f, "Redirect") for f in ce.REDIRECT_SPEC}
    if with_failover:
        raise ConfigEntryError("Redirect and Failover cannot both be set")
    if not any(r.values()):
        raise ConfigEntryError("Redirect is empty")
    if r["Peer"] and r["ServiceSubset"]:
        raise ConfigEntryError("Redirect.Peer cannot be set with Redirect.ServiceSubset")
    if r["Peer"] and r["Partition"]:
        raise ConfigEntryError("Redirect.Partition cannot be set with Redirect.Peer")
    if r["Peer"] and r["Datacenter"]:
        raise ConfigEntryError("Redirect.Peer cannot be set with Redirect.Datacenter")
    if not r["Service"]:
        for field in ("ServiceSubset", "Namespace", "Partition", "Peer"):
            if r[field]:
                raise ConfigEntryError(f"Redirect.{field} defined without Redirect.Service")
    elif r["ServiceSubset"] and r["Service"] == name and r["ServiceSubset"] not in subsets:
        raise ConfigEntryError(f'Redirect.ServiceSubset "{r["ServiceSubset"]}" is not a valid subset of '
                               f'"{name}"')


def _resolver_failover(subset: str, f: Mapping[str, Any], name: str, subsets: Mapping[str, Any]) -> None:
    """The failover of one subset (or ``*``): a destination is named, Targets excludes the other forms."""
    prefix = f'Bad Failover["{subset}"]: '
    what = f"Failover[{subset!r}]"
    if subset != WILDCARD and subset not in subsets:
        raise ConfigEntryError(prefix + "not a valid subset subset")
    service, service_subset = _str(f, "Service", what), _str(f, "ServiceSubset", what)
    dcs, targets = _strs(f, "Datacenters", what), _list(f, "Targets")
    if not (service or service_subset or _str(f, "Namespace", what) or dcs or targets
            or _str(f, "SamenessGroup", what)):
        raise ConfigEntryError(prefix + "one of Service, ServiceSubset, Namespace, Targets, SamenessGroup, "
                               "or Datacenters is required")
    if service_subset and service in ("", name) and service_subset not in subsets:
        raise ConfigEntryError(f'{prefix}ServiceSubset "{service_subset}" is not a valid subset of "{service}"')
    if dcs and targets:
        raise ConfigEntryError(f'Bad Failover["{subset}"]: Targets cannot be set with Datacenters')
    if service_subset and targets:
        raise ConfigEntryError(f'Bad Failover["{subset}"]: Targets cannot be set with ServiceSubset')
    if service and targets:
        raise ConfigEntryError(f'Bad Failover["{subset}"]: Targets cannot be set with Service')
    for i, t in enumerate(targets):
        tp = f'Bad Failover["{subset}"].Targets[{i}]: '
        tv = {fl: _str(t, fl, f"{what}.Targets[{i}]") for fl in ce.FAILOVER_TARGET_SPEC}
        if tv["Peer"] and tv["ServiceSubset"]:
            raise ConfigEntryError(tp + "Peer cannot be set with ServiceSubset")
        if tv["Peer"] and tv["Partition"]:
            raise ConfigEntryError(tp + "Partition cannot be set with Peer")
        if tv["Peer"] and tv["Datacenter"]:
            raise ConfigEntryError(tp + "Peer cannot be set with Datacenter")
        if tv["Partition"] and tv["Datacenter"]:
            raise ConfigEntryError(tp + "Partition cannot be set with Datacenter")
        if tv["ServiceSubset"] and tv["Service"] in ("", name) and tv["ServiceSubset"] not in subsets:
            raise ConfigEntryError(f'{tp}ServiceSubset "{tv["ServiceSubset"]}" is not a valid subset of '
                                   f'"{name}"')
    if any(dc == "" for dc in dcs):
        raise ConfigEntryError(f'Bad Failover["{subset}"].Datacenters: found empty datacenter')


def _load_balancer(lb: Mapping[str, Any]) -> None:
    policy = _str(lb, "Policy", "LoadBalancer")
    if policy not in LB_POLICIES:
        raise ConfigEntryError(f'Bad LoadBalancer policy: "{policy}" is not supported')
    if policy != "ring_hash" and lb.get("RingHashConfig") is not None:
        raise ConfigEntryError("Bad LoadBalancer configuration. RingHashConfig specified for incompatible load "
                               f'balancing policy "{policy}"')
    if policy != "least_request" and lb.get("LeastRequestConfig") is not None:
        raise ConfigEntryError("Bad LoadBalancer configuration. LeastRequestConfig specified for incompatible "
                               f'load balancing policy "{policy}"')
    hashes = _list(lb, "HashPolicies")
    if policy not in ("ring_hash", "maglev") and hashes:
        raise ConfigEntryError(f'Bad LoadBalancer configuration: HashPolicies specified for non-hash-based Policy: '
                               f'"{policy}"')
    for i, hp in enumerate(hashes):
        what = f"HashPolicies[{i}]"
        field, value, source_ip = _str(hp, "Field", what), _str(hp, "FieldValue", what), _bool(hp, "SourceIP", what)
        if field and field not in HASH_FIELDS:
            raise ConfigEntryError(f'Bad LoadBalancer HashPolicy[{i}]: "{field}" is not a supported field')
        if source_ip and field:
            raise ConfigEntryError(f"Bad LoadBalancer HashPolicy[{i}]: A single hash policy cannot hash both a "
                                   f'source address and a "{field}"')
        if source_ip and value:
            raise ConfigEntryError(f"Bad LoadBalancer HashPolicy[{i}]: A FieldValue cannot be specified when "
                                   "hashing SourceIP")
        if field and not value:
            raise ConfigEntryError(f'Bad LoadBalancer HashPolicy[{i}]: Field "{field}" was specified without a '
                                   "FieldValue")
        if value and not field:
            raise ConfigEntryError(f"Bad LoadBalancer HashPolicy[{i}]: FieldValue requires a Field to apply to")
        cookie = hp.get("CookieConfig")
        if cookie is not None:
            if field != "cookie":
                raise ConfigEntryError(f'Bad LoadBalancer HashPolicy[{i}]: cookie_config provided for "{field}"')
            ttl = duration_value(cookie["TTL"], what="CookieConfig.TTL") if cookie.get("TTL") is not None else 0
            if _bool(cookie, "Session", what) and ttl:
                raise ConfigEntryError(f"Bad LoadBalancer HashPolicy[{i}]: a session cookie cannot have an "
                                       "associated TTL")


def _valid_host(host: str, tls: bool) -> None:
    if host == WILDCARD:
        if tls:
            raise ConfigEntryError("Host '*' is not allowed when TLS is enabled, all hosts must be valid DNS "
                                   "records to add as a DNSSAN")
        return
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise ConfigEntryError(f'Host "{host}" must be a valid DNS hostname')
    if WILDCARD in host.removeprefix("*."):
        raise ConfigEntryError(f'Host "{host}" is not valid, a wildcard specifier is only allowed as the '
                               "leftmost label")


def _ingress(e: dict[str, Any]) -> None:
    for listener in _list(e, "Listeners"):
        listener["Protocol"] = _str(listener, "Protocol", "Listeners").lower() or "tcp"
        listener["Port"] = _int(listener, "Port", "Listeners")
    _name_required(e)
    _meta(e)
    tls_enabled = bool((e.get("TLS") or {}).get("Enabled")) if isinstance(e.get("TLS"), Mapping) else False
    ports: set[int] = set()
    for listener in _list(e, "Listeners"):
        port, proto = listener["Port"], listener["Protocol"]
        where = f"(listener on port {port})"
        if port in ports:
            raise ConfigEntryError(f"port {port} declared on two listeners")
        ports.add(port)
        if proto not in INGRESS_PROTOCOLS:
            raise ConfigEntryError(f"protocol must be 'tcp', 'http', 'http2', or 'grpc'. '{proto}' is an "
                                   "unsupported protocol")
        services = _list(listener, "Services")
        if not services:
            raise ConfigEntryError(f"No service declared for listener with port {port}")
        if not is_http_like(proto) and len(services) > 1:
            raise ConfigEntryError("Multiple services per listener are only supported for L7 protocols, 'http', "
                                   f"'grpc' and 'http2' {where}")
        hosts_seen: set[str] = set()
        names: set[str] = set()
        for svc in services:
            name, hosts = _str(svc, "Name", "Services"), _strs(svc, "Hosts", "Services")
            if proto == "tcp":
                if name == WILDCARD:
                    raise ConfigEntryError(f"Wildcard service name is only valid for protocol = 'http' {where}")
                if hosts:
                    raise ConfigEntryError(f"Associating hosts to a service is not supported for the {proto} "
                                           f"protocol {where}")
            if not name:
                raise ConfigEntryError(f"Service name cannot be blank {where}")
            if name == WILDCARD and hosts:
                raise ConfigEntryError(f"Associating hosts to a wildcard service is not supported {where}")
            if name in names:
                raise ConfigEntryError(f"Service {name} cannot be added multiple times {where}")
            names.add(name)
            for host in hosts:
                if host in hosts_seen:
                    raise ConfigEntryError(f"Hosts must be unique within a specific listener {where}")
                hosts_seen.add(host)
                _valid_host(host, tls_enabled)


def _terminating(e: dict[str, Any]) -> None:
    _name_required(e)
    _meta(e)
    seen: set[str] = set()
    for svc in _list(e, "Services"):
        name = _str(svc, "Name", "Services")
        if not name:
            raise ConfigEntryError("Service name cannot be blank.")
        if name in seen:
            raise ConfigEntryError(f'Service "{name}" was specified more than once within a namespace')
        seen.add(name)
        ca, cert, key = (_str(svc, f, "Services") for f in ("CAFile", "CertFile", "KeyFile"))
        if (cert or key) and not (ca and cert and key):
            raise ConfigEntryError(f'Service "{name}" must have a CertFile, CAFile, and KeyFile specified for TLS '
                                   "origination")


def _api_gateway(e: dict[str, Any]) -> None:
    for listener in _list(e, "Listeners"):
        listener["Protocol"] = _str(listener, "Protocol", "Listeners").lower()
        listener["Port"] = _int(listener, "Port", "Listeners")
    _name_required(e)
    _meta(e)
    names: set[str] = set()
    for listener in _list(e, "Listeners"):
        name, port, proto = _str(listener, "Name", "Listeners"), listener["Port"], listener["Protocol"]
        if name in names:
            raise ConfigEntryError(f"found multiple listeners with the name {name}")
        names.add(name)
        if not 1 <= port <= 65535:
            raise ConfigEntryError(f"listener port {port} not in the range 1-65535")
        if proto not in API_GATEWAY_PROTOCOLS:
            raise ConfigEntryError(f'unsupported listener protocol "{proto}", must be one of \'tcp\', or \'http\'')
        hostname = _str(listener, "Hostname", "Listeners")
        if hostname:
            if proto == "tcp":
                raise ConfigEntryError("hostname specification is not supported when using TCP")
            _valid_host(hostname, False)
        for cert in _list(listener.get("TLS") or {}, "Certificates"):
            kind = _str(cert, "Kind", "Certificates")
            if kind not in (ce.INLINE_CERTIFICATE, ce.FILE_SYSTEM_CERTIFICATE):
                raise ConfigEntryError(f"unsupported certificate kind: \"{kind}\", must be "
                                       f"'{ce.FILE_SYSTEM_CERTIFICATE}' or '{ce.INLINE_CERTIFICATE}'")
    e.setdefault("Status", {})


def _parents(e: Mapping[str, Any]) -> None:
    parents = _list(e, "Parents")
    if not parents:
        raise ConfigEntryError("route must have at least one parent")
    for i, parent in enumerate(parents):
        kind = _str(parent, "Kind", f"Parents[{i}]") or ce.API_GATEWAY
        parent["Kind"] = kind
        if kind != ce.API_GATEWAY:
            raise ConfigEntryError(f"unsupported parent kind: \"{kind}\", must be 'api-gateway'")
        if not _str(parent, "Name", f"Parents[{i}]"):
            raise ConfigEntryError(f"Parents[{i}].Name is required")


def _http_route(e: dict[str, Any]) -> None:
    _name_required(e)
    _meta(e)
    _parents(e)
    for host in _strs(e, "Hostnames", e["Kind"]):
        _valid_host(host, False)
    for i, rule in enumerate(_list(e, "Rules")):
        for j, svc in enumerate(_list(rule, "Services")):
            if not _str(svc, "Name", f"Rules[{i}].Services[{j}]"):
                raise ConfigEntryError(f"Rule[{i}], Service[{j}] missing name")
    e.setdefault("Status", {})


def _tcp_route(e: dict[str, Any]) -> None:
    _name_required(e)
    _meta(e)
    _parents(e)
    services = _list(e, "Services")
    if len(services) > 1:
        raise ConfigEntryError(f"tcp-route currently only supports one service, found {len(services)}")
    for svc in services:
        if not _str(svc, "Name", "Services"):
            raise ConfigEntryError("Service name cannot be blank")
    e.setdefault("Status", {})


def _pem_block(text: str, label: str) -> bool:
    return f"-----BEGIN {label}" in text and "-----END " in text


def _inline_certificate(e: dict[str, Any]) -> None:
    _name_required(e)
    _meta(e)
    cert, key = _str(e, "Certificate", e["Kind"]), _str(e, "PrivateKey", e["Kind"])
    if not _pem_block(cert, "CERTIFICATE"):
        raise ConfigEntryError("failed to parse certificate PEM")
    if not _pem_block(key, "") or "PRIVATE KEY" not in key:
        raise ConfigEntryError("failed to parse private key PEM")


def _file_system_certificate(e: dict[str, Any]) -> None:
    _name_required(e)
    _meta(e)
    if not _str(e, "Certificate", e["Kind"]):
        raise ConfigEntryError("certificate path is required")
    if not _str(e, "PrivateKey", e["Kind"]):
        raise ConfigEntryError("private key path is required")


def _jwt_provider(e: dict[str, Any]) -> None:
    _name_required(e)
    _meta(e)
    jwks = e.get("JSONWebKeySet")
    if not jwks:
        raise ConfigEntryError("JSONWebKeySet is required")
    local, remote = jwks.get("Local"), jwks.get("Remote")
    if (local is None) == (remote is None):
        raise ConfigEntryError("Must specify exactly one of Local or Remote JSON Web key set")
    if local is not None:
        has_jwks, has_file = bool(_str(local, "JWKS", "Local")), bool(_str(local, "Filename", "Local"))
        if has_jwks == has_file:
            raise ConfigEntryError("Must specify exactly one of String or filename for local keyset")
    if remote is not None and not _str(remote, "URI", "Remote"):
        raise ConfigEntryError("Remote JWKS URI is required")
    for field in ("Issuer",):
        _str(e, field, e["Kind"])
    _strs(e, "Audiences", e["Kind"])


def _mesh(e: dict[str, Any]) -> None:
    _meta(e)
    tp = e.get("TransparentProxy")
    if tp is not None and not isinstance(tp, Mapping):
        raise DecodeError("mesh.TransparentProxy: expected an object")
    e.setdefault("TransparentProxy", {})


def _exported_services(e: dict[str, Any]) -> None:
    if e["Name"] != "default":
        raise ConfigEntryError('exported-services Name must be "default"')
    _meta(e)
    for i, svc in enumerate(_list(e, "Services")):
        name = _str(svc, "Name", f"Services[{i}]")
        if not name:
            raise ConfigEntryError(f"Services[{i}]: service name cannot be empty")
        consumers = _list(svc, "Consumers")
        if not consumers:
            raise ConfigEntryError(f'Services[{i}]: must have at least one consumer')
        for j, c in enumerate(consumers):
            set_fields = [f for f in ("Peer", "Partition", "SamenessGroup") if _str(c, f, f"Consumers[{j}]")]
            if len(set_fields) != 1:
                raise ConfigEntryError(f"Services[{i}].Consumers[{j}]: must define exactly one of Peer, "
                                       "Partition, or SamenessGroup")
            if "Partition" in set_fields and c["Partition"] != "default":
                raise ConfigEntryError(f"Services[{i}].Consumers[{j}]: Partitions are an enterprise-only feature")
            if "SamenessGroup" in set_fields:
                raise ConfigEntryError(f"Services[{i}].Consumers[{j}]: Sameness groups are an enterprise-only "
                                       "feature")
            if c.get("Peer") == WILDCARD:
                raise ConfigEntryError(f'Services[{i}].Consumers[{j}]: exporting to all peers (wildcard) is not '
                                       "supported")


def _sameness_group(e: dict[str, Any]) -> None:
    raise ConfigEntryError("sameness-groups are an enterprise-only feature")


def _intentions(e: dict[str, Any]) -> None:
    try:
        intentions.validate_entry(e)
    except intentions.IntentionError as exc:
        raise ConfigEntryError(str(exc)) from None


_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    ce.SERVICE_DEFAULTS: _service_defaults,
    ce.PROXY_DEFAULTS: _proxy_defaults,
    ce.SERVICE_ROUTER: _router,
    ce.SERVICE_SPLITTER: _splitter,
    ce.SERVICE_RESOLVER: _resolver,
    ce.SERVICE_INTENTIONS: _intentions,
    ce.INGRESS_GATEWAY: _ingress,
    ce.TERMINATING_GATEWAY: _terminating,
    ce.API_GATEWAY: _api_gateway,
    ce.MESH: _mesh,
    ce.EXPORTED_SERVICES: _exported_services,
    ce.HTTP_ROUTE: _http_route,
    ce.TCP_ROUTE: _tcp_route,
    ce.INLINE_CERTIFICATE: _inline_certificate,
    ce.FILE_SYSTEM_CERTIFICATE: _file_system_certificate,
    ce.JWT_PROVIDER: _jwt_provider,
    ce.SAMENESS_GROUP: _sameness_group,
}


def normalize_and_validate(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A decoded entry (``configentries.decode``) as Consul stores it; raises DecodeError/ConfigEntryError."""
    out: dict[str, Any] = copy.deepcopy(dict(entry))
    _CHECKS[out["Kind"]](out)
    return out
