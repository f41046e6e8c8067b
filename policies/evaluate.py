"""The evaluator: one authorization decision from a compiled table (pure; the sidecar's hot path).

``authorize(table, source, request)`` answers for the table's destination whether ``source`` (a
service name or a SPIFFE ID ``spiffe://<td>/ns/default/dc/<dc>/svc/<service>``) may make
``request`` (:data:`policies.model.TCP`, an :class:`~policies.model.HttpRequest` or a
:class:`~policies.model.GrpcRequest`), with Consul's semantics:

* Only the highest-precedence intention matching the source decides (9 ``src -> dst``, 8
  ``* -> dst``, 6 ``src -> *``, 5 ``* -> *``); lower ones are never consulted.
* At equal precedence deny wins: when one source/destination pair is defined by both intention
  sources, a request is allowed only if every definition allows it.
* An L7 rule's permissions are read top to bottom; the first whose HTTP conditions all match is
  final. When none matches, the table's default policy decides (not a lower intention).
* A gRPC call ``/pkg.Svc/Method`` is matched as an HTTP ``POST`` of that path; its metadata are the
  headers, plus ``content-type: application/grpc`` and ``te: trailers`` unless given. HTTP paths
  are matched without their query string (Envoy's ``url_path``); regexes must match the whole value;
  header names are case-insensitive. A header condition on a header the request lacks does not
  match, even inverted, except ``Present`` + ``Invert`` (Envoy's rule). A header sent more than
  once (:class:`~policies.model.RepeatedHeader`) matches only when the condition holds for every
  value (inverted: for none), so the policy checks whichever copy the app reads.
* A TCP connection decided by an L7 rule is denied with ``per_request=True``: an HTTP or gRPC
  listener must accept the connection and authorize each request instead.
* No matching intention: the default policy. A SPIFFE ID outside namespace ``default`` matches no
  intention (wildcards name services of the default namespace only).
* Audit mode turns a denial into ``allowed=True, audited=True``.

Speed: the first call on a table builds an index (source name -> precomputed decision or compiled
L7 matchers), stored on the table; L4 decisions are then one dict lookup. Decisions for L4 rules
and per-permission outcomes are prebuilt objects, so a call allocates nothing on those paths.
"""

from __future__ import annotations

import re
from collections import ChainMap
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ca.identity import DEFAULT_NAMESPACE, IdentityError, SpiffeId
from policies.model import (
    WILDCARD,
    CompiledRule,
    CompiledTable,
    Decision,
    GrpcRequest,
    HeaderMatch,
    HttpMatch,
    HttpRequest,
    RepeatedHeader,
    Request,
    TcpRequest,
)

__all__ = ["authorize", "prepare", "source_service"]

_SPIFFE = "spiffe://"
_SPIFFE_CACHE: dict[str, str | None] = {}
_SPIFFE_CACHE_MAX = 65536
_NOT_DEFAULT_NS = "\x00not-default-namespace"

_Matcher = Callable[[str, str, Mapping[str, str]], bool]
# Headers every gRPC request has on the wire (gRPC over HTTP/2), which a rule may match on even when
# the sidecar's metadata view omits them.
_GRPC_HEADERS = {"content-type": "application/grpc", "te": "trailers"}


def source_service(source: str) -> str | None:
    """The service name a source designates, or None when it is not a valid service identity.

    A plain name is returned as is; a SPIFFE ID is parsed (and cached). A SPIFFE ID of another
    namespace than ``default`` yields a name that no intention can name.
    """
    if not source.startswith(_SPIFFE):
        return source
    cached = _SPIFFE_CACHE.get(source, _NOT_DEFAULT_NS)
    if cached is not _NOT_DEFAULT_NS:
        return cached
    try:
        ident = SpiffeId.parse(source)
        name: str | None = ident.service if ident.namespace == DEFAULT_NAMESPACE else _NOT_DEFAULT_NS
    except IdentityError:
        name = None
    if len(_SPIFFE_CACHE) >= _SPIFFE_CACHE_MAX:
        _SPIFFE_CACHE.clear()
    _SPIFFE_CACHE[source] = name
    return name


def authorize(table: CompiledTable, source: str, request: Request) -> Decision:
    """Decide whether ``source`` may make ``request`` to the table's destination. See module doc."""
    prep: _Prepared | None = table._prepared
    if prep is None:
        prep = prepare(table)
    name = source if not source.startswith(_SPIFFE) else source_service(source)
    if name is None:
        return _invalid_source(table, source)
    verdict = prep.by_source.get(name)
    if verdict is None:
        verdict = prep.foreign if name is _NOT_DEFAULT_NS else prep.fallback
    fixed = verdict.fixed
    if fixed is not None:
        return fixed
    cls = request.__class__
    if cls is GrpcRequest:
        grpc_req: GrpcRequest = request  # type: ignore[assignment]
        metadata: Mapping[str, str] = grpc_req.metadata
        if prep.grpc_defaults and not all(k in metadata for k in _GRPC_HEADERS):
            metadata = ChainMap(dict(metadata), _GRPC_HEADERS)  # what every gRPC request carries on the wire
        return verdict.evaluate("POST", grpc_req.method, metadata)
    if cls is HttpRequest:
        http_req: HttpRequest = request  # type: ignore[assignment]
        path = http_req.path
        if "?" in path or "#" in path:
            path = path.split("?", 1)[0].split("#", 1)[0]
        return verdict.evaluate(http_req.method, path, http_req.headers)
    if cls is TcpRequest:
        return verdict.tcp
    raise TypeError(f"request must be TcpRequest, HttpRequest or GrpcRequest, not {type(request).__name__}")


