"""Who may have which identity: Consul ACL rules, evaluated the way Consul evaluates them.

A caller may receive the identity of service ``S`` when its token has ``service:write`` on ``S``:
through a policy rule (``service "S"`` beats the longest matching ``service_prefix``; among the
token's policies, deny beats write beats read), or a service identity ``ServiceName = S`` (which
Consul expands to ``service "S"`` and ``service "S-sidecar-proxy"`` with write), directly on the
token or on one of its roles. The global-management policy grants everything. A resource no rule
covers is denied (Consul's recommended ``default_policy = "deny"``).

Rotating the roots needs ``operator = "write"`` (as changing Consul's CA configuration does).

The parsing and evaluation are pure; :class:`TokenAuthorizer` fetches documents through
:class:`ca.backend.AclApi`.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from ca.backend import AclApi, TokenRejected

GLOBAL_MANAGEMENT_ID = "00000000-0000-0000-0000-000000000001"
_RANK = {"deny": 3, "write": 2, "read": 1, "list": 0}


def _unquote(s: Any) -> str:
    text = str(s)
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


@dataclass
class Rules:
    """The parts of a Consul ACL policy the CA cares about."""

    service: dict[str, str] = field(default_factory=dict)
    service_prefix: dict[str, str] = field(default_factory=dict)
    operator: str | None = None

    def merge(self, other: Rules) -> Rules:
        out = Rules(dict(self.service), dict(self.service_prefix), self.operator)
        for mine, theirs in ((out.service, other.service), (out.service_prefix, other.service_prefix)):
            for name, policy in theirs.items():
                mine[name] = _stronger(mine.get(name), policy)
        if other.operator is not None:
            out.operator = _stronger(out.operator, other.operator)
        return out


def _stronger(a: str | None, b: str) -> str:
    if a is None:
        return b
    return a if _RANK.get(a, -1) >= _RANK.get(b, -1) else b


def _blocks(value: Any) -> list[tuple[str, Any]]:
    """Normalise ``service "x" {...}`` from HCL (list of dicts) or JSON (dict) to (label, body) pairs."""
    out: list[tuple[str, Any]] = []
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, dict):
            for label, body in item.items():
                if isinstance(body, list):
                    out.extend((_unquote(label), b) for b in body)
                else:
                    out.append((_unquote(label), body))
    return out


def parse_rules(text: str) -> Rules:
    """Parse a Consul policy's ``Rules`` (HCL or JSON); raises ValueError if it is neither."""
    cached = _parse_cached(text)
    return Rules(dict(cached.service), dict(cached.service_prefix), cached.operator)


