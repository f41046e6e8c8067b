"""Validation and compilation of intentions into per-destination tables (pure: no I/O).

Input: the two intention sources, as the policy service reads them from Consul:

* KV documents ``weft/intentions/<destination>``: a ``service-intentions`` config entry as JSON;
* Consul's native intentions: config entries of kind ``service-intentions`` (what the UI's
  ``PUT /v1/connect/intentions/exact`` writes since Consul 1.9).

Validation follows Consul's ``ServiceIntentionsConfigEntry.validate`` rule for rule; every problem is
reported as ``<key or entry>: <field>: <problem>`` (all of a document's problems at once). Keys are
matched as Consul decodes them: CamelCase or snake_case, case-insensitively; an unknown field is an
error (a misspelt ``PathPrefx`` must not silently widen a permission).

Merging (documented in the README): both sources are read as one set of intentions. When the same
source/destination pair is defined in both, both definitions are kept at the same precedence and the
evaluator applies "deny wins" request by request: a request is allowed only when every definition
allows it. A compile warning names both origins. A conflict can therefore never widen access.

Bad documents: a document that fails validation is rejected. :class:`Compiler` remembers the last
good version of every document (by its key) and compiles that instead; when there is none (the
process has just started), every destination the document governs is *frozen*: the policy service
leaves the compiled tables already in KV for those destinations untouched until the document is fixed.

Output: one :class:`~policies.model.CompiledTable` per destination that has intentions, plus the
wildcard table ``*`` (wildcard-destination rules and the default policy) which governs every
destination without a table of its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ca.identity import IdentityError, validate_service_name
from consulkit.conventions import fold_key, intention_precedence
from policies.model import (
    ACTIONS,
    INTENTIONS_PREFIX,
    KIND,
    MODES,
    TABLE_FORMAT,
    WILDCARD,
    Action,
    CompiledRule,
    CompiledTable,
    HeaderMatch,
    HttpMatch,
    IntentionsEntry,
    Mode,
    Origin,
    OriginKind,
    Permission,
    SourceIntention,
    table_version,
)

# Consul's limits (agent/structs/config_entry.go, intention.go)
META_MAX_PAIRS = 64
META_KEY_MAX = 128
META_VALUE_MAX = 512
DESCRIPTION_MAX = 512
VALID_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE"})
MAX_DOCUMENT_BYTES = 512 * 1024


class DocumentError(ValueError):
    """A rejected document; ``errors`` lists every problem as ``<ref>: <field>: <problem>``."""

    def __init__(self, ref: str, errors: Sequence[str]) -> None:
        self.ref = ref
        self.errors = list(errors)
        super().__init__("; ".join(self.errors))


class _Problems:
    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.errors: list[str] = []

    def add(self, where: str, problem: str) -> None:
        self.errors.append(f"{self.ref}: {where}: {problem}" if where else f"{self.ref}: {problem}")


# canonical key -> field name, per object
_ENTRY_FIELDS = {fold_key(k): k for k in (
    "Kind", "Name", "Sources", "Description", "Meta", "Mode", "Namespace", "Partition", "JWT",
    "CreateIndex", "ModifyIndex", "Hash")}
_SOURCE_FIELDS = {fold_key(k): k for k in (
    "Name", "Action", "Permissions", "Description", "Mode", "Precedence", "Type", "LegacyID", "LegacyMeta",
    "LegacyCreateTime", "LegacyUpdateTime", "Namespace", "Partition", "Peer", "SamenessGroup")}
_PERMISSION_FIELDS = {fold_key(k): k for k in ("Action", "HTTP", "JWT")}
_HTTP_FIELDS = {fold_key(k): k for k in ("PathExact", "PathPrefix", "PathRegex", "Methods", "Header")}
_HEADER_FIELDS = {fold_key(k): k for k in ("Name", "Present", "Exact", "Prefix", "Suffix", "Regex", "Invert")}


def _fields(obj: Any, known: Mapping[str, str], where: str, p: _Problems) -> dict[str, Any] | None:
    """Normalise an object's keys to their canonical field names; report unknown ones."""
    if not isinstance(obj, dict):
        p.add(where, f"must be a JSON object, not {_jtype(obj)}")
        return None
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = known.get(fold_key(str(key)))
        if name is None:
            p.add(f"{where}.{key}" if where else str(key), "unknown field")
            continue
        if name in out:
            p.add(f"{where}.{name}" if where else name, f"given more than once (as {key!r})")
            continue
        out[name] = value
    return out


