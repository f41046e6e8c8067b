"""Pure helpers shared by the dev agent's endpoints: Go durations, Consul-style body decoding, UUIDs.

No I/O here; everything is tested with plain values.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Mapping
from typing import Any

# Go's duration units and JSON key folding, re-exported for the agent's endpoints (one definition,
# shared with the mesh: consulkit.conventions)
from consulkit.conventions import HOUR as HOUR
from consulkit.conventions import MINUTE as MINUTE
from consulkit.conventions import MS as MS
from consulkit.conventions import NS as NS
from consulkit.conventions import SECOND as SECOND
from consulkit.conventions import US as US
from consulkit.conventions import DurationError, fold_key, format_duration_ns, parse_duration_ns

fold = fold_key
format_duration = format_duration_ns


class DecodeError(ValueError):
    """A request body or parameter that cannot be decoded; the message says what is wrong."""


def parse_duration(text: str) -> int:
    """Go's ``time.ParseDuration`` ("10s", "1m30s", "500ms", "-1.5h", "0") in nanoseconds; `DecodeError`
    (a 400 from the handlers) with Go's message on anything else."""
    try:
        return parse_duration_ns(text)
    except DurationError as exc:
        raise DecodeError(str(exc)) from None


def duration_value(value: Any, *, what: str = "duration") -> int:
    """A duration as Consul's decoders accept it: a Go duration string, or a number of nanoseconds."""
    if isinstance(value, bool):
        raise DecodeError(f"{what}: invalid duration {value!r}")
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except DecodeError as exc:
            raise DecodeError(f"{what}: {exc}") from None
    raise DecodeError(f"{what}: invalid duration {value!r}")


# A decoding spec: maps the canonical (CamelCase) field name to how its value is decoded:
#   None          keep the value as is (user data such as Meta keeps its keys untouched)
#   a Spec dict   decode a nested object with that spec
#   [Spec]        decode a list of objects, each with that spec
Spec = Mapping[str, Any]


def decode_struct(raw: Any, spec: Spec, *, what: str = "body", strict: bool = False) -> dict[str, Any]:
    """Return ``raw`` with its keys renamed to the canonical names of ``spec`` (matched with ``fold``).

    Keys not in ``spec`` are kept unchanged unless ``strict``, when they are an error (Consul rejects
    unknown fields on some endpoints). Raises ``DecodeError`` when ``raw`` is not an object.
    """
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise DecodeError(f"{what}: expected an object, got {_json_type(raw)}")
    folded = _folded(spec)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise DecodeError(f"{what}: non-string key {key!r}")
        canon = folded.get(fold(key))
        if canon is None:
            if strict:
                raise DecodeError(f"{what}: unknown field {key!r}")
            out[key] = value
            continue
        sub = spec[canon]
        if sub is not None and value is not None:
            if isinstance(sub, list):
                if not isinstance(value, list):
                    raise DecodeError(f"{what}.{canon}: expected a list, got {_json_type(value)}")
                value = [decode_struct(v, sub[0], what=f"{what}.{canon}[{i}]", strict=strict)
                         for i, v in enumerate(value)]
            else:
                value = decode_struct(value, sub, what=f"{what}.{canon}", strict=strict)
        out[canon] = value
    return out


_FOLDED: dict[int, tuple[Spec, dict[str, str]]] = {}


def _folded(spec: Spec) -> dict[str, str]:
    """fold(name) -> name for a spec, computed once per spec object (specs are module constants)."""
    hit = _FOLDED.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    table = {fold(name): name for name in spec}
    if len(_FOLDED) < 1024:
        _FOLDED[id(spec)] = (spec, table)
    return table


def lookup(obj: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """``obj[name]`` matching keys with ``fold`` (for ad-hoc access without a spec)."""
    if name in obj:
        return obj[name]
    want = fold(name)
    for key, value in obj.items():
        if isinstance(key, str) and fold(key) == want:
            return value
    return default


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def expect_str(value: Any, what: str, *, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise DecodeError(f"{what}: expected a string, got {_json_type(value)}")
    return value


def expect_int(value: Any, what: str, *, default: int = 0) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise DecodeError(f"{what}: expected an integer, got {_json_type(value)}")
    return int(value)


def expect_bool(value: Any, what: str, *, default: bool = False) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise DecodeError(f"{what}: expected a bool, got {_json_type(value)}")
    return value


def expect_str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DecodeError(f"{what}: expected a list of strings")
    return list(value)


def expect_str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
        raise DecodeError(f"{what}: expected an object of strings")
    return dict(value)


def parse_uint(text: str, what: str) -> int:
    """Go's ``strconv.ParseUint(text, 10, 64)``."""
    if not text.isdigit() or not text.isascii():
        raise DecodeError(f'strconv.ParseUint: parsing "{text}": invalid syntax ({what})')
    value = int(text)
    if value >= 1 << 64:
        raise DecodeError(f'strconv.ParseUint: parsing "{text}": value out of range ({what})')
    return value


def b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def unb64(text: str | None) -> bytes:
    if text is None:
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise DecodeError(f"illegal base64 data: {exc}") from None


def new_uuid() -> str:
    return str(uuid.uuid4())


_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def is_uuid(text: str) -> bool:
    return bool(_UUID_RE.match(text))


def uuid_index_error(text: str) -> str | None:
    """Why Consul's state store cannot look ``text`` up in a UUID index (its uuidStringToBytes, as
    go-memdb reports it), or None when ``text`` is a well-formed UUID."""
    if len(text) != 36:
        return "index error: UUID must be 36 characters"
    if any(text[i] != "-" for i in (8, 13, 18, 23)):
        return "index error: UUID improperly formatted"
    for ch in text.replace("-", ""):
        if ch not in "0123456789abcdefABCDEF":
            return f"index error: encoding/hex: invalid byte: U+{ord(ch):04X} {ch!r}"
    return None


def uuid_to_uint64(value: str) -> int:
    """Consul's event index: the XOR of the two 64-bit halves of a UUID."""
    lower = value[0:8] + value[9:13] + value[14:18]
    upper = value[19:23] + value[24:36]
    return int(lower, 16) ^ int(upper, 16)
