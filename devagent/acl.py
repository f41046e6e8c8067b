"""ACL authorizers for the dev agent: the interface endpoints call, allow-all, and Consul's rule engine.

Pure: no I/O. Rules are Consul's rule language (HCL or JSON): ``service "web" { policy = "write" }``,
``service_prefix "" { policy = "read" }``, ``key``/``key_prefix``, ``node``/``node_prefix``,
``session``/``session_prefix``, ``event``/``event_prefix``, ``agent``/``agent_prefix``,
``query``/``query_prefix``, and the top-level ``acl``, ``operator``, ``keyring``, ``mesh``,
``peering`` = "read" | "write" | "deny". Precedence as Consul: for a segment an exact rule wins,
otherwise the longest matching prefix rule; when several policies of one token name the same rule,
deny wins, then the most permissive. No matching rule: the default policy (deny) decides.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"
ANONYMOUS_SECRET = "anonymous"
GLOBAL_MANAGEMENT_ID = "00000000-0000-0000-0000-000000000001"
GLOBAL_MANAGEMENT_NAME = "global-management"

DENY, READ, LIST, WRITE = "deny", "read", "list", "write"
_LEVELS = (DENY, READ, LIST, WRITE)

# resources with exact and prefix rules
SEGMENTED = ("service", "key", "node", "session", "event", "agent", "query")
# resources that are a single level
TOPLEVEL = ("acl", "operator", "keyring", "mesh", "peering")


class PermissionDenied(Exception):
    """Consul's 403: ``Permission denied: token with AccessorID '...' lacks permission 'key:write' on "x"``."""

    def __init__(self, accessor_id: str, permission: str, segment: str | None) -> None:
        on = f' on "{segment}"' if segment is not None else ""
        super().__init__(
            f"Permission denied: token with AccessorID '{accessor_id}' lacks permission '{permission}'{on}")
        self.permission = permission


class ACLNotFound(Exception):
    """An unknown token secret: Consul answers 403 ``ACL not found``."""

    def __init__(self) -> None:
        super().__init__("ACL not found")


class RuleError(ValueError):
    """Rules that do not parse; the message names the problem."""


class Authorizer:
    """What an endpoint asks. This base class allows everything (ACLs disabled).

    Boolean methods answer a question (for filtering lists); ``check(permission, segment)`` raises
    ``PermissionDenied`` (the HTTP layer turns it into Consul's 403). Permissions are named as
    Consul names them: ``service:read``, ``service:write``, ``key:read``, ``key:list``,
    ``key:write``, ``node:read``, ``node:write``, ``session:read``, ``session:write``,
    ``event:read``, ``event:write``, ``agent:read``, ``agent:write``, ``query:read``,
    ``query:write``, ``intention:read``, ``intention:write``, ``acl:read``, ``acl:write``,
    ``operator:read``, ``operator:write``, ``mesh:read``, ``mesh:write``, ``keyring:read``,
    ``keyring:write``, ``peering:read``, ``peering:write``.
    """

    accessor_id = ""
    management = True

    def allowed(self, resource: str, access: str, segment: str = "") -> bool:
        return True

    def key_write_prefix(self, prefix: str) -> bool:
        return True

    # convenience spellings -------------------------------------------------
    def service_read(self, name: str) -> bool:
        return self.allowed("service", READ, name)

    def service_write(self, name: str) -> bool:
        return self.allowed("service", WRITE, name)

    def service_write_any(self) -> bool:
        return self.allowed("service", WRITE, "")

    def key_read(self, key: str) -> bool:
        return self.allowed("key", READ, key)

    def key_list(self, key: str) -> bool:
        return self.allowed("key", LIST, key)

    def key_write(self, key: str) -> bool:
        return self.allowed("key", WRITE, key)

    def node_read(self, name: str) -> bool:
        return self.allowed("node", READ, name)

    def node_read_all(self) -> bool:
        return self.allowed("node", READ, "")

    def node_write(self, name: str) -> bool:
        return self.allowed("node", WRITE, name)

    def session_read(self, node: str) -> bool:
        return self.allowed("session", READ, node)

    def session_write(self, node: str) -> bool:
        return self.allowed("session", WRITE, node)

    def event_read(self, name: str) -> bool:
        return self.allowed("event", READ, name)

    def event_write(self, name: str) -> bool:
        return self.allowed("event", WRITE, name)

    def agent_read(self, node: str) -> bool:
        return self.allowed("agent", READ, node)

    def agent_write(self, node: str) -> bool:
        return self.allowed("agent", WRITE, node)

    def intention_read(self, dest: str) -> bool:
        return self.allowed("intention", READ, dest)

    def intention_write(self, dest: str) -> bool:
        return self.allowed("intention", WRITE, dest)

    def acl_read(self) -> bool:
        return self.allowed("acl", READ)

    def acl_write(self) -> bool:
        return self.allowed("acl", WRITE)

    def operator_read(self) -> bool:
        return self.allowed("operator", READ)

    def operator_write(self) -> bool:
        return self.allowed("operator", WRITE)

    def mesh_read(self) -> bool:
        return self.allowed("mesh", READ)

    def mesh_write(self) -> bool:
        return self.allowed("mesh", WRITE)

    def check(self, permission: str, segment: str | None = None) -> None:
        """Raise ``PermissionDenied`` unless ``permission`` ("service:write"...) is granted on ``segment``."""
        resource, _, access = permission.partition(":")
        if access not in (READ, LIST, WRITE):
            raise ValueError(f"unknown permission {permission!r}")
        if not self.allowed(resource, access, segment or ""):
            raise PermissionDenied(self.accessor_id, permission, segment if resource in (*SEGMENTED, "intention")
                                   else None)

    def check_key_write_prefix(self, prefix: str) -> None:
        if not self.key_write_prefix(prefix):
            raise PermissionDenied(self.accessor_id, "key:write", prefix)


