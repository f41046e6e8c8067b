"""Intentions and compiled decision tables: the data types of Weft's access policy (pure: no I/O).

Three groups of types live here:

* The **document** model: Consul's ``service-intentions`` config entry (one per destination), as
  operators write it in KV under ``weft/intentions/<destination>`` or in Consul itself (the UI's
  native intentions). :class:`IntentionsEntry` holds ``Kind``, ``Name`` (the destination),
  ``Sources`` (each an L4 ``Action`` or a list of L7 ``Permissions``), ``Description`` and ``Meta``,
  plus Weft's one extension ``Mode: enforce | audit`` on the entry or on a source. Documents are
  parsed and validated by :mod:`policies.compile`.

* The **compiled table**: one :class:`CompiledTable` per destination, written by the policy service
  to ``weft/policy/compiled/<destination>`` and read by sidecars. It carries a content-hash
  ``version``, the ``default_policy`` (allow/deny), the default ``Mode``, and the rules that apply to
  that destination (its own and the wildcard destination's) sorted by precedence, each remembering
  its :class:`Origin` (the KV key, or the native config entry / intention ID).

  The wildcard table (destination :data:`WILDCARD`, stored at ``weft/policy/compiled/_wildcard``:
  a key without ``*``, which some KV tooling treats as a glob) always exists while a policy service
  runs: it holds only the wildcard-destination rules and the default policy. A destination that has
  no table of its own is governed by it: :func:`table_key_candidates` gives the keys to try, in order.

* The **decision**: :class:`Decision`, what :func:`policies.evaluate.authorize` returns for one
  connection or request: allowed, audited (a would-be denial let through by audit mode), the
  deciding rule (``None`` when the default policy decided) and a human-readable reason.

Everything is immutable; tables serialise to JSON with :meth:`CompiledTable.to_json` (Consul-style
CamelCase keys) and are read back, validated, by :func:`policies.compile.parse_table`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

KIND = "service-intentions"
WILDCARD = "*"
INTENTIONS_PREFIX = "weft/intentions/"
COMPILED_PREFIX = "weft/policy/compiled/"
LEADER_KEY = "weft/policy/leader"
SERVICE_NAME = "weft-policy"
TABLE_FORMAT = 1

Action = Literal["allow", "deny"]
Mode = Literal["enforce", "audit"]
OriginKind = Literal["kv", "native"]
ACTIONS: tuple[Action, ...] = ("allow", "deny")
MODES: tuple[Mode, ...] = ("enforce", "audit")

def intentions_key(destination: str) -> str:
    """The KV key of a destination's intentions document."""
    return INTENTIONS_PREFIX + destination


WILDCARD_TABLE_NAME = "_wildcard"  # cannot be a service name (those start with a letter or digit)


def table_key(destination: str) -> str:
    """The KV key of a destination's compiled table (``*`` is stored as ``_wildcard``)."""
    return COMPILED_PREFIX + (WILDCARD_TABLE_NAME if destination == WILDCARD else destination)


def destination_of_key(key: str) -> str | None:
    """The destination whose compiled table ``key`` holds, or None for a key outside the prefix."""
    if not key.startswith(COMPILED_PREFIX) or key == COMPILED_PREFIX:
        return None
    name = key[len(COMPILED_PREFIX):]
    return WILDCARD if name == WILDCARD_TABLE_NAME else name


def table_key_candidates(destination: str) -> tuple[str, ...]:
    """The keys a sidecar of ``destination`` reads, first found wins: its own table, then the wildcard one.

    When neither exists (no policy service has ever run) a sidecar must fail closed (deny).
    """
    if destination == WILDCARD:
        return (table_key(WILDCARD),)
    return (table_key(destination), table_key(WILDCARD))


# --------------------------------------------------------------------------------------------
# Documents: the service-intentions config entry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """One ``Header`` condition of an L7 permission: exactly one of present/exact/prefix/suffix/regex."""

    name: str
    present: bool = False
    exact: str = ""
    prefix: str = ""
    suffix: str = ""
    regex: str = ""
    invert: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Name": self.name}
        if self.present:
            out["Present"] = True
        for key, value in (("Exact", self.exact), ("Prefix", self.prefix), ("Suffix", self.suffix),
                           ("Regex", self.regex)):
            if value:
                out[key] = value
        if self.invert:
            out["Invert"] = True
        return out