def _invalid_source(table: CompiledTable, source: str) -> Decision:
    return Decision(allowed=False, reason=f"source {source[:200]!r} is not a service SPIFFE ID; denied "
                    f"regardless of the default policy of {table.destination!r}")


# --------------------------------------------------------------------------------------------
# Preparation
# --------------------------------------------------------------------------------------------


class _Verdict:
    """What decides for one source: a fixed decision, or L7 rules evaluated per request."""

    __slots__ = ("fixed", "rules", "tcp")

    def __init__(self, fixed: Decision | None, tcp: Decision, rules: tuple[_RuleEval, ...]) -> None:
        self.fixed = fixed
        self.tcp = tcp
        self.rules = rules

    def evaluate(self, method: str, path: str, headers: Mapping[str, str]) -> Decision:
        rules = self.rules
        if len(rules) == 1:
            return rules[0].evaluate(method, path, headers)
        return _combine([r.evaluate(method, path, headers) for r in rules])


@dataclass(slots=True)
class _Prepared:
    by_source: dict[str, _Verdict]
    fallback: _Verdict
    foreign: _Verdict
    grpc_defaults: bool  # some rule matches a header that gRPC always sends


class _RuleEval:
    """One rule ready to evaluate: constant for L4; ordered matchers for L7."""

    __slots__ = ("constant", "no_match", "perms", "tcp")

    def __init__(self, rule: CompiledRule, table: CompiledTable) -> None:
        audit = rule.mode == "audit"
        self.perms: tuple[tuple[_Matcher, Decision], ...] = ()
        if not rule.is_l7:
            allow = rule.action == "allow"
            verb = "allows" if allow else "denies"
            self.constant: Decision | None = _decision(allow, audit, rule, None, False,
                                                       f"intention {rule.rule_id} {verb}")
            self.tcp = self.constant
            self.no_match = self.constant
            return
        self.constant = None
        perms = []
        for i, perm in enumerate(rule.permissions):
            allow = perm.action == "allow"
            verb = "allows" if allow else "denies"
            perms.append((_compile_http(perm.http),
                          _decision(allow, audit, rule, i, True,
                                    f"intention {rule.rule_id} Permissions[{i}] {verb} ({_describe(perm.http)})")))
        self.perms = tuple(perms)
        default_allow = table.default_policy == "allow"
        self.no_match = _decision(default_allow, audit, rule, None, True,
                                  f"no permission of intention {rule.rule_id} matched; default policy "
                                  f"{table.default_policy}")
        self.tcp = _decision(False, audit, rule, None, True,
                             f"intention {rule.rule_id} has L7 permissions: authorized per HTTP/gRPC request; "
                             "a plain TCP connection is denied")

    def evaluate(self, method: str, path: str, headers: Mapping[str, str]) -> Decision:
        if self.constant is not None:
            return self.constant
        for matches, decision in self.perms:
            if matches(method, path, headers):
                return decision
        return self.no_match


def _decision(allow: bool, audit: bool, rule: CompiledRule | None, permission: int | None, per_request: bool,
              reason: str) -> Decision:
    if not allow and audit:
        return Decision(allowed=True, audited=True, rule=rule, permission=permission, per_request=per_request,
                        reason=f"audit mode: would deny: {reason}")
    return Decision(allowed=allow, rule=rule, permission=permission, per_request=per_request, reason=reason)


def _combine(decisions: list[Decision]) -> Decision:
    """Equal precedence: an enforced denial wins, then a would-be (audited) denial, then the first allow."""
    audited: Decision | None = None
    for d in decisions:
        if not d.allowed:
            return d
        if d.audited and audited is None:
            audited = d
    return audited or decisions[0]


def _make_verdict(group: list[CompiledRule], table: CompiledTable) -> _Verdict:
    evals = tuple(_RuleEval(r, table) for r in group)
    tcp = _combine([e.tcp for e in evals])
    constants = [e.constant for e in evals]
    if all(c is not None for c in constants):
        fixed: Decision | None = _combine([c for c in constants if c is not None])
    elif any(c is not None and not c.allowed for c in constants):
        # an enforced L4 deny at the same precedence decides every request
        fixed = next(c for c in constants if c is not None and not c.allowed)
    else:
        fixed = None
    return _Verdict(fixed, tcp, evals)


def _default_verdict(table: CompiledTable, reason: str) -> _Verdict:
    allow = table.default_policy == "allow"
    d = _decision(allow, table.default_mode == "audit", None, None, False, reason)
    return _Verdict(d, d, ())