ALLOW_ALL = Authorizer()


@dataclass
class _Rule:
    access: str
    intentions: str | None = None  # service rules only


@dataclass
class Policy:
    """Parsed rules: per resource, exact and prefix rules; top-level resources map to an access level."""

    exact: dict[str, dict[str, _Rule]] = field(default_factory=lambda: {r: {} for r in SEGMENTED})
    prefix: dict[str, dict[str, _Rule]] = field(default_factory=lambda: {r: {} for r in SEGMENTED})
    top: dict[str, str] = field(default_factory=dict)


def _precedes(a: str, b: str) -> bool:
    """Consul's takesPrecedenceOver for merging the same rule from several policies."""
    for level in (DENY, WRITE, LIST, READ):
        if a == level:
            return True
        if b == level:
            return False
    return False


def _unquote(value: Any) -> Any:
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def parse_rules(text: str) -> Policy:
    """Parse Consul ACL rules (HCL or JSON) into a ``Policy``; raises ``RuleError`` naming the problem."""
    doc: Any
    stripped = text.strip()
    if not stripped:
        return Policy()
    if stripped.startswith("{"):
        try:
            doc = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise RuleError(f"Failed to parse ACL rules: {exc}") from None
    else:
        try:
            import hcl2  # local import: only policies with rules pay for the parser
        except ImportError as exc:  # pragma: no cover - declared dependency
            raise RuleError(f"HCL parser unavailable: {exc}") from None
        try:
            doc = hcl2.loads(text)
        except Exception as exc:  # hcl2 raises lark errors of many kinds
            raise RuleError(f"Failed to parse ACL rules: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    if not isinstance(doc, Mapping):
        raise RuleError("Failed to parse ACL rules: expected an object at the top level")
    policy = Policy()
    for raw_name, value in doc.items():
        name = str(raw_name)
        if name.startswith("__"):  # the HCL parser's own keys (comments, line numbers), not rules
            continue
        if name in TOPLEVEL:
            level = _unquote(value)
            if level not in (DENY, READ, WRITE):
                raise RuleError(f"Invalid {name} policy: {level!r}")
            policy.top[name] = level
            continue
        is_prefix = name.endswith("_prefix")
        resource = name.removesuffix("_prefix")
        if resource not in SEGMENTED:
            raise RuleError(f"Failed to parse ACL rules: unknown rule type {name!r}")
        target = policy.prefix[resource] if is_prefix else policy.exact[resource]
        for seg, body in _blocks(value, name):
            level = _unquote(body.get("policy"))
            allowed = (DENY, READ, LIST, WRITE) if resource == "key" else (DENY, READ, WRITE)
            if level not in allowed:
                raise RuleError(f"Invalid {name} policy for {seg!r}: {level!r}")
            intentions = _unquote(body.get("intentions")) if resource == "service" else None
            if intentions is not None and intentions not in (DENY, READ, WRITE):
                raise RuleError(f"Invalid intentions policy for {seg!r}: {intentions!r}")
            if resource == "service" and intentions is None:
                intentions = READ if level in (READ, WRITE) else DENY
            _merge_rule(target, seg, _Rule(level, intentions))
    return policy


def _blocks(value: Any, name: str) -> Iterable[tuple[str, Mapping[str, Any]]]:
    """Yield (segment, body) from the shapes hcl2 and JSON produce for labelled blocks."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, Mapping):
            raise RuleError(f"Failed to parse ACL rules: {name} needs a labelled block")
        for seg, body in item.items():
            if isinstance(body, list):  # JSON may wrap the body in a list
                body = body[0] if body else {}
            if not isinstance(body, Mapping):
                raise RuleError(f"Failed to parse ACL rules: {name} {seg!r} needs a block with policy")
            yield str(_unquote(seg)), body


def _merge_rule(target: dict[str, _Rule], seg: str, rule: _Rule) -> None:
    existing = target.get(seg)
    if existing is None:
        target[seg] = rule
        return
    if _precedes(rule.access, existing.access):
        existing.access = rule.access
    if rule.intentions is not None and (existing.intentions is None or _precedes(rule.intentions, existing.intentions)):
        existing.intentions = rule.intentions


def merge(policies: Iterable[Policy]) -> Policy:
    out = Policy()
    for p in policies:
        for res in SEGMENTED:
            for seg, rule in p.exact[res].items():
                _merge_rule(out.exact[res], seg, _Rule(rule.access, rule.intentions))
            for seg, rule in p.prefix[res].items():
                _merge_rule(out.prefix[res], seg, _Rule(rule.access, rule.intentions))
        for res, level in p.top.items():
            if res not in out.top or _precedes(level, out.top[res]):
                out.top[res] = level
    return out


def service_identity_policy(service: str) -> Policy:
    """Consul's synthetic policy for a service identity."""
    return parse_rules(json.dumps({
        "service": {service: {"policy": WRITE}, f"{service}-sidecar-proxy": {"policy": WRITE}},
        "service_prefix": {"": {"policy": READ}},
        "node_prefix": {"": {"policy": READ}},
    }))


def node_identity_policy(node: str) -> Policy:
    """Consul's synthetic policy for a node identity."""
    return parse_rules(json.dumps({
        "node": {node: {"policy": WRITE}},
        "service_prefix": {"": {"policy": READ}},
    }))


def _grants(level: str | None, access: str) -> bool | None:
    """Consul's enforce(): None when no rule applies."""
    if level is None:
        return None
    if level == WRITE:
        return True
    if level == LIST:
        return access in (LIST, READ)
    if level == READ:
        return access == READ
    return False


class PolicyAuthorizer(Authorizer):
    """Enforces a merged policy; what no rule covers falls to the default policy (deny)."""

    def __init__(self, accessor_id: str, policy: Policy, *, default_allow: bool = False) -> None:
        self.accessor_id = accessor_id
        self.management = False
        self._p = policy
        self._default = default_allow

    def _rule(self, resource: str, segment: str) -> _Rule | None:
        exact = self._p.exact[resource].get(segment)
        if exact is not None:
            return exact
        best: _Rule | None = None
        best_len = -1
        for prefix, rule in self._p.prefix[resource].items():
            if segment.startswith(prefix) and len(prefix) > best_len:
                best, best_len = rule, len(prefix)
        return best

    def allowed(self, resource: str, access: str, segment: str = "") -> bool:
        if resource == "intention":
            rule = self._rule("service", segment)
            decision = _grants(rule.intentions if rule else None, access)
        elif resource in SEGMENTED:
            rule = self._rule(resource, segment)
            decision = _grants(rule.access if rule else None, access)
        elif resource in TOPLEVEL:
            level = self._p.top.get(resource)
            if resource in ("mesh", "peering") and level is None:
                level = self._p.top.get("operator")  # Consul: mesh and peering fall back to operator
            decision = _grants(level, access)
        else:
            decision = None
        return self._default if decision is None else decision

    def service_write_any(self) -> bool:
        """Consul's ServiceWriteAny: some service rule (exact or prefix) grants write."""
        rules = list(self._p.exact["service"].values()) + list(self._p.prefix["service"].values())
        if any(rule.access == WRITE for rule in rules):
            return True
        return self._default

    def key_write_prefix(self, prefix: str) -> bool:
        # Deny when any rule at or under the prefix does not grant write; otherwise the longest prefix
        # rule applying to the prefix decides (or the default).
        for seg, rule in self._p.exact["key"].items():
            if seg.startswith(prefix) and rule.access != WRITE:
                return False
        for seg, rule in self._p.prefix["key"].items():
            if seg.startswith(prefix) and len(seg) > len(prefix) and rule.access != WRITE:
                return False
        best: _Rule | None = None
        best_len = -1
        for seg, rule in self._p.prefix["key"].items():
            if prefix.startswith(seg) and len(seg) > best_len:
                best, best_len = rule, len(seg)
        if best is None:
            return self._default
        return best.access == WRITE


class ManagementAuthorizer(Authorizer):
    """The global-management policy: everything."""

    def __init__(self, accessor_id: str) -> None:
        self.accessor_id = accessor_id
        self.management = True
