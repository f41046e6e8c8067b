"""Consul service definitions (HCL or JSON files) into `/v1/agent/service/register` payloads.

Pure: text in, payload dicts out; no I/O. Accepts what Consul's agent accepts in a service definition
file: a top-level `service` (one) or `services` (several), with `name`, `id`, `port`, `address`,
`tags`, `meta`, `enable_tag_override`, `weights`, `tagged_addresses`, `kind`, `proxy`, `check` or
`checks`, and `connect { native, sidecar_service { ..., proxy { upstreams = [...] } } }`. Keys may be
snake_case or CamelCase (matched case-insensitively, underscores ignored, as Consul does). Blocks may
be written as HCL blocks or as attribute objects (`upstreams { ... }` twice, or `upstreams = [...]`).

Anything wrong raises `ServiceDefinitionError` naming the field (`service.connect.sidecar_service.
proxy.upstreams[0].local_bind_port: must be an integer in 1..65535, got "x"`). Unknown fields are
errors too, as in Consul, so that a typo does not silently drop an upstream.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from consulkit.conventions import SECOND, DurationError, fold_key, parse_duration_ns

__all__ = ["ServiceDefinitionError", "parse", "parse_data", "upstreams_of"]

Payload = dict[str, Any]


class ServiceDefinitionError(ValueError):
    """A service definition that cannot be registered; `field` is the dotted path to the culprit."""

    def __init__(self, field: str, problem: str, source: str = "") -> None:
        self.field = field
        self.problem = problem
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {problem}" if field else f"{where}{problem}")


# ---------------------------------------------------------------------------------------------------
# Entry points


def parse(text: str, *, source: str = "", fmt: str | None = None) -> list[Payload]:
    """Parse a definition file's text; `fmt` is "hcl" or "json" (guessed from `source` or the text)."""
    kind = (fmt or guess_format(text, source)).lower()
    if kind == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ServiceDefinitionError("", f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
                                         source) from None
    elif kind == "hcl":
        data = _load_hcl(text, source)
    else:
        raise ServiceDefinitionError("", f"unknown format {fmt!r}; use hcl or json", source)
    try:
        return parse_data(data)
    except ServiceDefinitionError as exc:
        raise ServiceDefinitionError(exc.field, exc.problem, source) from None


def parse_data(data: Any) -> list[Payload]:
    """Convert already-decoded data (a JSON object or python-hcl2's output) into register payloads."""
    data = _clean(data)
    if not isinstance(data, dict):
        raise ServiceDefinitionError("", f"expected an object with `service` or `services`, got {_kind(data)}")
    keys = {fold_key(k): k for k in data}
    unknown = sorted(k for n, k in keys.items() if n not in ("service", "services"))
    if unknown:
        raise ServiceDefinitionError(unknown[0], "unknown top-level key; a definition has `service` or `services`")
    if not keys:
        raise ServiceDefinitionError("", "no `service` or `services` in the definition")
    payloads: list[Payload] = []
    if "service" in keys:
        raw = data[keys["service"]]
        items = raw if isinstance(raw, list) else [raw]
        for i, item in enumerate(items):
            payloads.append(_service(item, "service" if len(items) == 1 else f"service[{i}]"))
    if "services" in keys:
        raw = data[keys["services"]]
        items = raw if isinstance(raw, list) else [raw]
        for i, item in enumerate(items):
            payloads.append(_service(item, f"services[{i}]"))
    seen: dict[str, int] = {}
    for i, p in enumerate(payloads):
        sid = p.get("ID") or p["Name"]
        if sid in seen:
            raise ServiceDefinitionError(f"services[{i}].id", f"duplicate service id {sid!r}")
        seen[sid] = i
    return payloads


