"""Intentions as Consul 1.9+ keeps them: ``service-intentions`` config entries, one per destination,
with the legacy intention view derived from them (pure: no I/O).

- ``normalize_entry``/``validate_entry``: Consul's ServiceIntentionsConfigEntry Normalize/Validate
  (Type defaults to ``consul``, Precedence computed 9/8/6/5, sources sorted by precedence, methods
  upper-cased; errors worded as Consul's).
- ``to_intentions``: the legacy ``Intention`` objects an entry stands for (``ID`` is the source's
  LegacyID: set for intentions made through the legacy ``POST /v1/connect/intentions``).
- ``upsert_source``/``remove_source``: what an exact or legacy intention write does to the entry.
- ``match``/``decide``: Consul's intention match (precedence order) and the first matching intention
  for a source, used by ``/v1/connect/intentions/check`` and ``/v1/agent/connect/authorize``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from consulkit.conventions import intention_precedence
from devagent.codec import DecodeError, decode_struct, expect_str, expect_str_map

WILDCARD = "*"
DEFAULT_NS = "default"
KIND = "service-intentions"
ALLOW, DENY = "allow", "deny"
META_VALUE_MAX = 512
HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE"}

HEADER_SPEC: dict[str, Any] = {"Name": None, "Present": None, "Exact": None, "Prefix": None, "Suffix": None,
                               "Contains": None, "Regex": None, "IgnoreCase": None, "Invert": None}
HTTP_SPEC: dict[str, Any] = {"PathExact": None, "PathPrefix": None, "PathRegex": None, "Header": [HEADER_SPEC],
                             "Methods": None}
PERMISSION_SPEC: dict[str, Any] = {"Action": None, "HTTP": HTTP_SPEC, "JWT": None}
SOURCE_SPEC: dict[str, Any] = {
    "Name": None, "Peer": None, "Partition": None, "Namespace": None, "SamenessGroup": None, "Action": None,
    "Permissions": [PERMISSION_SPEC], "Precedence": None, "LegacyID": None, "Type": None, "Description": None,
    "LegacyMeta": None, "LegacyCreateTime": None, "LegacyUpdateTime": None,
}
ENTRY_SPEC: dict[str, Any] = {"Kind": None, "Name": None, "Sources": [SOURCE_SPEC], "Meta": None, "JWT": None,
                              "Namespace": None, "Partition": None, "CreateIndex": None, "ModifyIndex": None}
INTENTION_SPEC: dict[str, Any] = {
    "ID": None, "Description": None, "SourcePeer": None, "SourceNS": None, "SourceName": None,
    "DestinationNS": None, "DestinationName": None, "SourcePartition": None, "DestinationPartition": None,
    "SourceSamenessGroup": None, "SourceType": None, "Action": None, "Permissions": [PERMISSION_SPEC],
    "Precedence": None, "Meta": None, "CreatedAt": None, "UpdatedAt": None, "Hash": None,
    "CreateIndex": None, "ModifyIndex": None,
}


class IntentionError(ValueError):
    """An intention or service-intentions entry Consul refuses; the message is Consul's."""


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


# ----- entries -----
def decode_entry(raw: Any) -> dict[str, Any]:
    """A service-intentions body with canonical keys (raises DecodeError)."""
    d = decode_struct(raw, ENTRY_SPEC)
    return {k: v for k, v in d.items() if k in ENTRY_SPEC and k not in ("CreateIndex", "ModifyIndex")}


def _permissions(perms: Any, what: str) -> list[dict[str, Any]]:
    if perms is None:
        return []
    if not isinstance(perms, list):
        raise IntentionError(f"{what}: expected a list")
    out = []
    for perm in perms:
        p = {k: v for k, v in perm.items() if v is not None}
        if "Action" in p:
            p["Action"] = str(p["Action"]).lower()
        http = p.get("HTTP")
        if isinstance(http, Mapping):
            http = {k: v for k, v in http.items() if v is not None}
            if isinstance(http.get("Methods"), list):
                http["Methods"] = [str(m).upper() for m in http["Methods"]]
            p["HTTP"] = http
        out.append(p)
    return out


