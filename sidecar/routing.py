"""Per-call routing through a compiled discovery chain (pure: no I/O, randomness passed in).

``route_call(chain, request, draw)`` walks the chain as Envoy walks the routes Consul generates:

- router: the first route whose match holds (path exact / prefix / regex over the path without its
  query string, every header and query-parameter condition, the method list); gRPC calls are HTTP
  requests whose path is ``/pkg.Service/Method``, so a route on ``PathPrefix "/pkg.Service/"`` or
  ``PathExact "/pkg.Service/Method"`` picks gRPC methods. The compiler adds a catch-all route, so a
  router always ends somewhere unless none of its routes matches (no route: the call is refused);
- splitter: a weighted pick per call (``draw`` in [0, 100) decides: weights are percentages);
- resolver: its target (and the failover targets, in order, for when no endpoint of it is healthy).

The result (``RouteDecision``) carries what the call path applies: the rewritten path (``PrefixRewrite``
replaces the matched prefix, or the whole path for an exact match), the request timeout (the route's
``RequestTimeout``, else the resolver's), the idle timeout, the retry policy, header modifications
and labels for metrics (route index, target subset).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl

from catalog.chain import (
    CompiledChain,
    HeaderMatch,
    HeaderMods,
    HttpMatch,
    Node,
    QueryMatch,
    RouteDestination,
    Target,
)

GRPC_STATUS = {"cancelled": 1, "deadline-exceeded": 4, "resource-exhausted": 8, "internal": 13, "unavailable": 14}
GATEWAY_ERRORS = (502, 503, 504)
RETRIABLE_4XX = (409,)
MAX_PATH = 8192


@dataclass(frozen=True)
class Request:
    """What routing looks at: method, path with query, headers (lower-case names; repeated ones joined
    with ",")."""

    method: str
    path: str
    headers: Mapping[str, str]


@dataclass(frozen=True)
class RetryPolicy:
    """Envoy's retry policy from a route destination (Consul's getRetryPolicyForDestination)."""

    num_retries: int = 0
    conditions: frozenset[str] = frozenset()
    status_codes: frozenset[int] = frozenset()

    @property
    def enabled(self) -> bool:
        return self.num_retries > 0 and bool(self.conditions or self.status_codes)


NO_RETRIES = RetryPolicy()


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended, as far as retrying cares."""

    connect_failure: bool = False
    reset: bool = False  # the stream or connection broke before a response arrived
    refused_stream: bool = False
    http_status: int = 0  # 0: no response headers
    grpc_status: int = -1  # -1: none (a trailers-only gRPC answer has one in its headers)
    mesh_ratelimited: bool = False  # a 429 / RESOURCE_EXHAUSTED that a Weft rate limit produced


@dataclass(frozen=True)
class RouteDecision:
    route_index: int  # -1: no router on the chain
    target: Target
    failover: tuple[Target, ...]
    path: str  # after PrefixRewrite; "" when the call's path is unchanged
    request_timeout: float  # seconds, 0 = none
    idle_timeout: float
    retry: RetryPolicy
    connect_timeout: float
    request_headers: tuple[HeaderMods, ...] = ()
    response_headers: tuple[HeaderMods, ...] = ()
    resolver_node: str = ""

    @property
    def subset(self) -> str:
        return self.target.subset

    @property
    def route_label(self) -> str:
        return "default" if self.route_index < 0 else str(self.route_index)


class NoRoute(LookupError):
    """No route of the chain's router matches the request."""


def retry_policy(dest: RouteDestination) -> RetryPolicy:
    conditions = set(dest.retry_on)
    if dest.retry_on_connect_failure:
        conditions.add("connect-failure")
    has = dest.num_retries > 0 or bool(conditions) or bool(dest.retry_on_status_codes)
    if not has:
        return NO_RETRIES
    # Envoy retries once when a policy exists without num_retries
    return RetryPolicy(num_retries=dest.num_retries or 1, conditions=frozenset(conditions),
                       status_codes=frozenset(dest.retry_on_status_codes))


def retryable(policy: RetryPolicy, outcome: Outcome) -> bool:
    """Whether ``outcome`` is one of the policy's retry conditions (Envoy's x-envoy-retry-on semantics)."""
    c = policy.conditions
    if outcome.connect_failure:
        return "connect-failure" in c or "5xx" in c or "gateway-error" in c
    if outcome.refused_stream:
        return "refused-stream" in c or "reset" in c or "5xx" in c
    if outcome.reset:
        return "reset" in c or "5xx" in c or "gateway-error" in c
    s = outcome.http_status
    if outcome.grpc_status >= 0 and s in (0, 200):
        return any(GRPC_STATUS.get(name) == outcome.grpc_status for name in c)
    if s >= 500 and "5xx" in c:
        return True
    if s in GATEWAY_ERRORS and "gateway-error" in c:
        return True
    if s in RETRIABLE_4XX and "retriable-4xx" in c:
        return True
    if s == 429 and outcome.mesh_ratelimited and "envoy-ratelimited" in c:
        return True
    return s in policy.status_codes


