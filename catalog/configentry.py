"""Config entry files (HCL or JSON) as ``consul config write`` reads them (pure: no I/O).

``parse(text, source=..., fmt=...)`` returns the entry as a JSON object ready for ``PUT /v1/config``.
Consul's own CLI decodes HCL 1, where a block may appear inside an object literal
(``routes = [{ match { http { path_prefix = "/" } } }]``, as in Consul's docs); python-hcl2 reads
HCL 2 only, so such nested blocks are rewritten as attributes (``match = { ... }``) before parsing.
Blocks come out of HCL as lists of one object; fields Consul decodes as objects are collapsed back
(Consul's decoder does the same with ``HookWeakDecodeFromSlice``). Keys stay as written: Consul's
``PUT /v1/config`` matches snake_case and CamelCase itself, and user maps (``Meta``, subset names,
proxy ``Config``) must keep theirs.

Errors are ``ConfigEntryFileError`` naming the file and the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from catalog.servicedef import ServiceDefinitionError, guess_format, load_hcl
from consulkit.conventions import fold_key


class ConfigEntryFileError(ValueError):
    """A config entry file that cannot be read; the message names the file and what is wrong."""


fold = fold_key  # Consul's key matching (consulkit.conventions)


# Fields (folded) Consul decodes as one object: a block written once collapses into it.
OBJECT_FIELDS = frozenset(fold(k) for k in (
    "Match", "HTTP", "Destination", "Redirect", "LoadBalancer", "RingHashConfig", "LeastRequestConfig",
    "CookieConfig", "RequestHeaders", "ResponseHeaders", "Add", "Set", "Meta", "Config", "MeshGateway",
    "TransparentProxy", "Expose", "UpstreamConfig", "Defaults", "Limits", "PassiveHealthCheck", "RateLimits",
    "InstanceLevel", "TLS", "SDS", "JSONWebKeySet", "Local", "Remote", "RetryPolicy", "JWKSCluster",
    "Forwarding", "CacheConfig", "Peering", "Incoming", "Outgoing", "Policy", "JWT", "AccessLogs",
    "Subsets", "Failover", "EnforcingConsecutive5xx", "BalanceInboundConnections", "Override", "Default",
    "Status", "CookieConfig", "SanitizeXForwardedClientCert",
))
# Fields whose content is the user's (not decoded further: a list of one object in there stays a list).
OPAQUE_FIELDS = frozenset(fold(k) for k in ("Meta", "Config", "Arguments", "Add", "Set"))
# Map-valued fields whose values are objects (subset and failover names are keys).
MAP_OF_OBJECTS = frozenset(fold(k) for k in ("Subsets", "Failover"))


def parse(text: str, *, source: str = "", fmt: str | None = None) -> dict[str, Any]:
    """The entry in ``text`` (HCL or JSON; ``fmt`` "hcl"/"json", else guessed from ``source`` or text)."""
    where = f"{source}: " if source else ""
    kind = (fmt or guess_format(text, source)).lower()
    if kind == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigEntryFileError(f"{where}invalid JSON at line {exc.lineno} column {exc.colno}: "
                                       f"{exc.msg}") from None
    elif kind == "hcl":
        try:
            data = load_hcl(hcl1_blocks_as_attributes(text), source)
        except ServiceDefinitionError as exc:
            raise ConfigEntryFileError(str(exc)) from None
    else:
        raise ConfigEntryFileError(f"{where}unknown format {fmt!r}; use hcl or json")
    if not isinstance(data, dict):
        raise ConfigEntryFileError(f"{where}expected an object with Kind and Name")
    entry: dict[str, Any] = _collapse(data, "")
    kind_value = field(entry, "Kind")
    if kind_value is None:
        raise ConfigEntryFileError(f"{where}Payload does not contain a kind/Kind key at the top level")
    if not isinstance(kind_value, str) or not kind_value:
        raise ConfigEntryFileError(f"{where}Kind: must be a non-empty string")
    name = field(entry, "Name")
    if name is not None and not isinstance(name, str):
        raise ConfigEntryFileError(f"{where}Name: must be a string")
    return entry


def field(entry: Mapping[str, Any], name: str) -> Any:
    """``entry[name]`` matching keys as Consul does (case-insensitive, snake_case == CamelCase)."""
    want = fold(name)
    for key, value in entry.items():
        if fold(key) == want:
            return value
    return None


def kind_and_name(entry: Mapping[str, Any]) -> tuple[str, str]:
    kind = str(field(entry, "Kind") or "")
    name = str(field(entry, "Name") or "")
    if kind == "mesh":
        name = name or "mesh"
    if kind == "proxy-defaults":
        name = name or "global"
    return kind, name


def _collapse(value: Any, path: str) -> Any:
    if isinstance(value, list):
        return [_collapse(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        f = fold(key)
        here = f"{path}.{key}" if path else key
        if f in OBJECT_FIELDS and isinstance(item, list) and item and all(isinstance(i, dict) for i in item):
            if len(item) != 1:
                raise ConfigEntryFileError(f"{here}: given {len(item)} times; expected one block")
            item = item[0]
        if f in OPAQUE_FIELDS:
            out[key] = item
        elif f in MAP_OF_OBJECTS and isinstance(item, dict):
            out[key] = {k: _collapse(_one(v, f"{here}.{k}"), f"{here}.{k}") for k, v in item.items()}
        else:
            out[key] = _collapse(item, here)
    return out


def _one(value: Any, path: str) -> Any:
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        if len(value) != 1:
            raise ConfigEntryFileError(f"{path}: given {len(value)} times; expected one block")
        return value[0]
    return value


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def hcl1_blocks_as_attributes(text: str) -> str:
    """Rewrite ``name {`` inside an object literal or list (HCL 1 only) as ``name = {`` (HCL 2).

    A small scanner: strings and comments are skipped; a stack tells whether the innermost ``{``
    opened a block body (top level, after ``name {``/``name "label" {``) or an object literal
    (after ``=``, ``:``, ``[`` or ``,``). Inside a rewritten block every nested block is rewritten too."""
    out: list[str] = []
    stack: list[str] = []  # "block" | "object" | "list"
    i, n = 0, len(text)
    last = ""  # last significant character emitted
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i, last = j + 1, '"'
            continue
        if c == "#" or text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(text[i:j])
            i = j
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(text[i:j])
            i = j
            continue
        m = _IDENT.match(text, i) if (c.isalpha() or c == "_") else None
        if m is not None:
            k = m.end()
            while k < n and text[k] in " \t":
                k += 1
            in_literal = bool(stack) and stack[-1] in ("object", "list")
            if k < n and text[k] == "{" and in_literal and last not in ("=", ":"):
                out.append(m.group(0) + " = ")
                i, last = k, "="
                continue
            out.append(m.group(0))
            i, last = m.end(), "a"
            continue
        if c == "{":
            stack.append("object" if last in ("=", ":", "[", ",", "(") or (stack and stack[-1] == "list")
                         else "block")
        elif c == "[":
            stack.append("list")
        elif c in "}]" and stack:
            stack.pop()
        out.append(c)
        if not c.isspace():
            last = c
        i += 1
    return "".join(out)