def normalize_entry(entry: Mapping[str, Any], *, legacy_write: bool = False) -> dict[str, Any]:
    """Consul's Normalize: types, precedence, Type, sources sorted by precedence (stable)."""
    out = dict(entry)
    out["Kind"] = KIND
    out["Name"] = expect_str(out.get("Name"), "Name")
    if out.get("Meta") is not None:
        out["Meta"] = expect_str_map(out.get("Meta"), "Meta")
    sources = out.get("Sources") or []
    if not isinstance(sources, list):
        raise DecodeError("Sources: expected a list")
    norm = []
    for i, src in enumerate(sources):
        s = {k: v for k, v in dict(src).items() if v is not None}
        s["Name"] = expect_str(s.get("Name"), f"Sources[{i}].Name")
        if "Action" in s:
            s["Action"] = expect_str(s["Action"], f"Sources[{i}].Action").lower()
        s["Type"] = expect_str(s.get("Type"), f"Sources[{i}].Type") or "consul"
        s["Permissions"] = _permissions(s.get("Permissions"), f"Sources[{i}].Permissions")
        if not s["Permissions"]:
            del s["Permissions"]
        s["Precedence"] = intention_precedence(source=s["Name"], destination=out["Name"])
        if not legacy_write:
            for key in ("LegacyID", "LegacyCreateTime", "LegacyUpdateTime"):
                s.pop(key, None)
        elif s.get("LegacyMeta") is None:
            s["LegacyMeta"] = {}
        norm.append(s)
    norm.sort(key=lambda s: -int(s["Precedence"]))
    out["Sources"] = norm
    return out


def _wildcards(name: str, what: str) -> None:
    if name != WILDCARD and WILDCARD in name:
        raise IntentionError(f"{what}Name: wildcard character '*' cannot be used with partial values")


def validate_entry(entry: Mapping[str, Any], *, legacy_write: bool = False) -> None:
    """Consul's ServiceIntentionsConfigEntry.validate for the default namespace and partition."""
    name = entry.get("Name", "")
    if not name:
        raise IntentionError("Name is required")
    _wildcards(name, "")
    dest_wild = name == WILDCARD
    if legacy_write and entry.get("Meta"):
        raise IntentionError("Meta must be omitted for legacy intention writes")
    sources = entry.get("Sources") or []
    if not sources:
        raise IntentionError("At least one source is required")
    seen: set[tuple[str, str]] = set()
    for i, src in enumerate(sources):
        sname = src.get("Name", "")
        if not sname:
            raise IntentionError(f"Sources[{i}].Name is required")
        _wildcards(sname, f"Sources[{i}].")
        if len(src.get("Description", "") or "") > META_VALUE_MAX:
            raise IntentionError(f"Sources[{i}].Description exceeds maximum length {META_VALUE_MAX}")
        if not legacy_write and src.get("LegacyMeta"):
            raise IntentionError(f"Sources[{i}].LegacyMeta must be omitted")
        perms = src.get("Permissions") or []
        if legacy_write or not perms:
            if src.get("Action") not in (ALLOW, DENY):
                raise IntentionError(f"Sources[{i}].Action must be set to 'allow' or 'deny'")
        if perms and src.get("Action"):
            raise IntentionError(f"Sources[{i}].Action must be omitted if Permissions are specified")
        if dest_wild and perms:
            raise IntentionError(f"Sources[{i}].Permissions cannot be specified on intentions with wildcarded "
                                 "destinations")
        if src.get("Type", "consul") != "consul":
            raise IntentionError(f"Sources[{i}].Type must be set to 'consul'")
        for j, perm in enumerate(perms):
            _validate_permission(perm, i, j)
        key = (src.get("Peer", "") or "", sname)
        if key in seen:
            raise IntentionError(f'Sources[{i}] defines "{sname}" more than once')
        seen.add(key)


def _validate_permission(perm: Mapping[str, Any], i: int, j: int) -> None:
    if perm.get("Action") not in (ALLOW, DENY):
        raise IntentionError(f"Sources[{i}].Permissions[{j}].Action must be set to 'allow' or 'deny'")
    prefix = f"Sources[{i}].Permissions[{j}].HTTP"
    http = perm.get("HTTP")
    if not isinstance(http, Mapping):
        raise IntentionError(f"{prefix} is required")
    parts = 0
    for field in ("PathExact", "PathPrefix"):
        value = http.get(field) or ""
        if value:
            parts += 1
            if not value.startswith("/"):
                raise IntentionError(f"{prefix}.{field} doesn't start with '/': \"{value}\"")
    if http.get("PathRegex"):
        parts += 1
    if parts > 1:
        raise IntentionError(f"{prefix} should only contain at most one of PathExact, PathPrefix, or PathRegex")
    count = parts
    for k, hdr in enumerate(http.get("Header") or []):
        if not hdr.get("Name"):
            raise IntentionError(f"{prefix}.Header[{k}] missing required Name field")
        n = sum(1 for f in ("Present", "Exact", "Regex", "Prefix", "Suffix") if hdr.get(f))
        if n != 1:
            raise IntentionError(f"{prefix}.Header[{k}] should only contain one of Present, Exact, Prefix, "
                                 "Suffix, or Regex")
        count += 1
    methods = http.get("Methods") or []
    if methods:
        found: set[str] = set()
        for m in methods:
            if m not in HTTP_METHODS:
                raise IntentionError(f'{prefix}.Methods contains an invalid method "{m}"')
            if m in found:
                raise IntentionError(f'{prefix}.Methods contains "{m}" more than once')
            found.add(m)
        count += 1
    if count == 0:
        raise IntentionError(f"{prefix} should not be empty")