def upstreams_of(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The upstreams a register payload declares for its sidecar (empty when it has none)."""
    connect = payload.get("Connect") or {}
    sidecar = connect.get("SidecarService") or {}
    proxy = sidecar.get("Proxy") or {}
    return list(proxy.get("Upstreams") or [])


# ---------------------------------------------------------------------------------------------------
# Decoding


def guess_format(text: str, source: str) -> str:
    """hcl or json, from the file name, else from the text (JSON starts with `{`)."""
    lower = source.lower()
    if lower.endswith(".json"):
        return "json"
    if lower.endswith(".hcl"):
        return "hcl"
    return "json" if text.lstrip().startswith("{") else "hcl"


def load_hcl(text: str, source: str) -> Any:
    """python-hcl2's reading of ``text`` without its metadata keys; ServiceDefinitionError when not HCL."""
    return _clean(_load_hcl(text, source))


def _load_hcl(text: str, source: str) -> Any:
    import hcl2  # pure parser; imported here so JSON-only users never pay for lark

    options_type = getattr(hcl2, "SerializationOptions", None)
    try:
        if options_type is not None:  # python-hcl2 >= 7 keeps quotes unless told otherwise
            options = options_type(with_comments=False, strip_string_quotes=True, preserve_heredocs=False)
            return hcl2.loads(text, serialization_options=options)
        return hcl2.loads(text)
    except Exception as exc:  # lark raises several unrelated types; all mean the text is not HCL
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ServiceDefinitionError("", f"invalid HCL: {first}", source) from None


_META_KEYS = ("__is_block__", "__comments__", "__inline_comments__", "__start_line__", "__end_line__")


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k not in _META_KEYS}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _block(value: Any, path: str) -> dict[str, Any]:
    """A single block: an object, or (HCL) a list holding exactly one object."""
    if isinstance(value, list):
        if len(value) != 1:
            raise ServiceDefinitionError(path, f"given {len(value)} times; expected one block")
        value = value[0]
    if not isinstance(value, dict):
        raise ServiceDefinitionError(path, f"must be an object, got {_kind(value)}")
    return value


def _blocks(value: Any, path: str) -> list[dict[str, Any]]:
    """Repeated blocks: a list of objects (or one object)."""
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ServiceDefinitionError(f"{path}[{i}]", f"must be an object, got {_kind(item)}")
        out.append(item)
    return out


