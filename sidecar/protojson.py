"""Protobuf messages as ProtoJSON objects, quickly, for the tap's payload previews (pure: no I/O).

``json_format.MessageToDict`` is a general printer: it builds a printer object per call and looks
at every field's type again for every value; on the tap's path, where every call's request and
response are decoded, it was most of what rendering a call cost. :func:`message_to_json` compiles,
once per message type, a plan (per field: its name and a converter chosen from its type) and walks
``ListFields()`` with it.

Its result is ``MessageToDict(message, preserving_proto_field_name=True)``'s: what the plan does not
cover makes the whole message fall back to ``MessageToDict`` (then any error is its error):
well-known types (``google.protobuf.*``: Any, Timestamp, the wrappers, Struct... have JSON forms of
their own), extensions, enum values that carry options (a JSON-name option may rename them),
``NullValue``, and integers of closed enums that name no value. Covered: scalars (64-bit integers as
strings, bytes as base64, infinite and NaN floats as strings, 32-bit floats as their shortest form),
enums by name (unknown values of open enums as integers), nested and recursive messages, repeated
fields and maps (keys as strings, booleans as ``true``/``false``).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.internal import type_checkers

Converter = Callable[[Any], Any]
MAX_PLANS = 1024  # message types remembered (bounded: descriptors come from the apps' reflection)
_SINGULAR, _REPEATED, _MAP = 0, 1, 2


class _NotCovered(Exception):
    """Something the plan does not cover: the message is printed by MessageToDict instead."""


# a message type -> {field descriptor: (JSON name, how it is stored, converter[, key converter])}
_Plan = dict[FieldDescriptor, tuple[str, int, Converter, Converter | None]]
_PLANS: dict[Descriptor, _Plan | None] = {}


def message_to_json(message: Any) -> Any:
    """``MessageToDict(message, preserving_proto_field_name=True)``, without its per-value dispatch."""
    try:
        return _object(message)
    except _NotCovered:
        return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _object(message: Any) -> dict[str, Any]:
    plan = _plan(message.DESCRIPTOR)
    out: dict[str, Any] = {}
    for fd, value in message.ListFields():
        step = plan.get(fd)
        if step is None:  # an extension (or a field the plan does not know)
            raise _NotCovered
        name, shape, conv, key_conv = step
        if shape == _SINGULAR:
            out[name] = conv(value)
        elif shape == _REPEATED:
            out[name] = [conv(v) for v in value]
        else:
            assert key_conv is not None
            out[name] = {key_conv(k): conv(value[k]) for k in value}
    return out


def _plan(desc: Descriptor) -> _Plan:
    plan = _PLANS.get(desc, False)
    if plan is False:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[desc] = _compile(desc)
    if plan is None:
        raise _NotCovered
    assert isinstance(plan, dict)
    return plan


def _compile(desc: Descriptor) -> _Plan | None:
    if desc.full_name.startswith("google.protobuf."):
        return None  # the well-known types have JSON forms of their own
    plan: _Plan = {}
    for fd in desc.fields:
        if _is_map(fd):
            assert fd.message_type is not None
            plan[fd] = (fd.name, _MAP, _converter(fd.message_type.fields_by_name["value"]), _map_key)
        else:
            plan[fd] = (fd.name, _REPEATED if _repeated(fd) else _SINGULAR, _converter(fd), None)
    return plan


def _repeated(fd: FieldDescriptor) -> bool:
    repeated = getattr(fd, "is_repeated", None)  # newer protobuf; `label` is deprecated there
    if repeated is None:
        repeated = getattr(fd, "label", None) == FieldDescriptor.LABEL_REPEATED
    return bool(repeated)


def _is_map(fd: FieldDescriptor) -> bool:
    entry = fd.message_type
    return bool(fd.type == FieldDescriptor.TYPE_MESSAGE and entry is not None and entry.has_options
                and entry.GetOptions().map_entry)


def _map_key(key: Any) -> str:
    if key is True:
        return "true"
    if key is False:
        return "false"
    return str(key)


def _same(value: Any) -> Any:
    return value


def _bytes(value: bytes) -> str:
    return base64.b64encode(value).decode("utf-8")


def _special_float(value: float) -> str | None:
    if math.isinf(value):
        return "-Infinity" if value < 0.0 else "Infinity"
    if math.isnan(value):
        return "NaN"
    return None


def _double(value: float) -> Any:
    special = _special_float(value)
    return value if special is None else special


def _float(value: float) -> Any:
    special = _special_float(value)
    return type_checkers.ToShortestFloat(value) if special is None else special


def _enum(enum: EnumDescriptor) -> Converter:
    if enum.full_name == "google.protobuf.NullValue":
        def null(value: Any) -> Any:
            raise _NotCovered
        return null
    names = {v.number: v.name for v in enum.values if not v.has_options}
    known = {v.number for v in enum.values}
    closed = getattr(enum, "is_closed", True)

    def by_name(value: int) -> Any:
        name = names.get(value)
        if name is not None:
            return name
        if value in known or closed:  # a value with options, or one a closed enum does not name
            raise _NotCovered
        return value  # an open enum's unknown value: its number
    return by_name


def _converter(fd: FieldDescriptor) -> Converter:
    cpp = fd.cpp_type
    if cpp == FieldDescriptor.CPPTYPE_MESSAGE:
        return _object
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        assert fd.enum_type is not None
        return _enum(fd.enum_type)
    if cpp == FieldDescriptor.CPPTYPE_STRING:
        return _bytes if fd.type == FieldDescriptor.TYPE_BYTES else str
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return bool
    if cpp in (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64):
        return str
    if cpp == FieldDescriptor.CPPTYPE_FLOAT:
        return _float
    if cpp == FieldDescriptor.CPPTYPE_DOUBLE:
        return _double
    return _same