# ----- matching -----
def _split(path: str) -> tuple[str, str]:
    p, _, q = path.partition("?")
    return p, q


def _header_ok(m: HeaderMatch, headers: Mapping[str, str]) -> bool:
    value = headers.get(m.name)
    if m.present:
        ok = value is not None
    elif value is None:
        ok = False
    elif m.exact:
        ok = value == m.exact
    elif m.prefix:
        ok = value.startswith(m.prefix)
    elif m.suffix:
        ok = value.endswith(m.suffix)
    elif m.regex is not None:
        ok = m.regex.fullmatch(value) is not None
    else:
        ok = value is not None
    return ok != m.invert


def _query_ok(m: QueryMatch, query: Sequence[tuple[str, str]]) -> bool:
    values = [v for k, v in query if k == m.name]
    if m.present:
        return bool(values)
    if not values:
        return False
    v = values[0]
    if m.exact:
        return v == m.exact
    if m.regex is not None:
        return m.regex.fullmatch(v) is not None
    return True


def matches(m: HttpMatch, method: str, path: str, headers: Mapping[str, str],
            query: Sequence[tuple[str, str]]) -> bool:
    if m.path_exact and path != m.path_exact:
        return False
    if m.path_prefix and not path.startswith(m.path_prefix):
        return False
    if m.path_regex is not None and m.path_regex.fullmatch(path) is None:
        return False
    if m.methods and method.upper() not in m.methods:
        return False
    if not all(_header_ok(h, headers) for h in m.headers):
        return False
    return all(_query_ok(q, query) for q in m.query)


def rewrite(path: str, query: str, m: HttpMatch, prefix_rewrite: str) -> str:
    if not prefix_rewrite:
        return path + (f"?{query}" if query else "")
    if m.path_exact:
        new = prefix_rewrite
    elif m.path_prefix:
        new = prefix_rewrite + path[len(m.path_prefix):]
    else:
        new = path
    return new + (f"?{query}" if query else "")


def pick_split(node: Node, draw: float) -> int:
    """The index of the split ``draw`` (uniform in [0, 100)) falls in; weights are percentages."""
    total = 0.0
    for i, s in enumerate(node.splits):
        total += s.weight
        if draw < total:
            return i
    return len(node.splits) - 1


Memo = dict[tuple[int, int], "RouteDecision"]


def route_call(chain: CompiledChain, request: Request, draw: float, memo: Memo | None = None) -> RouteDecision:
    """The route, split and target of one call; NoRoute when the router has no matching route.

    ``memo`` (one dict per chain, kept by the caller) holds the decision of each (route, split) pair
    once built: everything in it but the rewritten path is fixed by the chain, so the common call
    (no ``PrefixRewrite``) allocates nothing."""
    node = chain.start
    route_index = -1
    dest: RouteDestination | None = None
    new_path = ""
    if node.type == "router":
        path, query_text = _split(request.path[:MAX_PATH])
        query = parse_qsl(query_text, keep_blank_values=True, max_num_fields=100) if query_text else []
        for i, route in enumerate(node.routes):
            if matches(route.match, request.method, path, request.headers, query):
                route_index, dest = i, route.destination
                if dest.prefix_rewrite:
                    new_path = rewrite(path, query_text, route.match, dest.prefix_rewrite)
                node = chain.nodes[route.next_node]
                break
        else:
            raise NoRoute(f"no route of {chain.service_name} matches {request.method} {path}")
    split_index = -1
    if node.type == "splitter":
        split_index = pick_split(node, draw)
    key = (route_index, split_index)
    decision = memo.get(key) if memo is not None else None
    if decision is None:
        decision = _decision(chain, node, route_index, dest, split_index)
        if memo is not None and len(memo) < 4096:
            memo[key] = decision
    if new_path:
        decision = replace(decision, path=new_path)
    return decision


def _decision(chain: CompiledChain, node: Node, route_index: int, dest: RouteDestination | None,
              split_index: int) -> RouteDecision:
    dest = dest or RouteDestination()
    req_mods: list[HeaderMods] = []
    resp_mods: list[HeaderMods] = []
    if not dest.request_headers.empty:
        req_mods.append(dest.request_headers)
    if not dest.response_headers.empty:
        resp_mods.append(dest.response_headers)
    if split_index >= 0:
        split = node.splits[split_index]
        if not split.request_headers.empty:
            req_mods.append(split.request_headers)
        if not split.response_headers.empty:
            resp_mods.append(split.response_headers)
        node = chain.nodes[split.next_node]
    if node.type != "resolver":
        raise NoRoute(f"chain {chain.service_name}: the walk did not end at a resolver")
    resolver = node
    target = chain.targets[resolver.target]
    return RouteDecision(
        route_index=route_index, target=target, failover=tuple(chain.targets[t] for t in resolver.failover),
        path="", request_timeout=dest.request_timeout or resolver.request_timeout,
        idle_timeout=dest.idle_timeout, retry=retry_policy(dest), connect_timeout=resolver.connect_timeout,
        request_headers=tuple(req_mods), response_headers=tuple(resp_mods),
        resolver_node=f"resolver:{resolver.target}")