def prepare(table: CompiledTable) -> _Prepared:
    """Build (once) and store the table's lookup index. Safe to call concurrently: idempotent."""
    by_prec: dict[str, dict[int, list[CompiledRule]]] = {}
    for rule in table.rules:
        by_prec.setdefault(rule.source, {}).setdefault(rule.precedence, []).append(rule)
    wild = by_prec.get(WILDCARD, {})
    no_rule = (f"no intention matches {{src}} -> {table.destination}; default policy {table.default_policy}")
    if wild:
        fallback = _make_verdict(wild[max(wild)], table)
    else:
        fallback = _default_verdict(table, no_rule.format(src="this source"))
    by_source: dict[str, _Verdict] = {}
    for source, precs in by_prec.items():
        if source == WILDCARD:
            continue
        top = max(precs)
        wild_top = max(wild) if wild else -1
        if wild_top > top:
            by_source[source] = fallback
        elif wild_top == top:  # cannot happen with Consul's precedences, kept for safety
            by_source[source] = _make_verdict(precs[top] + wild[wild_top], table)
        else:
            by_source[source] = _make_verdict(precs[top], table)
    foreign = _default_verdict(table, f"source is outside namespace {DEFAULT_NAMESPACE!r}, which no intention "
                                      f"names; default policy {table.default_policy}")
    grpc_defaults = any(h.name.lower() in _GRPC_HEADERS for r in table.rules for p in r.permissions
                        for h in p.http.headers)
    prep = _Prepared(by_source=by_source, fallback=fallback, foreign=foreign, grpc_defaults=grpc_defaults)
    object.__setattr__(table, "_prepared", prep)
    return prep


# --------------------------------------------------------------------------------------------
# L7 matchers
# --------------------------------------------------------------------------------------------


def _describe(m: HttpMatch) -> str:
    parts = []
    if m.methods:
        parts.append("|".join(m.methods))
    if m.path_exact:
        parts.append(f"path == {m.path_exact}")
    if m.path_prefix:
        parts.append(f"path prefix {m.path_prefix}")
    if m.path_regex:
        parts.append(f"path ~ {m.path_regex}")
    for h in m.headers:
        parts.append(_describe_header(h))
    return ", ".join(parts) or "any request"


def _describe_header(h: HeaderMatch) -> str:
    neg = "not " if h.invert else ""
    if h.present:
        return f"header {h.name} {neg}present"
    for what, value in (("==", h.exact), ("prefix", h.prefix), ("suffix", h.suffix), ("~", h.regex)):
        if value:
            return f"header {h.name} {neg}{what} {value}"
    return f"header {h.name}"


def _compile_http(m: HttpMatch) -> _Matcher:
    checks: list[_Matcher] = []
    if m.path_exact:
        exact = m.path_exact
        checks.append(lambda method, path, headers: path == exact)
    elif m.path_prefix:
        prefix = m.path_prefix
        checks.append(lambda method, path, headers: path.startswith(prefix))
    elif m.path_regex:
        full = re.compile(m.path_regex).fullmatch
        checks.append(lambda method, path, headers: full(path) is not None)
    if m.methods:
        methods = frozenset(m.methods)
        checks.append(lambda method, path, headers: method in methods)
    for h in m.headers:
        checks.append(_compile_header(h))
    if not checks:
        return lambda method, path, headers: True
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        a, b = checks
        return lambda method, path, headers: a(method, path, headers) and b(method, path, headers)
    all_checks = tuple(checks)
    return lambda method, path, headers: all(c(method, path, headers) for c in all_checks)


def _compile_header(h: HeaderMatch) -> _Matcher:
    name = h.name.lower()
    invert = h.invert
    test: Callable[[str], bool]
    if h.present:
        def present(method: str, path: str, headers: Mapping[str, str]) -> bool:
            return (_header(name, method, path, headers) is not None) != invert
        return present
    if h.exact:
        test = _equals(h.exact)
    elif h.prefix:
        test = _startswith(h.prefix)
    elif h.suffix:
        test = _endswith(h.suffix)
    else:
        full = re.compile(h.regex).fullmatch
        def test(value: str) -> bool:
            return full(value) is not None

    def match(method: str, path: str, headers: Mapping[str, str]) -> bool:
        value = _header(name, method, path, headers)
        if value is None:
            return False
        if value.__class__ is RepeatedHeader:  # sent more than once: every copy must pass
            return all(test(v) != invert for v in value.values)  # type: ignore[attr-defined]
        return test(value) != invert

    return match


def _equals(expected: str) -> Callable[[str], bool]:
    return lambda value: value == expected


def _startswith(prefix: str) -> Callable[[str], bool]:
    return lambda value: value.startswith(prefix)


def _endswith(suffix: str) -> Callable[[str], bool]:
    return lambda value: value.endswith(suffix)


def _header(name: str, method: str, path: str, headers: Mapping[str, str]) -> str | None:
    if name[0] == ":":
        if name == ":method":
            return method
        if name == ":path":
            return path
    return headers.get(name)
