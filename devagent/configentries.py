"""Config entries (``/v1/config``): the kinds Consul CE accepts, decoded and normalized (pure: no I/O).

Kinds: service-defaults, proxy-defaults (Name "global"), service-router, service-splitter,
service-resolver, service-intentions (see ``intentions.py``), ingress-gateway, terminating-gateway,
api-gateway, mesh (Name "mesh"), exported-services, http-route, tcp-route, inline-certificate,
file-system-certificate, jwt-provider, sameness-group (refused as on Consul CE, an Enterprise feature).

Bodies are decoded as Consul's DecodeConfigEntry does: keys case-insensitive, snake_case accepted,
an unknown top-level field refused (400 ``Request decoding failed: ...``), wrong JSON types refused.
What Consul's Normalize/Validate then check is in ``configcheck.py`` (its refusals are 500s, as
Consul's RPC errors are), the checks across entries in ``discoverychain.py``. ACL rules follow each
kind's CanRead/CanWrite in Consul.
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
INGRESS_GATEWAY = "ingress-gateway"
TERMINATING_GATEWAY = "terminating-gateway"
API_GATEWAY = "api-gateway"
MESH = "mesh"
EXPORTED_SERVICES = "exported-services"
HTTP_ROUTE = "http-route"
TCP_ROUTE = "tcp-route"
INLINE_CERTIFICATE = "inline-certificate"
FILE_SYSTEM_CERTIFICATE = "file-system-certificate"
JWT_PROVIDER = "jwt-provider"
SAMENESS_GROUP = "sameness-group"
KINDS = (SERVICE_DEFAULTS, PROXY_DEFAULTS, SERVICE_RESOLVER, SERVICE_SPLITTER, SERVICE_ROUTER, SERVICE_INTENTIONS,
         INGRESS_GATEWAY, TERMINATING_GATEWAY, API_GATEWAY, MESH, EXPORTED_SERVICES, HTTP_ROUTE, TCP_ROUTE,
         INLINE_CERTIFICATE, FILE_SYSTEM_CERTIFICATE, JWT_PROVIDER, SAMENESS_GROUP)
DISCOVERY_CHAIN_KINDS = (SERVICE_ROUTER, SERVICE_SPLITTER, SERVICE_RESOLVER)
GATEWAY_KINDS = (INGRESS_GATEWAY, TERMINATING_GATEWAY, API_GATEWAY)
PROXY_DEFAULTS_NAME = "global"
MESH_NAME = "mesh"
# Kinds whose single entry has a fixed name: Consul stores it under that name whatever the body says
FIXED_NAMES = {MESH: MESH_NAME}

# ----- decoding specs (canonical field names; nested specs where a field's content is checked) -----
_COMMON = {"Kind": None, "Name": None, "Meta": None, "Namespace": None, "Partition": None,
           "CreateIndex": None, "ModifyIndex": None}
_HEADER_MODS = {"Add": None, "Set": None, "Remove": None}
ROUTE_HEADER_SPEC = {"Name": None, "Present": None, "Exact": None, "Prefix": None, "Suffix": None, "Regex": None,
                     "Invert": None}
ROUTE_QUERY_SPEC = {"Name": None, "Present": None, "Exact": None, "Regex": None}
ROUTE_HTTP_SPEC = {"PathExact": None, "PathPrefix": None, "PathRegex": None, "Header": [ROUTE_HEADER_SPEC],
                   "QueryParam": [ROUTE_QUERY_SPEC], "Methods": None}
ROUTE_DEST_SPEC = {"Service": None, "ServiceSubset": None, "Namespace": None, "Partition": None,
                   "PrefixRewrite": None, "RequestTimeout": None, "IdleTimeout": None, "NumRetries": None,
                   "RetryOnConnectFailure": None, "RetryOn": None, "RetryOnStatusCodes": None,
                   "RequestHeaders": _HEADER_MODS, "ResponseHeaders": _HEADER_MODS}
ROUTE_SPEC = {"Match": {"HTTP": ROUTE_HTTP_SPEC}, "Destination": ROUTE_DEST_SPEC}
SPLIT_SPEC = {"Weight": None, "Service": None, "ServiceSubset": None, "Namespace": None, "Partition": None,
              "RequestHeaders": _HEADER_MODS, "ResponseHeaders": _HEADER_MODS}
SUBSET_SPEC = {"Filter": None, "OnlyPassing": None}
REDIRECT_SPEC = {"Service": None, "ServiceSubset": None, "Namespace": None, "Partition": None, "Datacenter": None,
                 "Peer": None, "SamenessGroup": None}
FAILOVER_TARGET_SPEC = {"Service": None, "ServiceSubset": None, "Partition": None, "Namespace": None,
                        "Datacenter": None, "Peer": None}
FAILOVER_SPEC = {"Service": None, "ServiceSubset": None, "Namespace": None, "Datacenters": None,
                 "Targets": [FAILOVER_TARGET_SPEC], "SamenessGroup": None, "Policy": None}
HASH_POLICY_SPEC = {"Field": None, "FieldValue": None, "CookieConfig": {"Session": None, "TTL": None, "Path": None},
                    "SourceIP": None, "Terminal": None}
LOAD_BALANCER_SPEC = {"Policy": None, "RingHashConfig": None, "LeastRequestConfig": None,
                      "HashPolicies": [HASH_POLICY_SPEC]}
INGRESS_SERVICE_SPEC = {"Name": None, "Hosts": None, "Namespace": None, "Partition": None, "TLS": None,
                        "RequestHeaders": None, "ResponseHeaders": None, "MaxConnections": None,
                        "MaxPendingRequests": None, "MaxConcurrentRequests": None, "PassiveHealthCheck": None}
INGRESS_LISTENER_SPEC = {"Port": None, "Protocol": None, "Services": [INGRESS_SERVICE_SPEC], "TLS": None}
LINKED_SERVICE_SPEC = {"Name": None, "CAFile": None, "CertFile": None, "KeyFile": None, "SNI": None,
                       "Namespace": None, "Partition": None, "DisableAutoHostRewrite": None}
CERT_REF_SPEC = {"Kind": None, "Name": None, "SectionName": None, "Namespace": None, "Partition": None}
API_LISTENER_SPEC = {"Name": None, "Hostname": None, "Port": None, "Protocol": None,
                     "TLS": {"Certificates": [CERT_REF_SPEC], "MinVersion": None, "MaxVersion": None,
                             "CipherSuites": None},
                     "Override": None, "Default": None}
PARENT_REF_SPEC = {"Kind": None, "Name": None, "SectionName": None, "Namespace": None, "Partition": None}
ROUTE_SERVICE_SPEC = {"Name": None, "Namespace": None, "Partition": None, "Weight": None, "Filters": None,
                      "ResponseFilters": None}
HTTP_ROUTE_RULE_SPEC = {"Filters": None, "ResponseFilters": None, "Matches": None,
                        "Services": [ROUTE_SERVICE_SPEC]}
CONSUMER_SPEC = {"Peer": None, "Partition": None, "SamenessGroup": None}
EXPORTED_SERVICE_SPEC = {"Name": None, "Namespace": None, "Consumers": [CONSUMER_SPEC]}
JWKS_SPEC = {"Local": {"JWKS": None, "Filename": None},
             "Remote": {"URI": None, "RequestTimeoutMs": None, "CacheDuration": None, "FetchAsynchronously": None,
                        "RetryPolicy": None, "JWKSCluster": None}}

SPECS: dict[str, dict[str, Any]] = {
    SERVICE_DEFAULTS: {**_COMMON, "Protocol": None, "Mode": None, "TransparentProxy": None, "MutualTLSMode": None,
                       "MeshGateway": None, "Expose": None, "ExternalSNI": None, "UpstreamConfig": None,
                       "Destination": None, "MaxInboundConnections": None, "LocalConnectTimeoutMs": None,
                       "LocalRequestTimeoutMs": None, "BalanceInboundConnections": None, "RateLimits": None,
                       "EnvoyExtensions": None},
    PROXY_DEFAULTS: {**_COMMON, "Config": None, "Mode": None, "TransparentProxy": None, "MutualTLSMode": None,
                     "MeshGateway": None, "Expose": None, "AccessLogs": None, "EnvoyExtensions": None,
                     "FailoverPolicy": None, "PrioritizeByLocality": None},
    SERVICE_RESOLVER: {**_COMMON, "DefaultSubset": None, "Subsets": None, "Redirect": REDIRECT_SPEC,
                       "Failover": None, "ConnectTimeout": None, "RequestTimeout": None,
                       "LoadBalancer": LOAD_BALANCER_SPEC, "PrioritizeByLocality": None},
    SERVICE_SPLITTER: {**_COMMON, "Splits": [SPLIT_SPEC]},
    SERVICE_ROUTER: {**_COMMON, "Routes": [ROUTE_SPEC]},
    SERVICE_INTENTIONS: {**intentions.ENTRY_SPEC},
    INGRESS_GATEWAY: {**_COMMON, "Listeners": [INGRESS_LISTENER_SPEC], "TLS": None, "Defaults": None},
    TERMINATING_GATEWAY: {**_COMMON, "Services": [LINKED_SERVICE_SPEC]},
    API_GATEWAY: {**_COMMON, "Listeners": [API_LISTENER_SPEC], "Status": None},
    MESH: {**_COMMON, "TransparentProxy": None, "AllowEnablingPermissiveMutualTLS": None, "ValidateClusters": None,
           "TLS": None, "HTTP": None, "Peering": None},
    EXPORTED_SERVICES: {**_COMMON, "Services": [EXPORTED_SERVICE_SPEC]},
    HTTP_ROUTE: {**_COMMON, "Parents": [PARENT_REF_SPEC], "Rules": [HTTP_ROUTE_RULE_SPEC], "Hostnames": None,
                 "Status": None},
    TCP_ROUTE: {**_COMMON, "Parents": [PARENT_REF_SPEC], "Services": [ROUTE_SERVICE_SPEC], "Status": None},
    INLINE_CERTIFICATE: {**_COMMON, "Certificate": None, "PrivateKey": None},
    FILE_SYSTEM_CERTIFICATE: {**_COMMON, "Certificate": None, "PrivateKey": None},
    JWT_PROVIDER: {**_COMMON, "JSONWebKeySet": JWKS_SPEC, "Issuer": None, "Audiences": None, "Locations": None,
                   "Forwarding": None, "ClockSkewSeconds": None, "CacheConfig": None},
    SAMENESS_GROUP: {**_COMMON, "DefaultForFailover": None, "IncludeLocal": None, "Members": None},
}
# map-valued fields of service-resolver: name -> spec of each value
RESOLVER_MAPS: dict[str, dict[str, Any]] = {"Subsets": SUBSET_SPEC, "Failover": FAILOVER_SPEC}


class ConfigEntryError(ValueError):
    """An entry Consul's Normalize/Validate or graph checks refuse; the message is Consul's wording."""


def kind_of(raw: Any) -> str:
    if not isinstance(raw, Mapping):
        raise DecodeError("expected a JSON object")
    for key, value in raw.items():
        if isinstance(key, str) and fold(key) == "kind":
            if not isinstance(value, str):
                raise DecodeError("Kind value in payload is not a string")
            return value
    raise DecodeError("Payload does not contain a kind/Kind key at the top level")


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise DecodeError(f"invalid config entry kind: {kind}")


def decode(raw: Any) -> dict[str, Any]:
    """Body -> canonical entry (without indexes); raises DecodeError (400)."""
    kind = kind_of(raw)
    check_kind(kind)
    spec = SPECS[kind]
    d = decode_struct(raw, spec, what=kind)
    unknown = sorted(k for k in d if k not in spec)
    if unknown:
        raise DecodeError(f"1 error(s) decoding:\n\n* invalid config key \"{unknown[0]}\"")
    d.pop("CreateIndex", None)
    d.pop("ModifyIndex", None)
    d["Kind"] = kind
    if kind == SERVICE_INTENTIONS:
        try:
            return intentions.normalize_entry(intentions.decode_entry(raw))
        except intentions.IntentionError as exc:
            raise ConfigEntryError(str(exc)) from None
    d["Name"] = FIXED_NAMES.get(kind) or expect_str(d.get("Name"), "Name")
    if d.get("Meta") is not None:
        d["Meta"] = expect_str_map(d["Meta"], "Meta")
    if kind == SERVICE_RESOLVER:
        for field, sub in RESOLVER_MAPS.items():
            value = d.get(field)
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise DecodeError(f"{kind}.{field}: expected an object")
            d[field] = {str(k): decode_struct(v, sub, what=f"{kind}.{field}[{k!r}]") for k, v in value.items()}
    return {k: v for k, v in d.items() if v is not None or k in ("Kind", "Name")}


def can_read(authz: acl.Authorizer, kind: str, name: str) -> bool:
    """Consul's CanRead per kind."""
    if kind == SERVICE_INTENTIONS:
        return authz.intention_read(name)
    if kind in (PROXY_DEFAULTS, MESH, JWT_PROVIDER):
        return True  # readable by anyone (Consul: proxy-defaults/mesh/jwt-provider CanRead is allow)
    if kind in (EXPORTED_SERVICES, SAMENESS_GROUP):
        return authz.mesh_read()
    if kind in (API_GATEWAY, HTTP_ROUTE, TCP_ROUTE, INLINE_CERTIFICATE, FILE_SYSTEM_CERTIFICATE):
        return authz.mesh_read()
    return authz.service_read(name)