class RouteTable:
    """``route_call`` for one compiled chain, with what repeats from call to call kept.

    A call's route depends only on its method, its path (with the query) and the few headers the
    router's matches name (``header_names``), so the outcome of the router's walk is kept per
    (method, path, those header values) — gRPC calls repeat a handful of paths — and the regexes and
    header conditions run once per distinct request, not once per call. Each route's (or the chain
    start's) splitter becomes an array of cumulative weights searched with ``bisect`` (the same
    float sums as ``pick_split``), and each (route, split) decision is built once. Decisions are
    those ``route_call`` makes for the same chain, request and draw; the table is built anew when the
    chain changes. Memory is bounded: at most ``MAX_MEMO`` requests, and paths longer than
    ``MAX_MEMO_PATH`` are walked each time.
    """

    MAX_MEMO = 4096
    MAX_MEMO_PATH = 512

    __slots__ = ("_branches", "_memo", "_start", "chain", "header_names")

    def __init__(self, chain: CompiledChain) -> None:
        self.chain = chain
        start = chain.start
        self.header_names: tuple[str, ...] = tuple(sorted({h.name for r in start.routes for h in r.match.headers})) \
            if start.type == "router" else ()
        self._memo: dict[tuple[str | None, ...], tuple[_Branch, str] | str] = {}
        self._branches: dict[int, _Branch] = {}
        self._start = _Branch(chain, chain.start, -1, None) if start.type != "router" else None

    def _branch(self, route_index: int) -> _Branch:
        b = self._branches.get(route_index)
        if b is None:
            route = self.chain.start.routes[route_index]
            b = self._branches[route_index] = _Branch(self.chain, self.chain.nodes[route.next_node], route_index,
                                                       route.destination)
        return b

    def _walk(self, method: str, path: str, headers: Mapping[str, str]) -> tuple[_Branch, str] | str:
        """The router's walk (``route_call``'s): the branch and the rewritten path, or why no route matches."""
        chain = self.chain
        bare, query_text = _split(path[:MAX_PATH])
        query = parse_qsl(query_text, keep_blank_values=True, max_num_fields=100) if query_text else []
        for i, route in enumerate(chain.start.routes):
            if matches(route.match, method, bare, headers, query):
                dest = route.destination
                new_path = rewrite(bare, query_text, route.match, dest.prefix_rewrite) if dest.prefix_rewrite else ""
                return self._branch(i), new_path
        return f"no route of {chain.service_name} matches {method} {bare}"

    def decide(self, method: str, path: str, headers: Mapping[str, str], draw: float) -> RouteDecision:
        """The same decision as ``route_call(chain, Request(method, path, headers), draw)``."""
        branch = self._start
        new_path = ""
        if branch is None:
            names = self.header_names
            key = (method, path, *[headers.get(n) for n in names]) if names else (method, path)
            hit = self._memo.get(key)
            if hit is None:
                hit = self._walk(method, path, headers)
                if len(path) <= self.MAX_MEMO_PATH:
                    if len(self._memo) >= self.MAX_MEMO:
                        self._memo.clear()
                    self._memo[key] = hit
            if isinstance(hit, str):
                raise NoRoute(hit)
            branch, new_path = hit
        decision = branch.decision(draw)
        return replace(decision, path=new_path) if new_path else decision


class _Branch:
    """What follows one route (or the start of a chain without a router): its splitter's cumulative
    weights and the decision of each split, built on first use."""

    __slots__ = ("chain", "cumulative", "decisions", "dest", "node", "route_index")

    def __init__(self, chain: CompiledChain, node: Node, route_index: int, dest: RouteDestination | None) -> None:
        self.chain = chain
        self.node = node
        self.route_index = route_index
        self.dest = dest
        cumulative: list[float] = []
        total = 0.0
        for s in node.splits if node.type == "splitter" else ():
            total += s.weight
            cumulative.append(total)
        self.cumulative = tuple(cumulative)
        self.decisions: list[RouteDecision | None] = [None] * max(1, len(cumulative))

    def decision(self, draw: float) -> RouteDecision:
        cumulative = self.cumulative
        if cumulative:
            i = bisect_right(cumulative, draw)
            if i >= len(cumulative):
                i = len(cumulative) - 1
            d = self.decisions[i]
            if d is None:
                d = self.decisions[i] = _decision(self.chain, self.node, self.route_index, self.dest, i)
            return d
        d = self.decisions[0]
        if d is None:
            d = self.decisions[0] = _decision(self.chain, self.node, self.route_index, self.dest, -1)
        return d


def apply_header_mods(headers: list[tuple[str, str]], mods: Sequence[HeaderMods]) -> list[tuple[str, str]]:
    """Headers after Add (appended), Set (replaced) and Remove, in the order the mods apply."""
    out = list(headers)
    for m in mods:
        if m.remove:
            drop = set(m.remove)
            out = [(k, v) for k, v in out if k not in drop]
        for k, v in m.set:
            out = [(hk, hv) for hk, hv in out if hk != k]
            out.append((k, v))
        out.extend(m.add)
    return out