# ----- the legacy view -----
def _hash(ixn: Mapping[str, Any]) -> str:
    fields = {k: ixn.get(k) for k in ("SourceNS", "SourceName", "DestinationNS", "DestinationName", "SourceType",
                                       "Action", "Permissions", "Meta", "Description")}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).digest()
    return base64.b64encode(digest).decode()


def intention_of(entry: Mapping[str, Any], src: Mapping[str, Any]) -> dict[str, Any]:
    """Consul's SourceIntention.ToIntention (api.Intention JSON)."""
    ixn: dict[str, Any] = {
        "ID": src.get("LegacyID", ""),
        "Description": src.get("Description", ""),
        "SourceNS": DEFAULT_NS,
        "SourceName": src["Name"],
        "DestinationNS": DEFAULT_NS,
        "DestinationName": entry["Name"],
        "SourceType": src.get("Type", "consul"),
        "Action": src.get("Action", ""),
    }
    if src.get("Peer"):
        ixn["SourcePeer"] = src["Peer"]
    if src.get("Permissions"):
        ixn["Permissions"] = src["Permissions"]
    ixn["Precedence"] = src.get("Precedence", intention_precedence(source=src["Name"], destination=entry["Name"]))
    ixn["Meta"] = dict(src.get("LegacyMeta") or entry.get("Meta") or {})
    ixn["CreatedAt"] = src.get("LegacyCreateTime") or src.get("_CreatedAt") or "0001-01-01T00:00:00Z"
    ixn["UpdatedAt"] = src.get("LegacyUpdateTime") or src.get("_UpdatedAt") or "0001-01-01T00:00:00Z"
    ixn["Hash"] = _hash(ixn)
    ixn["CreateIndex"] = entry.get("CreateIndex", 0)
    ixn["ModifyIndex"] = entry.get("ModifyIndex", 0)
    return ixn