def check_read(authz: acl.Authorizer, kind: str, name: str) -> None:
    if can_read(authz, kind, name):
        return
    if kind == SERVICE_INTENTIONS:
        authz.check("intention:read", name)
    elif kind in (INGRESS_GATEWAY, TERMINATING_GATEWAY, SERVICE_DEFAULTS, *DISCOVERY_CHAIN_KINDS):
        authz.check("service:read", name)
    else:
        authz.check("mesh:read")


def check_write(authz: acl.Authorizer, kind: str, name: str, related: list[str] | None = None) -> None:
    """Consul's CanWrite: service:write on the name for service-defaults and the discovery chain (plus
    service:read on the services a chain entry sends traffic to), intention:write for intentions,
    mesh:write (operator:write also counts) for the mesh-wide kinds and gateways."""
    if kind == SERVICE_INTENTIONS:
        authz.check("intention:write", name)
    elif kind in (SERVICE_DEFAULTS, *DISCOVERY_CHAIN_KINDS):
        authz.check("service:write", name)
        for other in related or []:
            if other != name:
                authz.check("service:read", other)
    elif not (authz.mesh_write() or authz.operator_write()):
        authz.check("mesh:write")


def public_entry(row: Mapping[str, Any]) -> dict[str, Any]:
    """The entry as served: private ``_`` keys removed (also inside intention sources); the mesh entry
    has no Name field in Consul's JSON."""
    out = {k: v for k, v in row.items() if not k.startswith("_")}
    if isinstance(out.get("Sources"), list):
        out["Sources"] = [{k: v for k, v in s.items() if not k.startswith("_")} for s in out["Sources"]]
    if out.get("Kind") == MESH:
        out.pop("Name", None)
    return out


def key(kind: str, name: str) -> str:
    return f"{kind}/{name}"