@functools.lru_cache(maxsize=1024)
def _parse_cached(text: str) -> Rules:
    """Parsing HCL costs milliseconds; policies change rarely, so parse each text once."""
    if not text.strip():
        return Rules()
    doc: Any
    try:
        doc = json.loads(text)
    except ValueError:
        import hcl2  # python-hcl2

        try:
            doc = hcl2.loads(text)
        except Exception as exc:
            raise ValueError(f"policy rules are neither JSON nor HCL: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError("policy rules must be an object")
    rules = Rules()
    for kind, target in (("service", rules.service), ("service_prefix", rules.service_prefix)):
        for label, body in _blocks(doc.get(kind, [])):
            if isinstance(body, dict) and "policy" in body:
                policy = _unquote(body["policy"])
                target[label] = _stronger(target.get(label), policy)
    if "operator" in doc:
        op = doc["operator"]
        rules.operator = _unquote(op[0] if isinstance(op, list) and op else op)
    return rules


def service_access(rules: Rules, service: str) -> tuple[str | None, str]:
    """The access rules give to ``service`` and the rule that decided (exact, then longest prefix)."""
    if service in rules.service:
        return rules.service[service], f'service "{service}"'
    best: str | None = None
    for prefix in rules.service_prefix:
        if service.startswith(prefix) and (best is None or len(prefix) > len(best)):
            best = prefix
    if best is not None:
        return rules.service_prefix[best], f'service_prefix "{best}"'
    return None, "no rule (default deny)"


def identities_grant(service_identities: list[dict[str, Any]], service: str, datacenter: str) -> bool:
    for si in service_identities or []:
        name = str(si.get("ServiceName", ""))
        dcs = si.get("Datacenters") or []
        if dcs and datacenter not in dcs:
            continue
        if service in (name, f"{name}-sidecar-proxy"):
            return True
    return False


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str


def decide_service_write(token: dict[str, Any], policies: list[dict[str, Any]], roles: list[dict[str, Any]],
                         service: str, datacenter: str) -> Decision:
    """Whether a token (with its policies and roles fetched) has ``service:write`` on ``service``."""
    accessor = str(token.get("AccessorID", "?"))[:8]
    identities = list(token.get("ServiceIdentities") or [])
    for role in roles:
        identities.extend(role.get("ServiceIdentities") or [])
    if identities_grant(identities, service, datacenter):
        return Decision(True, f"token {accessor}… has a service identity for {service!r}")
    if any(p.get("ID") == GLOBAL_MANAGEMENT_ID for p in policies):
        return Decision(True, f"token {accessor}… has the global-management policy")
    merged = Rules()
    for p in policies:
        merged = merged.merge(parse_rules(str(p.get("Rules", ""))))
    access, rule = service_access(merged, service)
    if access == "write":
        return Decision(True, f"token {accessor}… has service:write on {service!r} by {rule}")
    return Decision(False, f"token {accessor}… lacks service:write on {service!r} "
                           f"({rule} gives {access or 'nothing'})")


def decide_operator_write(token: dict[str, Any], policies: list[dict[str, Any]]) -> Decision:
    accessor = str(token.get("AccessorID", "?"))[:8]
    if any(p.get("ID") == GLOBAL_MANAGEMENT_ID for p in policies):
        return Decision(True, f"token {accessor}… has the global-management policy")
    merged = Rules()
    for p in policies:
        merged = merged.merge(parse_rules(str(p.get("Rules", ""))))
    if merged.operator == "write":
        return Decision(True, f"token {accessor}… has operator:write")
    return Decision(False, f"token {accessor}… lacks operator:write (has {merged.operator or 'nothing'})")


class TokenAuthorizer:
    """Fetches a token's policies and roles through :class:`AclApi` and decides.

    Whether ACLs are enabled is learnt once, with the CA's own token (:meth:`acls_enabled`, re-checked by
    the CA's upkeep); it is never inferred from a caller's request, so an empty or odd token can not
    turn checks off. Policy and role documents are cached for ``cache_s`` seconds; the token itself is
    looked up on every call, so a deleted token stops working at once.
    """

    def __init__(self, api: AclApi, datacenter: str, cache_s: float = 10.0) -> None:
        self._api = api
        self._dc = datacenter
        self._cache_s = cache_s
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self.enabled = True  # fail closed until told otherwise

    async def acls_enabled(self, own_token: str) -> bool:
        try:
            self.enabled = await self._api.token_self(own_token) is not None
        except TokenRejected:
            self.enabled = True
        return self.enabled

    async def _cached(self, kind: str, ident: str) -> dict[str, Any]:
        key = f"{kind}:{ident}"
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self._cache_s:
            return hit[1]
        doc = await (self._api.policy(ident) if kind == "policy" else self._api.role(ident))
        self._cache[key] = (now, doc)
        return doc

    async def _expand(self, token: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        roles = [await self._cached("role", str(r["ID"])) for r in token.get("Roles") or [] if r.get("ID")]
        links = list(token.get("Policies") or [])
        for role in roles:
            links.extend(role.get("Policies") or [])
        policies: list[dict[str, Any]] = []
        seen: set[str] = set()
        for link in links:
            pid = str(link.get("ID", ""))
            if pid and pid not in seen:
                seen.add(pid)
                if pid == GLOBAL_MANAGEMENT_ID:
                    policies.append({"ID": pid, "Rules": ""})
                else:
                    policies.append(await self._cached("policy", pid))
        return policies, roles

    async def _lookup(self, token: str) -> dict[str, Any] | Decision:
        if not token:
            return Decision(False, "no ACL token given; a token with service:write is required")
        try:
            doc = await self._api.token_self(token)
        except TokenRejected:
            return Decision(False, "the ACL token is not known to Consul (deleted, expired or mistyped)")
        if doc is None:
            return Decision(False, "Consul answered that ACLs are disabled, but they were enabled when the CA "
                                   "started; refusing until the CA re-checks")
        return doc

    async def may_write_service(self, token: str, service: str) -> Decision | None:
        """The decision, or ``None`` when ACLs are disabled (anyone may)."""
        if not self.enabled:
            return None
        doc = await self._lookup(token)
        if isinstance(doc, Decision):
            return doc
        policies, roles = await self._expand(doc)
        return decide_service_write(doc, policies, roles, service, self._dc)

    async def may_operate(self, token: str) -> Decision | None:
        if not self.enabled:
            return None
        doc = await self._lookup(token)
        if isinstance(doc, Decision):
            return Decision(False, doc.reason.replace("service:write", "operator:write"))
        policies, _ = await self._expand(doc)
        return decide_operator_write(doc, policies)
