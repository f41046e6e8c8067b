"""The compiled discovery chain (``GET /v1/discovery-chain/:service``) as typed values (pure: no I/O).

``parse_chain(json)`` reads the ``Chain`` object Consul (or the dev agent) serves into frozen
dataclasses and checks it is a graph a proxy can walk: the start node and every ``NextNode`` exist,
every resolver's target and failover targets are in ``Targets``, regular expressions compile.
A bad document raises ``ChainError`` naming the field (``Nodes["router:web.default.default"]
.Routes[0].Definition.Match.HTTP.PathRegex: ...``). Work is bounded: at most ``MAX_NODES`` nodes,
``MAX_TARGETS`` targets and ``MAX_ITEMS`` routes/splits/matches per list.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from catalog.models import parse_duration

MAX_NODES = 512
MAX_TARGETS = 512
MAX_ITEMS = 256
MAX_REGEX = 1024


class ChainError(ValueError):
    """A compiled chain that cannot be used; the message names the field."""


@dataclass(frozen=True)
class HeaderMods:
    add: tuple[tuple[str, str], ...] = ()
    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.add or self.set or self.remove)


@dataclass(frozen=True)
class HeaderMatch:
    name: str
    present: bool = False
    exact: str = ""
    prefix: str = ""
    suffix: str = ""
    regex: re.Pattern[str] | None = None
    invert: bool = False


@dataclass(frozen=True)
class QueryMatch:
    name: str
    present: bool = False
    exact: str = ""
    regex: re.Pattern[str] | None = None


@dataclass(frozen=True)
class HttpMatch:
    path_exact: str = ""
    path_prefix: str = ""
    path_regex: re.Pattern[str] | None = None
    headers: tuple[HeaderMatch, ...] = ()
    query: tuple[QueryMatch, ...] = ()
    methods: tuple[str, ...] = ()


@dataclass(frozen=True)
class RouteDestination:
    service: str = ""
    subset: str = ""
    prefix_rewrite: str = ""
    request_timeout: float = 0.0  # seconds; 0 = none
    idle_timeout: float = 0.0
    num_retries: int = 0
    retry_on_connect_failure: bool = False
    retry_on: tuple[str, ...] = ()
    retry_on_status_codes: tuple[int, ...] = ()
    request_headers: HeaderMods = HeaderMods()
    response_headers: HeaderMods = HeaderMods()


@dataclass(frozen=True)
class Route:
    match: HttpMatch
    destination: RouteDestination
    next_node: str


@dataclass(frozen=True)
class Split:
    weight: float  # percent, 0.01 steps
    next_node: str
    service: str = ""
    subset: str = ""
    request_headers: HeaderMods = HeaderMods()
    response_headers: HeaderMods = HeaderMods()


@dataclass(frozen=True)
class HashPolicy:
    field: str = ""  # header | cookie | query_parameter
    field_value: str = ""
    source_ip: bool = False
    terminal: bool = False
    cookie_ttl: float = 0.0
    cookie_session: bool = False
    cookie_path: str = ""


@dataclass(frozen=True)
class LoadBalancer:
    policy: str = ""  # "" (Envoy's default: round_robin) | random | round_robin | least_request | ring_hash | maglev
    hash_policies: tuple[HashPolicy, ...] = ()
    choice_count: int = 2  # least_request
    min_ring_size: int = 1024
    max_ring_size: int = 8192


@dataclass(frozen=True)
class Node:
    type: str  # router | splitter | resolver
    name: str
    routes: tuple[Route, ...] = ()
    splits: tuple[Split, ...] = ()
    target: str = ""  # resolver
    connect_timeout: float = 5.0
    request_timeout: float = 0.0
    default: bool = False
    failover: tuple[str, ...] = ()
    load_balancer: LoadBalancer | None = None


@dataclass(frozen=True)
class Target:
    id: str
    service: str
    subset: str = ""
    namespace: str = "default"
    partition: str = "default"
    datacenter: str = ""
    peer: str = ""
    filter: str = ""
    only_passing: bool = False
    connect_timeout: float = 5.0
    sni: str = ""
    external: bool = False
    mesh_gateway_mode: str = ""

    def admits(self, status: str) -> bool:
        """Whether an instance whose checks aggregate to ``status`` serves this target: passing ones, and
        warning ones unless the subset sets ``OnlyPassing`` (Consul's meaning; critical ones never)."""
        return status == "passing" or (status == "warning" and not self.only_passing)


@dataclass(frozen=True)
class CompiledChain:
    service_name: str
    protocol: str
    start_node: str
    nodes: Mapping[str, Node]
    targets: Mapping[str, Target]
    namespace: str = "default"
    partition: str = "default"
    datacenter: str = ""
    default: bool = False
    customization_hash: str = ""
    service_meta: Mapping[str, str] = field(default_factory=dict)

    @property
    def start(self) -> Node:
        return self.nodes[self.start_node]

    def resolver_of(self, node_key: str) -> Node:
        """The resolver node ``node_key`` names (a route's or split's next node after flattening)."""
        node = self.nodes[node_key]
        if node.type != "resolver":
            raise ChainError(f"{node_key}: expected a resolver node, found a {node.type}")
        return node


# ----- field readers (the path names the field in errors) -----
def _obj(v: Any, path: str) -> Mapping[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise ChainError(f"{path}: expected an object")
    return v


def _list(v: Any, path: str) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise ChainError(f"{path}: expected a list")
    if len(v) > MAX_ITEMS:
        raise ChainError(f"{path}: more than {MAX_ITEMS} items")
    return v


def _str(o: Mapping[str, Any], key: str, path: str) -> str:
    v = o.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ChainError(f"{path}.{key}: expected a string")
    return v


def _bool(o: Mapping[str, Any], key: str, path: str) -> bool:
    v = o.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ChainError(f"{path}.{key}: expected true or false")
    return v


def _int(o: Mapping[str, Any], key: str, path: str, default: int = 0) -> int:
    v = o.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < 0:
        raise ChainError(f"{path}.{key}: expected a whole number >= 0")
    return int(v)


def _seconds(o: Mapping[str, Any], key: str, path: str, *, ns_numbers: bool = False, default: float = 0.0) -> float:
    """A Go duration string ("15s"), or a number: nanoseconds where Consul marshals a bare time.Duration."""
    v = o.get(key)
    if v is None:
        return default
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if v < 0:
            raise ChainError(f"{path}.{key}: must not be negative")
        return float(v) / 1e9 if ns_numbers else float(v)
    try:
        return parse_duration(v, f"{path}.{key}")
    except ValueError as exc:
        raise ChainError(str(exc)) from None


def _regex(o: Mapping[str, Any], key: str, path: str) -> re.Pattern[str] | None:
    text = _str(o, key, path)
    if not text:
        return None
    if len(text) > MAX_REGEX:
        raise ChainError(f"{path}.{key}: longer than {MAX_REGEX} characters")
    try:
        return re.compile(text)
    except re.error as exc:
        raise ChainError(f"{path}.{key}: not a valid regular expression: {exc}") from None


def _header_mods(v: Any, path: str) -> HeaderMods:
    o = _obj(v, path)

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        m = _obj(o.get(key), f"{path}.{key}")
        out = []
        for k, val in m.items():
            if not isinstance(val, str):
                raise ChainError(f"{path}.{key}[{k!r}]: expected a string")
            out.append((str(k).lower(), val))
        return tuple(out)

    remove = _list(o.get("Remove"), f"{path}.Remove")
    if not all(isinstance(r, str) for r in remove):
        raise ChainError(f"{path}.Remove: expected a list of strings")
    return HeaderMods(add=pairs("Add"), set=pairs("Set"), remove=tuple(r.lower() for r in remove))


def _http_match(v: Any, path: str) -> HttpMatch:
    o = _obj(v, path)
    headers = []
    for i, h in enumerate(_list(o.get("Header"), f"{path}.Header")):
        hp = f"{path}.Header[{i}]"
        ho = _obj(h, hp)
        name = _str(ho, "Name", hp)
        if not name:
            raise ChainError(f"{hp}.Name: required")
        headers.append(HeaderMatch(name=name.lower(), present=_bool(ho, "Present", hp), exact=_str(ho, "Exact", hp),
                                   prefix=_str(ho, "Prefix", hp), suffix=_str(ho, "Suffix", hp),
                                   regex=_regex(ho, "Regex", hp), invert=_bool(ho, "Invert", hp)))
    query = []
    for i, q in enumerate(_list(o.get("QueryParam"), f"{path}.QueryParam")):
        qp = f"{path}.QueryParam[{i}]"
        qo = _obj(q, qp)
        name = _str(qo, "Name", qp)
        if not name:
            raise ChainError(f"{qp}.Name: required")
        query.append(QueryMatch(name=name, present=_bool(qo, "Present", qp), exact=_str(qo, "Exact", qp),
                                regex=_regex(qo, "Regex", qp)))
    methods = _list(o.get("Methods"), f"{path}.Methods")
    if not all(isinstance(m, str) for m in methods):
        raise ChainError(f"{path}.Methods: expected a list of strings")
    return HttpMatch(path_exact=_str(o, "PathExact", path), path_prefix=_str(o, "PathPrefix", path),
                     path_regex=_regex(o, "PathRegex", path), headers=tuple(headers), query=tuple(query),
                     methods=tuple(m.upper() for m in methods))


def _destination(v: Any, path: str) -> RouteDestination:
    o = _obj(v, path)
    codes = _list(o.get("RetryOnStatusCodes"), f"{path}.RetryOnStatusCodes")
    if not all(isinstance(c, int) and not isinstance(c, bool) and 100 <= c <= 599 for c in codes):
        raise ChainError(f"{path}.RetryOnStatusCodes: expected HTTP status codes (100-599)")
    retry_on = _list(o.get("RetryOn"), f"{path}.RetryOn")
    if not all(isinstance(c, str) for c in retry_on):
        raise ChainError(f"{path}.RetryOn: expected a list of strings")
    return RouteDestination(
        service=_str(o, "Service", path), subset=_str(o, "ServiceSubset", path),
        prefix_rewrite=_str(o, "PrefixRewrite", path),
        request_timeout=_seconds(o, "RequestTimeout", path), idle_timeout=_seconds(o, "IdleTimeout", path),
        num_retries=_int(o, "NumRetries", path), retry_on_connect_failure=_bool(o, "RetryOnConnectFailure", path),
        retry_on=tuple(retry_on), retry_on_status_codes=tuple(codes),
        request_headers=_header_mods(o.get("RequestHeaders"), f"{path}.RequestHeaders"),
        response_headers=_header_mods(o.get("ResponseHeaders"), f"{path}.ResponseHeaders"))


def _load_balancer(v: Any, path: str) -> LoadBalancer | None:
    if v is None:
        return None
    o = _obj(v, path)
    policies = []
    for i, h in enumerate(_list(o.get("HashPolicies"), f"{path}.HashPolicies")):
        hp = f"{path}.HashPolicies[{i}]"
        ho = _obj(h, hp)
        cookie = _obj(ho.get("CookieConfig"), f"{hp}.CookieConfig")
        policies.append(HashPolicy(field=_str(ho, "Field", hp), field_value=_str(ho, "FieldValue", hp),
                                   source_ip=_bool(ho, "SourceIP", hp), terminal=_bool(ho, "Terminal", hp),
                                   cookie_ttl=_seconds(cookie, "TTL", f"{hp}.CookieConfig"),
                                   cookie_session=_bool(cookie, "Session", f"{hp}.CookieConfig"),
                                   cookie_path=_str(cookie, "Path", f"{hp}.CookieConfig")))
    ring = _obj(o.get("RingHashConfig"), f"{path}.RingHashConfig")
    least = _obj(o.get("LeastRequestConfig"), f"{path}.LeastRequestConfig")
    policy = _str(o, "Policy", path)
    if policy not in ("", "random", "round_robin", "least_request", "ring_hash", "maglev"):
        raise ChainError(f"{path}.Policy: unknown load balancing policy {policy!r}")
    return LoadBalancer(policy=policy, hash_policies=tuple(policies),
                        choice_count=max(2, _int(least, "ChoiceCount", f"{path}.LeastRequestConfig", 2)),
                        min_ring_size=_int(ring, "MinimumRingSize", f"{path}.RingHashConfig", 1024) or 1024,
                        max_ring_size=_int(ring, "MaximumRingSize", f"{path}.RingHashConfig", 8192) or 8192)


def _node(key: str, v: Any) -> Node:
    path = f"Nodes[{key!r}]"
    o = _obj(v, path)
    kind = _str(o, "Type", path)
    name = _str(o, "Name", path)
    lb = _load_balancer(o.get("LoadBalancer"), f"{path}.LoadBalancer")
    if kind == "router":
        routes = []
        for i, r in enumerate(_list(o.get("Routes"), f"{path}.Routes")):
            rp = f"{path}.Routes[{i}]"
            ro = _obj(r, rp)
            definition = _obj(ro.get("Definition"), f"{rp}.Definition")
            match = _obj(definition.get("Match"), f"{rp}.Definition.Match")
            routes.append(Route(match=_http_match(match.get("HTTP"), f"{rp}.Definition.Match.HTTP"),
                                destination=_destination(definition.get("Destination"), f"{rp}.Definition.Destination"),
                                next_node=_required(ro, "NextNode", rp)))
        if not routes:
            raise ChainError(f"{path}.Routes: a router needs at least one route")
        return Node(type=kind, name=name, routes=tuple(routes), load_balancer=lb)
    if kind == "splitter":
        splits = []
        for i, s in enumerate(_list(o.get("Splits"), f"{path}.Splits")):
            sp = f"{path}.Splits[{i}]"
            so = _obj(s, sp)
            weight = so.get("Weight", 0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 100:
                raise ChainError(f"{sp}.Weight: expected a number from 0 to 100")
            d = _obj(so.get("Definition"), f"{sp}.Definition")
            splits.append(Split(weight=float(weight), next_node=_required(so, "NextNode", sp),
                                service=_str(d, "Service", f"{sp}.Definition"),
                                subset=_str(d, "ServiceSubset", f"{sp}.Definition"),
                                request_headers=_header_mods(d.get("RequestHeaders"),
                                                             f"{sp}.Definition.RequestHeaders"),
                                response_headers=_header_mods(d.get("ResponseHeaders"),
                                                              f"{sp}.Definition.ResponseHeaders")))
        if not splits:
            raise ChainError(f"{path}.Splits: a splitter needs at least one split")
        return Node(type=kind, name=name, splits=tuple(splits), load_balancer=lb)
    if kind == "resolver":
        rp = f"{path}.Resolver"
        r = _obj(o.get("Resolver"), rp)
        failover = _obj(r.get("Failover"), f"{rp}.Failover")
        targets = _list(failover.get("Targets"), f"{rp}.Failover.Targets")
        if not all(isinstance(t, str) for t in targets):
            raise ChainError(f"{rp}.Failover.Targets: expected a list of target IDs")
        return Node(type=kind, name=name, target=_required(r, "Target", rp),
                    connect_timeout=_seconds(r, "ConnectTimeout", rp, default=5.0),
                    request_timeout=_seconds(r, "RequestTimeout", rp, ns_numbers=True),
                    default=_bool(r, "Default", rp), failover=tuple(targets), load_balancer=lb)
    raise ChainError(f"{path}.Type: expected router, splitter or resolver, got {kind!r}")


def _required(o: Mapping[str, Any], key: str, path: str) -> str:
    v = _str(o, key, path)
    if not v:
        raise ChainError(f"{path}.{key}: required")
    return v


def _target(key: str, v: Any) -> Target:
    path = f"Targets[{key!r}]"
    o = _obj(v, path)
    subset = _obj(o.get("Subset"), f"{path}.Subset")
    gw = _obj(o.get("MeshGateway"), f"{path}.MeshGateway")
    service = _required(o, "Service", path)
    tid = _str(o, "ID", path) or key
    if tid != key:
        raise ChainError(f"{path}.ID: {tid!r} differs from its key")
    return Target(id=tid, service=service, subset=_str(o, "ServiceSubset", path),
                  namespace=_str(o, "Namespace", path) or "default", partition=_str(o, "Partition", path) or "default",
                  datacenter=_str(o, "Datacenter", path), peer=_str(o, "Peer", path),
                  filter=_str(subset, "Filter", f"{path}.Subset"),
                  only_passing=_bool(subset, "OnlyPassing", f"{path}.Subset"),
                  connect_timeout=_seconds(o, "ConnectTimeout", path, default=5.0), sni=_str(o, "SNI", path),
                  external=_bool(o, "External", path), mesh_gateway_mode=_str(gw, "Mode", f"{path}.MeshGateway"))


def parse_chain(doc: Any) -> CompiledChain:
    """A ``Chain`` object (or the whole ``{"Chain": ...}`` answer) -> CompiledChain; ChainError when bad."""
    o = _obj(doc, "Chain")
    if "Chain" in o and "ServiceName" not in o:
        o = _obj(o["Chain"], "Chain")
    raw_nodes = _obj(o.get("Nodes"), "Nodes")
    raw_targets = _obj(o.get("Targets"), "Targets")
    if len(raw_nodes) > MAX_NODES:
        raise ChainError(f"Nodes: more than {MAX_NODES} nodes")
    if len(raw_targets) > MAX_TARGETS:
        raise ChainError(f"Targets: more than {MAX_TARGETS} targets")
    nodes = {str(k): _node(str(k), v) for k, v in raw_nodes.items()}
    targets = {str(k): _target(str(k), v) for k, v in raw_targets.items()}
    start = _required(o, "StartNode", "Chain")
    if start not in nodes:
        raise ChainError(f"StartNode: {start!r} is not in Nodes")
    for key, node in nodes.items():
        for i, r in enumerate(node.routes):
            if r.next_node not in nodes:
                raise ChainError(f"Nodes[{key!r}].Routes[{i}].NextNode: {r.next_node!r} is not in Nodes")
        for i, s in enumerate(node.splits):
            if s.next_node not in nodes:
                raise ChainError(f"Nodes[{key!r}].Splits[{i}].NextNode: {s.next_node!r} is not in Nodes")
        if node.type == "resolver":
            for tid in (node.target, *node.failover):
                if tid not in targets:
                    raise ChainError(f"Nodes[{key!r}].Resolver: target {tid!r} is not in Targets")
    meta = _obj(o.get("ServiceMeta"), "ServiceMeta")
    return CompiledChain(
        service_name=_required(o, "ServiceName", "Chain"), protocol=_str(o, "Protocol", "Chain") or "tcp",
        start_node=start, nodes=nodes, targets=targets, namespace=_str(o, "Namespace", "Chain") or "default",
        partition=_str(o, "Partition", "Chain") or "default", datacenter=_str(o, "Datacenter", "Chain"),
        default=_bool(o, "Default", "Chain"), customization_hash=_str(o, "CustomizationHash", "Chain"),
        service_meta={str(k): str(v) for k, v in meta.items()})


def default_chain(service: str, datacenter: str = "dc1", protocol: str = "tcp") -> CompiledChain:
    """The chain of a service no config entry touches: one default resolver, one target."""
    tid = f"{service}.default.default.{datacenter}"
    return CompiledChain(service_name=service, protocol=protocol, start_node=f"resolver:{tid}",
                         nodes={f"resolver:{tid}": Node(type="resolver", name=tid, target=tid, default=True)},
                         targets={tid: Target(id=tid, service=service, datacenter=datacenter)},
                         datacenter=datacenter, default=True)