def _jtype(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", str: "a string", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _str(obj: dict[str, Any], key: str, where: str, p: _Problems) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        p.add(f"{where}{key}", f"must be a string, not {_jtype(value)}")
        return ""
    return value


def _bool(obj: dict[str, Any], key: str, where: str, p: _Problems) -> bool:
    value = obj.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        p.add(f"{where}{key}", f"must be true or false, not {_jtype(value)}")
        return False
    return value


def _list(obj: dict[str, Any], key: str, where: str, p: _Problems) -> list[Any]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        p.add(f"{where}{key}", f"must be a list, not {_jtype(value)}")
        return []
    return value


def _mode(obj: dict[str, Any], where: str, p: _Problems) -> Mode | None:
    value = obj.get("Mode")
    if value is None or value == "":
        return None
    if value not in MODES:
        p.add(f"{where}Mode", f"must be 'enforce' or 'audit', not {value!r}")
        return None
    return value  # type: ignore[no-any-return]


def _regex(value: str, where: str, p: _Problems) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        p.add(where, f"is not a valid regular expression: {exc}")


def _name(value: str, where: str, p: _Problems) -> None:
    if value == WILDCARD:
        return
    if WILDCARD in value:
        p.add(where, "wildcard character '*' cannot be used with partial values")
        return
    try:
        validate_service_name(value)
    except IdentityError as exc:
        p.add(where, str(exc))


def _enterprise(obj: dict[str, Any], where: str, p: _Problems) -> None:
    """Namespaces, partitions, peers and sameness groups are Consul Enterprise: only the defaults."""
    for key in ("Namespace", "Partition"):
        value = obj.get(key)
        if value not in (None, "", "default"):
            p.add(f"{where}{key}", f"only 'default' is supported (Consul Enterprise feature), not {value!r}")
    for key in ("Peer", "SamenessGroup"):
        if obj.get(key) not in (None, ""):
            p.add(f"{where}{key}", "cluster peering and sameness groups are not supported by Weft")
    if obj.get("JWT") not in (None, {}, ""):
        p.add(f"{where}JWT", "JWT requirements are not supported by Weft (ignoring them would widen access)")


def _http(raw: Any, where: str, p: _Problems) -> HttpMatch | None:
    obj = _fields(raw, _HTTP_FIELDS, where, p)
    if obj is None:
        return None
    w = where + "."
    exact = _str(obj, "PathExact", w, p)
    prefix = _str(obj, "PathPrefix", w, p)
    regex = _str(obj, "PathRegex", w, p)
    parts = sum(1 for v in (exact, prefix, regex) if v)
    if parts > 1:
        p.add(where, "should only contain at most one of PathExact, PathPrefix, or PathRegex")
    if exact and not exact.startswith("/"):
        p.add(f"{w}PathExact", f"doesn't start with '/': {exact!r}")
    if prefix and not prefix.startswith("/"):
        p.add(f"{w}PathPrefix", f"doesn't start with '/': {prefix!r}")
    if regex:
        _regex(regex, f"{w}PathRegex", p)
    headers: list[HeaderMatch] = []
    for k, hraw in enumerate(_list(obj, "Header", w, p)):
        hw = f"{w}Header[{k}]"
        hobj = _fields(hraw, _HEADER_FIELDS, hw, p)
        if hobj is None:
            continue
        hname = _str(hobj, "Name", hw + ".", p)
        if not hname:
            p.add(hw, "missing required Name field")
        h = HeaderMatch(name=hname, present=_bool(hobj, "Present", hw + ".", p), exact=_str(hobj, "Exact", hw + ".", p),
                        prefix=_str(hobj, "Prefix", hw + ".", p), suffix=_str(hobj, "Suffix", hw + ".", p),
                        regex=_str(hobj, "Regex", hw + ".", p), invert=_bool(hobj, "Invert", hw + ".", p))
        if sum(1 for v in (h.present, h.exact, h.prefix, h.suffix, h.regex) if v) != 1:
            p.add(hw, "should only contain one of Present, Exact, Prefix, Suffix, or Regex")
        if h.regex:
            _regex(h.regex, f"{hw}.Regex", p)
        headers.append(h)
    methods: list[str] = []
    for m in _list(obj, "Methods", w, p):
        if not isinstance(m, str):
            p.add(f"{w}Methods", f"must be a list of strings, found {_jtype(m)}")
            continue
        upper = m.upper()
        if upper not in VALID_METHODS:
            p.add(f"{w}Methods", f"contains an invalid method {m!r}")
        elif upper in methods:
            p.add(f"{w}Methods", f"contains {upper!r} more than once")
        else:
            methods.append(upper)
    if parts == 0 and not headers and not methods:
        p.add(where, "should not be empty")
    return HttpMatch(path_exact=exact, path_prefix=prefix, path_regex=regex, methods=tuple(methods),
                     headers=tuple(headers))


def _permissions(raw: list[Any], where: str, p: _Problems) -> tuple[Permission, ...]:
    perms = []
    for j, praw in enumerate(raw):
        pw = f"{where}[{j}]"
        obj = _fields(praw, _PERMISSION_FIELDS, pw, p)
        if obj is None:
            continue
        action = obj.get("Action")
        if action not in ACTIONS:
            p.add(f"{pw}.Action", f"must be set to 'allow' or 'deny', not {action!r}")
        if obj.get("JWT") not in (None, {}, ""):
            p.add(f"{pw}.JWT", "JWT requirements are not supported by Weft (ignoring them would widen access)")
        if obj.get("HTTP") is None:
            p.add(f"{pw}.HTTP", "is required")
            continue
        http = _http(obj["HTTP"], f"{pw}.HTTP", p)
        if http is not None and action in ACTIONS:
            perms.append(Permission(action=action, http=http))
    return tuple(perms)


def parse_permissions(raw: Any, where: str = "Permissions") -> tuple[Permission, ...]:
    """Parse and validate a ``Permissions`` list; raise DocumentError naming ``where`` on a bad one."""
    p = _Problems(where)
    if not isinstance(raw, list):
        p.add("", f"must be a list, not {_jtype(raw)}")
        raise DocumentError(where, p.errors)
    perms = _permissions(raw, "Permissions", p)
    if p.errors:
        raise DocumentError(where, p.errors)
    return perms


def parse_table(data: Any) -> CompiledTable:
    """Read back a table from :meth:`CompiledTable.to_json` output (what sidecars find in KV), checking
    every field and that its version is its content's hash; raises ValueError/KeyError on a malformed one.

    Here rather than in :mod:`policies.model` because rules' permissions are checked by the same
    parser as intentions' (:func:`parse_permissions`), and the model must not import the compiler."""
    if not isinstance(data, dict):
        raise ValueError("a compiled table must be a JSON object")
    fmt = data.get("Format", TABLE_FORMAT)
    if fmt != TABLE_FORMAT:
        raise ValueError(f"compiled table format {fmt!r} is not supported (expected {TABLE_FORMAT})")
    rules = tuple(_table_rule(raw, f"Rules[{i}]") for i, raw in enumerate(data.get("Rules") or []))
    default_policy = data.get("DefaultPolicy")
    if default_policy not in ACTIONS:
        raise ValueError(f"DefaultPolicy must be 'allow' or 'deny', not {default_policy!r}")
    default_mode = data.get("DefaultMode", "enforce")
    if default_mode not in MODES:
        raise ValueError(f"DefaultMode must be 'enforce' or 'audit', not {default_mode!r}")
    table = CompiledTable(destination=str(data["Destination"]), default_policy=default_policy, rules=rules,
                          default_mode=default_mode, warnings=tuple(str(w) for w in data.get("Warnings") or ()))
    computed = table_version(table.content_json())
    version = str(data.get("Version") or computed)
    if version != computed:
        raise ValueError(f"compiled table version {version!r} does not match its content ({computed!r})")
    return table.with_version()


def _table_rule(raw: Any, where: str) -> CompiledRule:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a JSON object")
    perms = parse_permissions(raw.get("Permissions"), where=where) if raw.get("Permissions") else ()
    action = raw.get("Action")
    if not perms and action not in ACTIONS:
        raise ValueError(f"{where}.Action must be 'allow' or 'deny', not {action!r}")
    mode = raw.get("Mode", "enforce")
    if mode not in MODES:
        raise ValueError(f"{where}.Mode must be 'enforce' or 'audit', not {mode!r}")
    return CompiledRule(
        source=str(raw["Source"]), destination=str(raw["Destination"]),
        precedence=int(raw["Precedence"]), origin=Origin.from_json(raw["Origin"]),
        action=None if perms else action, permissions=perms, mode=mode,
        description=str(raw.get("Description", "")),
    )


def loads_table(text: str | bytes) -> CompiledTable:
    """:func:`parse_table` of a table's JSON text (a KV value)."""
    return parse_table(json.loads(text))


def parse_entry(raw: Any, ref: str, *, expect_name: str | None = None) -> IntentionsEntry:
    """Parse and validate one ``service-intentions`` document (JSON text, bytes or a decoded object).

    ``ref`` names the document in errors (its KV key, or ``service-intentions/<name>``);
    ``expect_name`` is the destination the document's key says it must govern. Raises
    :class:`DocumentError` listing every problem.
    """
    p = _Problems(ref)
    if isinstance(raw, bytes | bytearray):
        if len(raw) > MAX_DOCUMENT_BYTES:
            raise DocumentError(ref, [f"{ref}: document is larger than {MAX_DOCUMENT_BYTES} bytes"])
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DocumentError(ref, [f"{ref}: not UTF-8 text: {exc}"]) from None
    if isinstance(raw, str):
        if not raw.strip():
            raise DocumentError(ref, [f"{ref}: empty document"])
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DocumentError(ref, [f"{ref}: not valid JSON: {exc}"]) from None
    obj = _fields(raw, _ENTRY_FIELDS, "", p)
    if obj is None:
        raise DocumentError(ref, p.errors)
    kind = obj.get("Kind")
    if kind is None or kind == "":
        p.add("Kind", f"is required and must be {KIND!r}")
    elif not isinstance(kind, str) or fold_key(kind) != fold_key(KIND):
        p.add("Kind", f"must be {KIND!r}, not {kind!r}")
    name = _str(obj, "Name", "", p)
    if not name:
        p.add("Name", "is required")
    else:
        _name(name, "Name", p)
        if expect_name is not None and name != expect_name:
            p.add("Name", f"is {name!r} but the document is stored for destination {expect_name!r}")
    _enterprise(obj, "", p)
    description = _str(obj, "Description", "", p)
    if len(description) > DESCRIPTION_MAX:
        p.add("Description", f"exceeds maximum length {DESCRIPTION_MAX}")
    meta = _meta(obj.get("Meta"), p)
    mode = _mode(obj, "", p)
    if mode is None and isinstance(obj.get("Meta"), dict) and obj["Meta"].get("weft-mode"):
        mode = _mode({"Mode": obj["Meta"]["weft-mode"]}, "Meta.weft-", p)
    dest_wild = name == WILDCARD
    raw_sources = obj.get("Sources")
    if raw_sources is None or raw_sources == []:
        p.add("Sources", "at least one source is required")
        raw_sources = []
    elif not isinstance(raw_sources, list):
        p.add("Sources", f"must be a list, not {_jtype(raw_sources)}")
        raw_sources = []
    sources: list[SourceIntention] = []
    seen: dict[str, int] = {}
    for i, sraw in enumerate(raw_sources):
        src = _source(sraw, i, dest_wild, p)
        if src is None:
            continue
        if src.name in seen:
            p.add(f"Sources[{i}]", f"defines {src.name!r} more than once (also Sources[{seen[src.name]}])")
            continue
        seen[src.name] = i
        sources.append(src)
    if p.errors:
        raise DocumentError(ref, p.errors)
    return IntentionsEntry(name=name, sources=tuple(sources), description=description, meta=meta, mode=mode)


def _meta(raw: Any, p: _Problems) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        p.add("Meta", f"must be an object of strings, not {_jtype(raw)}")
        return ()
    if len(raw) > META_MAX_PAIRS:
        p.add("Meta", f"exceeds maximum element count {META_MAX_PAIRS}")
    out = []
    for k, v in raw.items():
        if not k:
            p.add("Meta", "keys must not be empty")
        elif len(k) > META_KEY_MAX:
            p.add("Meta", f"key {k[:40]!r}... exceeds maximum length {META_KEY_MAX}")
        if not isinstance(v, str):
            p.add(f"Meta.{k}", f"must be a string, not {_jtype(v)}")
            continue
        if len(v) > META_VALUE_MAX:
            p.add(f"Meta.{k}", f"exceeds maximum length {META_VALUE_MAX}")
        out.append((str(k), v))
    return tuple(sorted(out))


def _source(raw: Any, i: int, dest_wild: bool, p: _Problems) -> SourceIntention | None:
    where = f"Sources[{i}]"
    obj = _fields(raw, _SOURCE_FIELDS, where, p)
    if obj is None:
        return None
    w = where + "."
    errors_before = len(p.errors)
    name = _str(obj, "Name", w, p)
    if not name:
        p.add(f"{w}Name", "is required")
    else:
        _name(name, f"{w}Name", p)
    _enterprise(obj, w, p)
    typ = obj.get("Type")
    if typ not in (None, "", "consul"):
        p.add(f"{w}Type", f"must be set to 'consul', not {typ!r}")
    for legacy in ("LegacyMeta", "LegacyCreateTime", "LegacyUpdateTime"):
        _ = obj.get(legacy)  # written by Consul itself for migrated intentions: read-only, ignored
    description = _str(obj, "Description", w, p)
    if len(description) > DESCRIPTION_MAX:
        p.add(f"{w}Description", f"exceeds maximum length {DESCRIPTION_MAX}")
    mode = _mode(obj, w, p)
    legacy_id = obj.get("LegacyID") or ""
    if not isinstance(legacy_id, str):
        p.add(f"{w}LegacyID", f"must be a string, not {_jtype(legacy_id)}")
        legacy_id = ""
    action = obj.get("Action")
    raw_perms = obj.get("Permissions")
    perms: tuple[Permission, ...] = ()
    if raw_perms not in (None, []):
        if not isinstance(raw_perms, list):
            p.add(f"{w}Permissions", f"must be a list, not {_jtype(raw_perms)}")
        else:
            if action not in (None, ""):
                p.add(f"{w}Action", "must be omitted if Permissions are specified")
            if dest_wild:
                p.add(f"{w}Permissions", "cannot be specified on intentions with wildcarded destinations")
            perms = _permissions(raw_perms, f"{w}Permissions", p)
        action = None
    elif action not in ACTIONS:
        p.add(f"{w}Action", f"must be set to 'allow' or 'deny', not {action!r}")
    if len(p.errors) > errors_before:
        return None
    act: Action | None = action if action in ACTIONS else None
    return SourceIntention(name=name, action=act, permissions=perms, description=description, mode=mode,
                           legacy_id=legacy_id)


# --------------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Document:
    """One intentions document as read from a source.

    ``ref``: ``weft/intentions/<dest>`` for KV, ``service-intentions/<name>`` for native entries.
    ``destination``: what the key says the document governs. ``body``: JSON text/bytes or a decoded
    object (native entries arrive decoded).
    """

    kind: OriginKind
    ref: str
    destination: str
    body: Any

    @classmethod
    def kv(cls, key: str, body: Any) -> Document:
        return cls(kind="kv", ref=key, destination=key.removeprefix(INTENTIONS_PREFIX), body=body)

    @classmethod
    def native(cls, entry: Any) -> Document:
        name = entry.get("Name") if isinstance(entry, dict) else None
        name = name if isinstance(name, str) and name else "?"
        return cls(kind="native", ref=f"{KIND}/{name}", destination=name, body=entry)


@dataclass(slots=True)
class CompileResult:
    """Tables by destination (``*`` included), rejected documents, warnings, frozen destinations.

    ``frozen_all`` is True when a bad wildcard-destination document without a last good version
    leaves every table as it is in KV. A frozen destination's table must be neither written nor
    deleted.
    """

    tables: dict[str, CompiledTable]
    errors: list[DocumentError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    frozen: set[str] = field(default_factory=set)
    frozen_all: bool = False
    used_last_good: list[str] = field(default_factory=list)

    def is_frozen(self, destination: str) -> bool:
        return self.frozen_all or destination in self.frozen


def _rules_of(entry: IntentionsEntry, kind: OriginKind, ref: str) -> list[CompiledRule]:
    rules = []
    for i, src in enumerate(entry.sources):
        mode: Mode = src.mode or entry.mode or "enforce"
        rules.append(CompiledRule(
            source=src.name, destination=entry.name,
            precedence=intention_precedence(source=src.name, destination=entry.name),
            origin=Origin(kind=kind, ref=ref, index=i, intention_id=src.legacy_id),
            action=src.action, permissions=src.permissions, mode=mode, description=src.description,
        ))
    return rules


def _sort_key(rule: CompiledRule) -> tuple[int, str, int, str, int]:
    return (-rule.precedence, rule.source, 0 if rule.origin.kind == "kv" else 1, rule.origin.ref, rule.origin.index)


def _same_definition(a: CompiledRule, b: CompiledRule) -> bool:
    return a.action == b.action and a.permissions == b.permissions and a.mode == b.mode


def _pair_warnings(dest: str, rules: list[CompiledRule]) -> list[str]:
    by_pair: dict[str, list[CompiledRule]] = {}
    for r in rules:
        by_pair.setdefault(r.source, []).append(r)
    warnings = []
    for src, defs in sorted(by_pair.items()):
        if len(defs) > 1:
            origins = " and ".join(str(d.origin) for d in sorted(defs, key=_sort_key))
            same = all(_same_definition(defs[0], d) for d in defs[1:])
            warnings.append(
                f"intention {src} -> {dest} is defined in both {origins}"
                + (" (identically)" if same else "; they differ, so a request is allowed only when every "
                   "definition allows it (deny wins)")
            )
    return warnings


_Group = tuple[tuple[OriginKind, str, IntentionsEntry], ...]
_TableCache = dict[str, tuple[tuple[_Group, _Group, str], CompiledTable]]


def compile_tables(entries: Iterable[tuple[Document, IntentionsEntry]], default_policy: Action, *,
                   cache: _TableCache | None = None) -> tuple[dict[str, CompiledTable], list[str]]:
    """Compile valid entries (from both sources) into tables; returns (tables, warnings).

    Always returns the ``*`` table. ``cache`` (owned by a :class:`Compiler`) reuses the table of a
    destination whose documents (and the wildcard documents) are unchanged, so a change to one
    destination costs one table, not all of them. Raises ValueError for a bad ``default_policy``.
    """
    if default_policy not in ACTIONS:
        raise ValueError(f"default policy must be 'allow' or 'deny', not {default_policy!r}")
    groups: dict[str, list[tuple[OriginKind, str, IntentionsEntry]]] = {}
    for doc, entry in entries:
        groups.setdefault(entry.name, []).append((doc.kind, doc.ref, entry))
    frozen_groups = {d: tuple(sorted(g, key=lambda x: (x[0], x[1]))) for d, g in groups.items()}
    wild_group = frozen_groups.get(WILDCARD, ())
    wild_rules = [r for kind, ref, e in wild_group for r in _rules_of(e, kind, ref)]
    wild_warnings = _pair_warnings(WILDCARD, wild_rules)
    wild_modes = [e.mode for _, _, e in wild_group if e.mode is not None]
    warnings: list[str] = list(wild_warnings)
    tables: dict[str, CompiledTable] = {}
    for dest in sorted(set(frozen_groups) | {WILDCARD}):
        own_group = frozen_groups.get(dest, ()) if dest != WILDCARD else ()
        key = (own_group, wild_group, default_policy)
        cached = cache.get(dest) if cache is not None else None
        if cached is not None and cached[0] == key:
            tables[dest] = cached[1]
            warnings.extend(w for w in cached[1].warnings if w not in wild_warnings)
            continue
        own_rules = [r for kind, ref, e in own_group for r in _rules_of(e, kind, ref)]
        own_warnings = _pair_warnings(dest, own_rules) if dest != WILDCARD else []
        warnings.extend(own_warnings)
        modes = [e.mode for _, _, e in own_group if e.mode is not None] or wild_modes
        mode: Mode = "enforce" if not modes or "enforce" in modes else "audit"
        table = CompiledTable(destination=dest, default_policy=default_policy,
                              rules=tuple(sorted(own_rules + wild_rules, key=_sort_key)), default_mode=mode,
                              warnings=tuple(own_warnings + wild_warnings)).with_version()
        tables[dest] = table
        if cache is not None:
            cache[dest] = (key, table)
    if cache is not None:
        for dest in set(cache) - set(tables):
            del cache[dest]
    return tables, warnings


class Compiler:
    """Validates and compiles both sources, remembering the last good version of every document.

    Pure and synchronous; the policy service owns one. ``compile`` may be called with the full
    current state of both sources as often as wanted: identical input gives identical tables.
    """

    def __init__(self, default_policy: Action = "deny") -> None:
        if default_policy not in ACTIONS:
            raise ValueError(f"default policy must be 'allow' or 'deny', not {default_policy!r}")
        self.default_policy: Action = default_policy
        self._last_good: dict[str, tuple[Any, IntentionsEntry]] = {}
        self._tables: _TableCache = {}

    def compile(self, documents: Iterable[Document]) -> CompileResult:
        good: list[tuple[Document, IntentionsEntry]] = []
        errors: list[DocumentError] = []
        frozen: set[str] = set()
        frozen_all = False
        used_last_good: list[str] = []
        seen_refs: set[str] = set()
        for doc in documents:
            seen_refs.add(doc.ref)
            last = self._last_good.get(doc.ref)
            if last is not None and last[0] == doc.body:  # unchanged since it was last parsed
                good.append((doc, last[1]))
                continue
            try:
                entry = parse_entry(doc.body, doc.ref,
                                    expect_name=doc.destination if doc.kind == "kv" else None)
            except DocumentError as exc:
                errors.append(exc)
                last = self._last_good.get(doc.ref)
                if last is not None:
                    good.append((doc, last[1]))
                    used_last_good.append(doc.ref)
                elif doc.destination == WILDCARD:
                    frozen_all = True
                else:
                    frozen.add(doc.destination)
                continue
            self._last_good[doc.ref] = (doc.body, entry)
            good.append((doc, entry))
        for ref in list(self._last_good):
            if ref not in seen_refs:  # the document was deleted: forget it
                del self._last_good[ref]
        tables, warnings = compile_tables(good, self.default_policy, cache=self._tables)
        for ref in used_last_good:
            warnings.append(f"{ref}: rejected; its last good version stays in force")
        return CompileResult(tables=tables, errors=errors, warnings=warnings, frozen=frozen,
                             frozen_all=frozen_all, used_last_good=used_last_good)


def validate_document(body: Any, ref: str = "document") -> list[str]:
    """Every problem of one document (empty when valid). For ``weft intention validate`` and the API."""
    try:
        parse_entry(body, ref)
    except DocumentError as exc:
        return exc.errors
    return []