@dataclass(frozen=True, slots=True)
class HttpMatch:
    """The ``HTTP`` block of a permission; all given conditions must hold (AND)."""

    path_exact: str = ""
    path_prefix: str = ""
    path_regex: str = ""
    methods: tuple[str, ...] = ()
    headers: tuple[HeaderMatch, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in (("PathExact", self.path_exact), ("PathPrefix", self.path_prefix),
                           ("PathRegex", self.path_regex)):
            if value:
                out[key] = value
        if self.methods:
            out["Methods"] = list(self.methods)
        if self.headers:
            out["Header"] = [h.to_json() for h in self.headers]
        return out


@dataclass(frozen=True, slots=True)
class Permission:
    """One L7 permission: ``Action`` taken when ``HTTP`` matches the request."""

    action: Action
    http: HttpMatch

    def to_json(self) -> dict[str, Any]:
        return {"Action": self.action, "HTTP": self.http.to_json()}


@dataclass(frozen=True, slots=True)
class SourceIntention:
    """One entry of ``Sources``: an L4 ``action`` or L7 ``permissions``, never both."""

    name: str
    action: Action | None = None
    permissions: tuple[Permission, ...] = ()
    description: str = ""
    mode: Mode | None = None  # Weft extension; None: the entry's mode
    legacy_id: str = ""  # the native intention's ID where Consul has one (pre-1.9 intentions)

    @property
    def is_l7(self) -> bool:
        return bool(self.permissions)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Name": self.name}
        if self.permissions:
            out["Permissions"] = [p.to_json() for p in self.permissions]
        elif self.action is not None:
            out["Action"] = self.action
        if self.description:
            out["Description"] = self.description
        if self.mode is not None:
            out["Mode"] = self.mode
        if self.legacy_id:
            out["LegacyID"] = self.legacy_id
        return out


@dataclass(frozen=True, slots=True)
class IntentionsEntry:
    """A ``service-intentions`` config entry: every intention whose destination is ``name``."""

    name: str
    sources: tuple[SourceIntention, ...]
    description: str = ""
    meta: tuple[tuple[str, str], ...] = ()
    mode: Mode | None = None  # Weft extension; None: enforce

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Kind": KIND, "Name": self.name, "Sources": [s.to_json() for s in self.sources]}
        if self.description:
            out["Description"] = self.description
        if self.meta:
            out["Meta"] = dict(self.meta)
        if self.mode is not None:
            out["Mode"] = self.mode
        return out

    def source(self, name: str) -> SourceIntention | None:
        for src in self.sources:
            if src.name == name:
                return src
        return None


# --------------------------------------------------------------------------------------------
# Compiled tables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a compiled rule came from.

    ``kind`` is ``kv`` (``ref`` is the KV key, e.g. ``weft/intentions/db``) or ``native`` (``ref`` is
    the config entry, ``service-intentions/db``; ``intention_id`` is the native intention's ID when
    Consul has one). ``index`` is the position in ``Sources``.
    """

    kind: OriginKind
    ref: str
    index: int = 0
    intention_id: str = ""

    def __str__(self) -> str:
        if self.kind == "kv":
            return f"KV {self.ref} Sources[{self.index}]"
        if self.intention_id:
            return f"native intention {self.intention_id} ({self.ref} Sources[{self.index}])"
        return f"native {self.ref} Sources[{self.index}]"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Kind": self.kind, "Ref": self.ref, "Index": self.index}
        if self.intention_id:
            out["ID"] = self.intention_id
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Origin:
        kind = data["Kind"]
        if kind not in ("kv", "native"):
            raise ValueError(f"Origin.Kind must be 'kv' or 'native', not {kind!r}")
        return cls(kind=kind, ref=str(data["Ref"]), index=int(data.get("Index", 0)),
                   intention_id=str(data.get("ID", "")))


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """One intention as the evaluator uses it.

    ``rule_id`` is ``"<source> -> <destination>"`` plus the origin, unique in its table, and is what
    decisions, logs and metrics name. ``permissions`` is non-empty for an L7 rule (``action`` is then
    None). ``mode`` is resolved (source mode, else entry mode, else enforce).
    """

    source: str
    destination: str
    precedence: int
    origin: Origin
    action: Action | None = None
    permissions: tuple[Permission, ...] = ()
    mode: Mode = "enforce"
    description: str = ""

    @property
    def is_l7(self) -> bool:
        return bool(self.permissions)

    @property
    def pair(self) -> str:
        return f"{self.source} -> {self.destination}"

    @property
    def rule_id(self) -> str:
        return f"{self.source} -> {self.destination} ({self.origin})"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "Source": self.source,
            "Destination": self.destination,
            "Precedence": self.precedence,
            "Origin": self.origin.to_json(),
            "Mode": self.mode,
        }
        if self.permissions:
            out["Permissions"] = [p.to_json() for p in self.permissions]
        else:
            out["Action"] = self.action
        if self.description:
            out["Description"] = self.description
        return out


@dataclass(frozen=True, slots=True)
class CompiledTable:
    """The decision table of one destination (or of ``*``, for destinations without their own).

    ``rules`` are sorted by precedence, highest first, then by source and origin. ``version`` is a
    content hash of everything else (:func:`table_version`), so an unchanged policy keeps its
    version and the policy service writes only real changes. ``warnings`` carries compile-time
    notes that did not reject anything (e.g. a pair defined in both sources).
    """

    destination: str
    default_policy: Action
    rules: tuple[CompiledRule, ...]
    default_mode: Mode = "enforce"
    warnings: tuple[str, ...] = ()
    version: str = ""
    # Evaluator's precomputed index (policies.evaluate); not part of equality or JSON.
    _prepared: Any = field(default=None, compare=False, repr=False, hash=False)

    def content_json(self) -> dict[str, Any]:
        """Everything but the version: what the version hashes."""
        return {
            "Format": TABLE_FORMAT,
            "Destination": self.destination,
            "DefaultPolicy": self.default_policy,
            "DefaultMode": self.default_mode,
            "Rules": [r.to_json() for r in self.rules],
            "Warnings": list(self.warnings),
        }

    def to_json(self) -> dict[str, Any]:
        out = self.content_json()
        out["Version"] = self.version or table_version(out)
        return out

    def dumps(self) -> str:
        """The canonical JSON text written to KV."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    def with_version(self) -> CompiledTable:
        """This table with ``version`` set to its content hash."""
        version = table_version(self.content_json())
        if version == self.version:
            return self
        return CompiledTable(destination=self.destination, default_policy=self.default_policy, rules=self.rules,
                             default_mode=self.default_mode, warnings=self.warnings, version=version)

    def rules_for(self, source: str) -> tuple[CompiledRule, ...]:
        """Rules naming ``source`` exactly or ``*`` (every candidate, highest precedence first)."""
        return tuple(r for r in self.rules if r.source in (source, WILDCARD))


def table_version(content: dict[str, Any]) -> str:
    """Content hash of a table's JSON (without its ``Version``): 16 hex digits of SHA-256."""
    body = {k: v for k, v in content.items() if k != "Version"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Requests and decisions (the evaluator's input and output)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TcpRequest:
    """A new connection: only L4 rules can decide it (an L7 rule denies it, as Consul's check does)."""


class RepeatedHeader(str):
    """The value of a header sent more than once: the values joined with ``,``, and each of them in
    :attr:`values`. A header condition matches such a header only when it holds for every value
    (an inverted one: when it holds for none), so that a policy checks whatever copy the app reads.
    Build it with :func:`header_map`."""

    values: tuple[str, ...]

    def __new__(cls, values: tuple[str, ...]) -> RepeatedHeader:
        self = super().__new__(cls, ",".join(values))
        self.values = values
        return self


def header_map(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Request headers as the evaluator takes them: names lowercased, a repeated name as one
    :class:`RepeatedHeader` holding every value in order."""
    out: dict[str, str] = {}
    repeated: dict[str, list[str]] | None = None
    for name, value in pairs:
        key = name.lower()
        if key in out:
            if repeated is None:
                repeated = {}
            seen = repeated.get(key)
            if seen is None:
                seen = repeated[key] = [out[key]]
            seen.append(value)
        else:
            out[key] = value
    if repeated:
        for key, values in repeated.items():
            out[key] = RepeatedHeader(tuple(values))
    return out


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One HTTP request. ``headers`` keys must be lowercase (use :meth:`of` to normalise); a header
    sent more than once is a :class:`RepeatedHeader` (see :func:`header_map`), matched on every value."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, method: str, path: str, headers: dict[str, str] | None = None) -> HttpRequest:
        return cls(method=method.upper(), path=path,
                   headers={k.lower(): v for k, v in (headers or {}).items()})


@dataclass(frozen=True, slots=True)
class GrpcRequest:
    """One gRPC call ``/pkg.Service/Method``; matched as an HTTP POST of that path, as in Consul.

    ``metadata`` keys must be lowercase (gRPC metadata keys always are). Any mapping will do: the
    sidecar passes one that is built only if a rule looks at it.
    """

    method: str
    metadata: Mapping[str, str] = field(default_factory=dict)


Request = TcpRequest | HttpRequest | GrpcRequest
TCP = TcpRequest()


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one authorization.

    ``allowed`` is what the sidecar does. ``audited`` is True when the call would have been denied
    but the deciding rule (or the default) is in audit mode: it is allowed, and must be logged and
    counted as a would-be denial. ``rule`` is the deciding rule, None when the default policy
    decided. ``permission`` is the index of the deciding L7 permission, or None. ``reason`` says why,
    naming the rule and its origin. ``per_request`` is True when the deciding rule is L7 (a
    connection from this source must be authorized per request, never passed through).
    """

    allowed: bool
    reason: str
    rule: CompiledRule | None = None
    audited: bool = False
    permission: int | None = None
    per_request: bool = False

    @property
    def denied(self) -> bool:
        return not self.allowed

    @property
    def rule_label(self) -> str:
        """A short stable label for metrics and logs: the rule's id, or ``default-policy``."""
        if self.rule is None:
            return "default-policy"
        if self.permission is not None:
            return f"{self.rule.rule_id} Permissions[{self.permission}]"
        return self.rule.rule_id

    def to_json(self) -> dict[str, Any]:
        return {
            "Allowed": self.allowed,
            "Audited": self.audited,
            "Reason": self.reason,
            "Rule": self.rule.to_json() if self.rule is not None else None,
            "RuleLabel": self.rule_label,
            "Permission": self.permission,
            "PerRequest": self.per_request,
        }