def to_intentions(entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [intention_of(entry, src) for src in entry.get("Sources") or []]


def intention_string(ixn: Mapping[str, Any]) -> str:
    """Consul's Intention.String(), used in connect/authorize reasons."""
    id_part = f"ID: {ixn['ID']}, " if ixn.get("ID") else ""
    detail = f"Permissions: {len(ixn['Permissions'])}" if ixn.get("Permissions") else \
        f"Action: {str(ixn.get('Action', '')).upper()}"
    return f"{ixn['SourceName']} => {ixn['DestinationName']} ({id_part}Precedence: {ixn['Precedence']}, {detail})"


def parse_component(text: str, what: str) -> str:
    """Consul's parseIntentionStringComponent: ``name``, ``ns/name`` or ``partition/ns/name`` -> name."""
    parts = text.split("/")
    if len(parts) > 3:
        raise IntentionError(f"{what}: input can contain at most two '/'")
    return parts[-1]


def decode_intention(raw: Any) -> dict[str, Any]:
    """A legacy/exact intention body with canonical keys and types (raises DecodeError)."""
    d = decode_struct(raw, INTENTION_SPEC)
    out: dict[str, Any] = {}
    for field in ("ID", "Description", "SourcePeer", "SourceNS", "SourceName", "DestinationNS", "DestinationName",
                  "SourcePartition", "DestinationPartition", "SourceType", "Action"):
        out[field] = expect_str(d.get(field), field)
    out["Meta"] = expect_str_map(d.get("Meta"), "Meta")
    perms = d.get("Permissions")
    out["Permissions"] = _permissions(perms, "Permissions") if perms else []
    out["Action"] = out["Action"].lower()
    return out


def source_from_intention(ixn: Mapping[str, Any], *, legacy_id: str = "", created: str = "",
                          updated: str = "") -> dict[str, Any]:
    """Consul's Intention.ToConfigEntry source (legacy fields only for a legacy write)."""
    src: dict[str, Any] = {"Name": ixn["SourceName"], "Type": ixn.get("SourceType") or "consul"}
    if ixn.get("SourcePeer"):
        src["Peer"] = ixn["SourcePeer"]
    if ixn.get("Permissions"):
        src["Permissions"] = ixn["Permissions"]
    if ixn.get("Action"):
        src["Action"] = ixn["Action"]
    if ixn.get("Description"):
        src["Description"] = ixn["Description"]
    if legacy_id:
        src["LegacyID"] = legacy_id
        src["LegacyMeta"] = dict(ixn.get("Meta") or {})
        src["LegacyCreateTime"] = created
        src["LegacyUpdateTime"] = updated
    return src


def upsert_source(entry: Mapping[str, Any] | None, dest: str, src: dict[str, Any], *, now: str
                  ) -> dict[str, Any]:
    """The entry for ``dest`` with ``src`` replacing the source of the same name (or appended)."""
    base: dict[str, Any] = dict(entry) if entry else {"Kind": KIND, "Name": dest, "Sources": []}
    sources = []
    replaced = False
    for old in base.get("Sources") or []:
        if old["Name"] == src["Name"] and old.get("Peer", "") == src.get("Peer", ""):
            new = {**src, "_CreatedAt": old.get("_CreatedAt") or now, "_UpdatedAt": now}
            if old.get("LegacyID") and not new.get("LegacyID"):
                new["LegacyID"] = old["LegacyID"]
                new["LegacyCreateTime"] = old.get("LegacyCreateTime") or now
                new["LegacyUpdateTime"] = now
                new.setdefault("LegacyMeta", dict(old.get("LegacyMeta") or {}))
            sources.append(new)
            replaced = True
        else:
            sources.append(old)
    if not replaced:
        sources.append({**src, "_CreatedAt": now, "_UpdatedAt": now})
    base["Sources"] = sources
    return base


def remove_source(entry: Mapping[str, Any], source: str) -> dict[str, Any] | None:
    """The entry without the source named ``source``; None when no source is left."""
    sources = [s for s in entry.get("Sources") or [] if s["Name"] != source]
    if not sources:
        return None
    return {**entry, "Sources": sources}


# ----- matching -----
def _sort_key(ixn: Mapping[str, Any]) -> tuple[int, str, str, str, str]:
    return (-int(ixn["Precedence"]), ixn.get("SourceNS", ""), ixn["SourceName"], ixn.get("DestinationNS", ""),
            ixn["DestinationName"])


def match(intentions: Iterable[Mapping[str, Any]], by: str, name: str) -> list[dict[str, Any]]:
    """Intentions whose ``by`` side (source|destination) is ``name`` or ``*``, highest precedence first."""
    field = "SourceName" if by == "source" else "DestinationName"
    hits = [dict(i) for i in intentions if i[field] in (name, WILDCARD)]
    return sorted(hits, key=_sort_key)


def decide(intentions: Iterable[Mapping[str, Any]], source: str, destination: str) -> dict[str, Any] | None:
    """The intention that governs source -> destination: the first match in precedence order."""
    for ixn in match(intentions, "destination", destination):
        if ixn["SourceName"] in (source, WILDCARD) and not ixn.get("SourcePeer"):
            return ixn
    return None


def allowed(ixn: Mapping[str, Any] | None, default_allow: bool) -> bool:
    """``/v1/connect/intentions/check``: an L7 intention counts as deny; no match -> the default."""
    if ixn is None:
        return default_allow
    if ixn.get("Permissions"):
        return False
    return ixn.get("Action") == ALLOW


def spiffe_service(uri: str) -> tuple[str, str] | None:
    """``spiffe://<td>/ns/<ns>/dc/<dc>/svc/<svc>`` (optionally ``/ap/<partition>`` first) ->
    (namespace, service); None when the URI is not a Connect service identity."""
    if not uri.startswith("spiffe://"):
        return None
    rest = uri[len("spiffe://"):]
    host, _, path = rest.partition("/")
    if not host:
        return None
    parts = path.split("/")
    if len(parts) >= 2 and parts[0] == "ap":
        parts = parts[2:]
    if len(parts) == 6 and parts[0] == "ns" and parts[2] == "dc" and parts[4] == "svc" and parts[5]:
        return parts[1], parts[5]
    return None