def _fields(obj: dict[str, Any], path: str, allowed: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    """Map each key of `obj` to (normalised name, value); unknown or repeated keys are errors."""
    out: dict[str, tuple[str, Any]] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ServiceDefinitionError(path, f"keys must be strings, got {key!r}")
        n = fold_key(key)
        if n not in allowed:
            names = ", ".join(sorted(set(allowed.values())))
            raise ServiceDefinitionError(_join(path, key), f"unknown field; expected one of: {names}")
        if n in out:
            raise ServiceDefinitionError(_join(path, key), f"given twice (as {out[n][0]!r} and {key!r})")
        out[n] = (key, value)
    return out


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# ---------------------------------------------------------------------------------------------------
# Value checks


def _str(value: Any, path: str, *, allow_empty: bool = False, max_len: int = 0) -> str:
    if not isinstance(value, str):
        raise ServiceDefinitionError(path, f"must be a string, got {_kind(value)} {value!r}")
    if not allow_empty and not value:
        raise ServiceDefinitionError(path, "must not be empty")
    if max_len and len(value) > max_len:
        raise ServiceDefinitionError(path, f"must be at most {max_len} characters, got {len(value)}")
    return value


def _int(value: Any, path: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ServiceDefinitionError(path, f"must be an integer in {lo}..{hi}, got {value!r}")
    if not lo <= value <= hi:
        raise ServiceDefinitionError(path, f"must be an integer in {lo}..{hi}, got {value}")
    return int(value)


def _port(value: Any, path: str) -> int:
    return _int(value, path, 1, 65535)


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ServiceDefinitionError(path, f"must be true or false, got {value!r}")
    return value


def _str_list(value: Any, path: str) -> list[str]:
    if not isinstance(value, list):
        raise ServiceDefinitionError(path, f"must be a list of strings, got {_kind(value)}")
    return [_str(v, f"{path}[{i}]") for i, v in enumerate(value)]


_META_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def _meta(value: Any, path: str) -> dict[str, str]:
    obj = _block(value, path)
    if len(obj) > 64:
        raise ServiceDefinitionError(path, f"at most 64 keys, got {len(obj)}")
    out: dict[str, str] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not _META_KEY.match(k):
            raise ServiceDefinitionError(f"{path}.{k}", "keys must be 1..128 letters, digits, '_' or '-'")
        if k.lower().startswith("consul-"):
            raise ServiceDefinitionError(f"{path}.{k}", "the 'consul-' prefix is reserved")
        out[k] = _str(v, f"{path}.{k}", allow_empty=True, max_len=512)
    return out


def _duration(value: Any, path: str, *, minimum: float = 0.0) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ServiceDefinitionError(path, f"must be a duration such as \"10s\", got {value!r}")
    if isinstance(value, int):  # Consul's JSON decoder also takes nanoseconds
        text = f"{value}ns"
    else:
        text = value
    try:
        seconds = parse_duration_ns(text) / SECOND
    except DurationError:
        raise ServiceDefinitionError(
            path, f"invalid duration {text!r}: use a number and a unit (ns, us, ms, s, m, h), e.g. 10s") from None
    if seconds < minimum:
        raise ServiceDefinitionError(path, f"must be at least {minimum:g}s, got {value!r}")
    return text


# ---------------------------------------------------------------------------------------------------
# Checks

# normalised key -> register payload key
_CHECK_KEYS = {
    "id": "CheckID", "checkid": "CheckID", "name": "Name", "notes": "Notes", "status": "Status",
    "serviceid": "ServiceID",
    "http": "HTTP", "method": "Method", "header": "Header", "body": "Body", "disableredirects": "DisableRedirects",
    "tlsskipverify": "TLSSkipVerify", "tlsservername": "TLSServerName",
    "tcp": "TCP", "udp": "UDP", "grpc": "GRPC", "grpcusetls": "GRPCUseTLS", "h2ping": "H2PING",
    "h2pingusetls": "H2PingUseTLS", "ttl": "TTL", "aliasservice": "AliasService", "aliasnode": "AliasNode",
    "args": "Args", "shell": "Shell", "dockercontainerid": "DockerContainerID", "osservice": "OSService",
    "interval": "Interval", "timeout": "Timeout",
    "deregistercriticalserviceafter": "DeregisterCriticalServiceAfter",
    "successbeforepassing": "SuccessBeforePassing", "failuresbeforewarning": "FailuresBeforeWarning",
    "failuresbeforecritical": "FailuresBeforeCritical", "outputmaxsize": "OutputMaxSize",
}
_CHECK_TYPES = ("HTTP", "TCP", "UDP", "GRPC", "H2PING", "TTL", "AliasService", "Args", "OSService")
_NEEDS_INTERVAL = ("HTTP", "TCP", "UDP", "GRPC", "H2PING", "Args", "OSService")
_STATUSES = ("passing", "warning", "critical")
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")


def _check(obj: dict[str, Any], path: str) -> dict[str, Any]:
    fields = _fields(obj, path, {k: _label(k) for k in _CHECK_KEYS})
    out: dict[str, Any] = {}
    for n, (key, value) in fields.items():
        p = _join(path, key)
        target = _CHECK_KEYS[n]
        if target in ("TLSSkipVerify", "GRPCUseTLS", "H2PingUseTLS", "DisableRedirects"):
            out[target] = _bool(value, p)
        elif target in ("Interval", "Timeout", "TTL"):
            out[target] = _duration(value, p)
        elif target == "DeregisterCriticalServiceAfter":
            out[target] = _duration(value, p, minimum=60.0)
        elif target in ("SuccessBeforePassing", "FailuresBeforeWarning", "FailuresBeforeCritical"):
            out[target] = _int(value, p, 0, 1_000_000)
        elif target == "OutputMaxSize":
            out[target] = _int(value, p, 1, 1 << 30)
        elif target == "Args":
            out[target] = _str_list(value, p)
        elif target == "Header":
            out[target] = _header(value, p)
        elif target == "Status":
            status = _str(value, p)
            if status not in _STATUSES:
                raise ServiceDefinitionError(p, f"must be one of {', '.join(_STATUSES)}, got {status!r}")
            out[target] = status
        elif target == "Method":
            method = _str(value, p).upper()
            if method not in _METHODS:
                raise ServiceDefinitionError(p, f"unknown HTTP method {value!r}")
            out[target] = method
        else:
            out[target] = _str(value, p)
    kinds = [t for t in _CHECK_TYPES if t in out]
    if not kinds:
        raise ServiceDefinitionError(path, "a check needs one of http, tcp, udp, grpc, h2ping, ttl, "
                                           "alias_service, args or os_service")
    if len(kinds) > 1:
        raise ServiceDefinitionError(path, f"a check has one type, got {' and '.join(k.lower() for k in kinds)}")
    kind = kinds[0]
    if kind in _NEEDS_INTERVAL and "Interval" not in out:
        raise ServiceDefinitionError(_join(path, "interval"), f"required for a {kind.lower()} check")
    if kind == "TTL" and "Interval" in out:
        raise ServiceDefinitionError(_join(path, "interval"), "a ttl check has no interval")
    if kind == "HTTP" and not re.match(r"^https?://", out["HTTP"]):
        raise ServiceDefinitionError(_join(path, "http"), f"must be an http:// or https:// URL, got {out['HTTP']!r}")
    if kind in ("TCP", "UDP", "GRPC", "H2PING") and not _hostport(out[kind].split("/", 1)[0]):
        raise ServiceDefinitionError(_join(path, kind.lower()), f"must be host:port, got {out[kind]!r}")
    return out


def _label(normalised: str) -> str:
    """The snake_case spelling shown in error messages for a normalised key."""
    return _SNAKE.get(normalised, normalised)


_SNAKE = {
    "checkid": "check_id", "serviceid": "service_id", "disableredirects": "disable_redirects",
    "tlsskipverify": "tls_skip_verify", "tlsservername": "tls_server_name", "grpcusetls": "grpc_use_tls",
    "h2pingusetls": "h2ping_use_tls", "aliasservice": "alias_service", "aliasnode": "alias_node",
    "dockercontainerid": "docker_container_id", "osservice": "os_service",
    "deregistercriticalserviceafter": "deregister_critical_service_after",
    "successbeforepassing": "success_before_passing", "failuresbeforewarning": "failures_before_warning",
    "failuresbeforecritical": "failures_before_critical", "outputmaxsize": "output_max_size",
    "enabletagoverride": "enable_tag_override", "taggedaddresses": "tagged_addresses",
    "sidecarservice": "sidecar_service", "localserviceaddress": "local_service_address",
    "localserviceport": "local_service_port", "destinationservicename": "destination_service_name",
    "destinationserviceid": "destination_service_id", "destinationname": "destination_name",
    "destinationtype": "destination_type", "destinationnamespace": "destination_namespace",
    "destinationpartition": "destination_partition", "localbindaddress": "local_bind_address",
    "localbindport": "local_bind_port", "disabledefaultchecks": "disable_default_checks",
}


def _hostport(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def _header(value: Any, path: str) -> dict[str, list[str]]:
    obj = _block(value, path)
    out: dict[str, list[str]] = {}
    for k, v in obj.items():
        p = f"{path}.{k}"
        out[k] = [_str(v, p, allow_empty=True)] if isinstance(v, str) else _str_list(v, p)
    return out


def _checks(fields: dict[str, tuple[str, Any]], path: str) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    if "check" in fields:
        key, value = fields["check"]
        checks.append(_check(_block(value, _join(path, key)), _join(path, key)))
    if "checks" in fields:
        key, value = fields["checks"]
        for i, obj in enumerate(_blocks(value, _join(path, key))):
            checks.append(_check(obj, f"{_join(path, key)}[{i}]"))
    ids = [c["CheckID"] for c in checks if "CheckID" in c]
    for cid in ids:
        if ids.count(cid) > 1:
            raise ServiceDefinitionError(_join(path, "checks"), f"duplicate check id {cid!r}")
    return checks


# ---------------------------------------------------------------------------------------------------
# Services, sidecars, upstreams

_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,62}[A-Za-z0-9])?$")

_SERVICE_KEYS = {n: _label(n) for n in (
    "name", "id", "port", "address", "tags", "meta", "enabletagoverride", "weights", "taggedaddresses",
    "kind", "proxy", "check", "checks", "connect")}
_SIDECAR_KEYS = {n: _label(n) for n in (
    "name", "id", "port", "address", "tags", "meta", "enabletagoverride", "weights", "check", "checks",
    "proxy", "disabledefaultchecks")}
_PROXY_KEYS = {n: _label(n) for n in (
    "destinationservicename", "destinationserviceid", "localserviceaddress", "localserviceport",
    "config", "upstreams", "mode")}
_UPSTREAM_KEYS = {n: _label(n) for n in (
    "destinationname", "destinationtype", "destinationnamespace", "destinationpartition", "datacenter",
    "localbindaddress", "localbindport", "config")}
_CONNECT_KEYS = {"native": "native", "sidecarservice": "sidecar_service"}


def _service_name(value: Any, path: str) -> str:
    name = _str(value, path)
    if not _NAME.match(name):
        raise ServiceDefinitionError(path, f"{name!r} is not a valid service name (letters, digits, '-', '_', "
                                           "'.'; starts and ends with a letter or digit; at most 64)")
    return name


def _common(fields: dict[str, tuple[str, Any]], path: str, out: dict[str, Any]) -> None:
    """Fields a service and its sidecar_service share."""
    for n, (key, value) in fields.items():
        p = _join(path, key)
        if n == "name":
            out["Name"] = _service_name(value, p)
        elif n == "id":
            out["ID"] = _str(value, p, max_len=128)
        elif n == "port":
            out["Port"] = _port(value, p)
        elif n == "address":
            out["Address"] = _str(value, p, allow_empty=True)
        elif n == "tags":
            out["Tags"] = _str_list(value, p)
        elif n == "meta":
            out["Meta"] = _meta(value, p)
        elif n == "enabletagoverride":
            out["EnableTagOverride"] = _bool(value, p)
        elif n == "weights":
            out["Weights"] = _weights(value, p)
    checks = _checks(fields, path)
    if checks:
        out["Checks"] = checks


def _weights(value: Any, path: str) -> dict[str, int]:
    fields = _fields(_block(value, path), path, {"passing": "passing", "warning": "warning"})
    if "passing" not in fields:
        raise ServiceDefinitionError(_join(path, "passing"), "required (an integer of at least 1)")
    out = {"Passing": _int(fields["passing"][1], _join(path, fields["passing"][0]), 1, 65535), "Warning": 1}
    if "warning" in fields:
        out["Warning"] = _int(fields["warning"][1], _join(path, fields["warning"][0]), 0, 65535)
    return out


def _tagged_addresses(value: Any, path: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, entry in _block(value, path).items():
        p = f"{path}.{name}"
        fields = _fields(_block(entry, p), p, {"address": "address", "port": "port"})
        if "address" not in fields:
            raise ServiceDefinitionError(_join(p, "address"), "required")
        item: dict[str, Any] = {"Address": _str(fields["address"][1], _join(p, "address"))}
        if "port" in fields:
            item["Port"] = _port(fields["port"][1], _join(p, "port"))
        out[name] = item
    return out


def _upstream(obj: dict[str, Any], path: str) -> dict[str, Any]:
    fields = _fields(obj, path, _UPSTREAM_KEYS)
    out: dict[str, Any] = {}
    for n, (key, value) in fields.items():
        p = _join(path, key)
        if n == "destinationname":
            out["DestinationName"] = _service_name(value, p)
        elif n == "destinationtype":
            kind = _str(value, p)
            if kind not in ("service", "prepared_query"):
                raise ServiceDefinitionError(p, f"must be service or prepared_query, got {kind!r}")
            out["DestinationType"] = kind
        elif n == "destinationnamespace":
            out["DestinationNamespace"] = _str(value, p)
        elif n == "destinationpartition":
            out["DestinationPartition"] = _str(value, p)
        elif n == "datacenter":
            out["Datacenter"] = _str(value, p)
        elif n == "localbindaddress":
            out["LocalBindAddress"] = _str(value, p)
        elif n == "localbindport":
            out["LocalBindPort"] = _port(value, p)
        elif n == "config":
            out["Config"] = _block(value, p)
    if "DestinationName" not in out:
        raise ServiceDefinitionError(_join(path, "destination_name"), "required")
    if "LocalBindPort" not in out:
        raise ServiceDefinitionError(_join(path, "local_bind_port"), "required")
    return out


def _proxy(value: Any, path: str, *, standalone: bool) -> dict[str, Any]:
    fields = _fields(_block(value, path), path, _PROXY_KEYS)
    out: dict[str, Any] = {}
    for n, (key, v) in fields.items():
        p = _join(path, key)
        if n == "destinationservicename":
            out["DestinationServiceName"] = _service_name(v, p)
        elif n == "destinationserviceid":
            out["DestinationServiceID"] = _str(v, p)
        elif n == "localserviceaddress":
            out["LocalServiceAddress"] = _str(v, p)
        elif n == "localserviceport":
            out["LocalServicePort"] = _port(v, p)
        elif n == "config":
            out["Config"] = _block(v, p)
        elif n == "mode":
            mode = _str(v, p)
            if mode not in ("direct", "transparent"):
                raise ServiceDefinitionError(p, f"must be direct or transparent, got {mode!r}")
            out["Mode"] = mode
        elif n == "upstreams":
            upstreams = [_upstream(o, f"{p}[{i}]") for i, o in enumerate(_blocks(v, p))]
            _distinct_binds(upstreams, p)
            out["Upstreams"] = upstreams
    if standalone and "DestinationServiceName" not in out:
        raise ServiceDefinitionError(_join(path, "destination_service_name"), "required for a connect-proxy")
    if not standalone and ("DestinationServiceName" in out or "DestinationServiceID" in out):
        raise ServiceDefinitionError(_join(path, "destination_service_name"),
                                     "set by Consul for a sidecar_service; leave it out")
    return out


def _distinct_binds(upstreams: list[dict[str, Any]], path: str) -> None:
    seen: dict[tuple[str, int], int] = {}
    for i, u in enumerate(upstreams):
        bind = (u.get("LocalBindAddress", "127.0.0.1"), u["LocalBindPort"])
        if bind in seen:
            raise ServiceDefinitionError(f"{path}[{i}].local_bind_port",
                                         f"{bind[0]}:{bind[1]} is already used by upstreams[{seen[bind]}]")
        seen[bind] = i


def _sidecar(value: Any, path: str) -> dict[str, Any]:
    fields = _fields(_block(value, path), path, _SIDECAR_KEYS)
    out: dict[str, Any] = {}
    _common(fields, path, out)
    if "proxy" in fields:
        key, v = fields["proxy"]
        out["Proxy"] = _proxy(v, _join(path, key), standalone=False)
    if "disabledefaultchecks" in fields:
        key, v = fields["disabledefaultchecks"]
        out["DisableDefaultChecks"] = _bool(v, _join(path, key))
    return out


def _connect(value: Any, path: str) -> dict[str, Any]:
    fields = _fields(_block(value, path), path, _CONNECT_KEYS)
    out: dict[str, Any] = {}
    if "native" in fields:
        key, v = fields["native"]
        out["Native"] = _bool(v, _join(path, key))
    if "sidecarservice" in fields:
        key, v = fields["sidecarservice"]
        out["SidecarService"] = _sidecar(v, _join(path, key))
    if out.get("Native") and "SidecarService" in out:
        raise ServiceDefinitionError(_join(path, "native"), "a Connect-native service has no sidecar_service")
    return out


def _service(value: Any, path: str) -> Payload:
    fields = _fields(_block(value, path), path, _SERVICE_KEYS)
    out: Payload = {}
    _common(fields, path, out)
    if "Name" not in out:
        raise ServiceDefinitionError(_join(path, "name"), "required")
    kind = ""
    if "kind" in fields:
        key, v = fields["kind"]
        kind = _str(v, _join(path, key))
        if kind != "connect-proxy":
            raise ServiceDefinitionError(_join(path, key), f"only connect-proxy is supported, got {kind!r}")
        out["Kind"] = kind
    if "proxy" in fields:
        key, v = fields["proxy"]
        if kind != "connect-proxy":
            raise ServiceDefinitionError(_join(path, key), "a proxy block needs kind = \"connect-proxy\"")
        out["Proxy"] = _proxy(v, _join(path, key), standalone=True)
    elif kind == "connect-proxy":
        raise ServiceDefinitionError(_join(path, "proxy"), "required for kind = \"connect-proxy\"")
    if "taggedaddresses" in fields:
        key, v = fields["taggedaddresses"]
        out["TaggedAddresses"] = _tagged_addresses(v, _join(path, key))
    if "connect" in fields:
        key, v = fields["connect"]
        connect = _connect(v, _join(path, key))
        if kind == "connect-proxy" and connect:
            raise ServiceDefinitionError(_join(path, key), "a connect-proxy has no connect block")
        if connect:
            out["Connect"] = connect
    if "SidecarService" in out.get("Connect", {}) and "Port" not in out:
        raise ServiceDefinitionError(_join(path, "port"), "required when the service has a sidecar_service "
                                                          "(the sidecar forwards to it)")
    return out
