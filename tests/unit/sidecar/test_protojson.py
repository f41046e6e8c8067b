"""The tap's protobuf-to-JSON printer gives exactly what json_format.MessageToDict gives, for every kind
of field, and leaves what it does not cover to MessageToDict."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory, timestamp_pb2

from sidecar import protojson
from sidecar.protojson import message_to_json

F = descriptor_pb2.FieldDescriptorProto
SCALARS = {  # field name -> (type, random value maker)
    "i32": (F.TYPE_INT32, lambda r: r.choice([0, 1, -1, 2**31 - 1, -(2**31)])),
    "i64": (F.TYPE_INT64, lambda r: r.choice([0, 5, -7, 2**63 - 1, -(2**63), 2**53 + 1])),
    "u32": (F.TYPE_UINT32, lambda r: r.choice([0, 9, 2**32 - 1])),
    "u64": (F.TYPE_UINT64, lambda r: r.choice([0, 9, 2**64 - 1])),
    "s32": (F.TYPE_SINT32, lambda r: r.randint(-1000, 1000)),
    "s64": (F.TYPE_SINT64, lambda r: r.randint(-(2**62), 2**62)),
    "f32": (F.TYPE_FIXED32, lambda r: r.randint(0, 2**32 - 1)),
    "f64": (F.TYPE_FIXED64, lambda r: r.randint(0, 2**64 - 1)),
    "sf32": (F.TYPE_SFIXED32, lambda r: r.randint(-(2**31), 2**31 - 1)),
    "sf64": (F.TYPE_SFIXED64, lambda r: r.randint(-(2**63), 2**63 - 1)),
    "flt": (F.TYPE_FLOAT, lambda r: r.choice([0.1, -2.5, 1e30, math.inf, -math.inf, math.nan, 3.4e38])),
    "dbl": (F.TYPE_DOUBLE, lambda r: r.choice([0.1, -2.5, 1e300, math.inf, -math.inf, math.nan])),
    "flag": (F.TYPE_BOOL, lambda r: r.choice([True, False])),
    "text": (F.TYPE_STRING, lambda r: r.choice(["", "ann", "ü€😀", 'a "quoted" \\ line\n', "password=x"])),
    "blob": (F.TYPE_BYTES, lambda r: bytes(r.randrange(256) for _ in range(r.randint(0, 40)))),
}


def _types() -> dict[str, Any]:
    """A proto3 message with every kind of field (and a recursive child), built at run time."""
    pool = descriptor_pool.DescriptorPool()
    ts = descriptor_pb2.FileDescriptorProto()
    timestamp_pb2.DESCRIPTOR.CopyToProto(ts)
    pool.Add(ts)
    f = descriptor_pb2.FileDescriptorProto(name="t/all.proto", package="t", syntax="proto3",
                                           dependency=["google/protobuf/timestamp.proto"])
    color = f.enum_type.add(name="Color")
    color.value.add(name="COLOR_UNSET", number=0)
    color.value.add(name="RED", number=1)
    color.value.add(name="OLD_GREEN", number=2).options.deprecated = True  # a value with options
    m = f.message_type.add(name="All")
    number = 1
    for name, (typ, _) in SCALARS.items():
        m.field.add(name=name, number=number, type=typ, label=F.LABEL_OPTIONAL)
        m.field.add(name=f"many_{name}", number=number + 1, type=typ, label=F.LABEL_REPEATED)
        number += 2
    m.field.add(name="color", number=100, type=F.TYPE_ENUM, type_name=".t.Color", label=F.LABEL_OPTIONAL)
    m.field.add(name="colors", number=101, type=F.TYPE_ENUM, type_name=".t.Color", label=F.LABEL_REPEATED)
    m.field.add(name="child", number=102, type=F.TYPE_MESSAGE, type_name=".t.All", label=F.LABEL_OPTIONAL)
    m.field.add(name="children", number=103, type=F.TYPE_MESSAGE, type_name=".t.All", label=F.LABEL_REPEATED)
    m.field.add(name="when", number=104, type=F.TYPE_MESSAGE, type_name=".google.protobuf.Timestamp",
                label=F.LABEL_OPTIONAL)
    maps = [(F.TYPE_STRING, F.TYPE_INT64, None), (F.TYPE_INT32, F.TYPE_MESSAGE, ".t.All"),
            (F.TYPE_BOOL, F.TYPE_STRING, None), (F.TYPE_UINT64, F.TYPE_ENUM, ".t.Color")]
    for i, (key, value, vname) in enumerate(maps):
        entry = m.nested_type.add(name=f"Map{i}Entry")
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, type=key, label=F.LABEL_OPTIONAL)
        value_field = entry.field.add(name="value", number=2, type=value, label=F.LABEL_OPTIONAL)
        if vname:
            value_field.type_name = vname
        m.field.add(name=f"map{i}", number=110 + i, type=F.TYPE_MESSAGE, type_name=f".t.All.Map{i}Entry",
                    label=F.LABEL_REPEATED)
    pool.Add(f)
    return {"All": message_factory.GetMessageClass(pool.FindMessageTypeByName("t.All"))}


TYPES = _types()


def _fill(msg: Any, r: random.Random, depth: int = 0) -> None:
    for name, (_, make) in SCALARS.items():
        if r.random() < 0.6:
            setattr(msg, name, make(r))
        if r.random() < 0.3:
            getattr(msg, f"many_{name}").extend(make(r) for _ in range(r.randint(1, 3)))
    if r.random() < 0.7:
        msg.color = r.choice([0, 1, 2, 7])  # 7: an open enum's unknown value
    if r.random() < 0.3:
        msg.colors.extend(r.choice([1, 7]) for _ in range(2))
    if depth < 2 and r.random() < 0.5:
        _fill(msg.child, r, depth + 1)
    if depth < 2 and r.random() < 0.3:
        _fill(msg.children.add(), r, depth + 1)
    if r.random() < 0.5:
        msg.map0[r.choice(["a", "b", "ü"])] = r.randint(-(2**63), 2**63 - 1)
    if depth < 2 and r.random() < 0.3:
        _fill(msg.map1[r.randint(-5, 5)], r, depth + 1)
    if r.random() < 0.4:
        msg.map2[r.choice([True, False])] = "v"
    if r.random() < 0.3:
        msg.map3[2**64 - 1] = r.choice([1, 7])


def _same(a: Any, b: Any) -> bool:
    """Equal, NaN included (MessageToDict prints NaN as the string "NaN", so only floats differ)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def test_every_kind_of_field_prints_as_message_to_dict_prints_it() -> None:
    r = random.Random(11)
    for _ in range(300):
        msg = TYPES["All"]()
        _fill(msg, r)
        if r.random() < 0.2:
            msg.when.seconds = r.randint(0, 2**33)  # a well-known type inside: MessageToDict prints it
        expected = json_format.MessageToDict(msg, preserving_proto_field_name=True)
        assert _same(message_to_json(msg), expected), msg


def test_what_the_plan_covers_does_not_go_through_message_to_dict(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    real = json_format.MessageToDict

    def counting(message: Any, **kw: Any) -> Any:
        calls.append(message)
        return real(message, **kw)

    monkeypatch.setattr(protojson.json_format, "MessageToDict", counting)
    msg = TYPES["All"](i64=5, text="x", blob=b"\x00\xff", color=1, flt=0.1)
    msg.map0["k"] = 1
    msg.child.colors.append(7)
    assert message_to_json(msg) == {"i64": "5", "text": "x", "blob": "AP8=", "color": "RED", "flt": 0.1,
                                    "map0": {"k": "1"}, "child": {"colors": [7]}}
    assert calls == []
    # a well-known type, or an enum value with options: the whole message goes to MessageToDict
    with_time = TYPES["All"](text="x")
    with_time.when.seconds = 1
    assert message_to_json(with_time) == {"text": "x", "when": "1970-01-01T00:00:01Z"}
    assert message_to_json(TYPES["All"](color=2)) == {"color": "OLD_GREEN"}
    assert len(calls) == 2
    assert message_to_json(timestamp_pb2.Timestamp(seconds=2)) == "1970-01-01T00:00:02Z"


def test_extensions_and_closed_enums_are_left_to_message_to_dict() -> None:
    pool = descriptor_pool.DescriptorPool()
    f = descriptor_pb2.FileDescriptorProto(name="t/two.proto", package="t2", syntax="proto2")
    kind = f.enum_type.add(name="Kind")
    kind.value.add(name="A", number=1)
    m = f.message_type.add(name="P2")
    m.field.add(name="kind", number=1, type=F.TYPE_ENUM, type_name=".t2.Kind", label=F.LABEL_OPTIONAL)
    m.extension_range.add(start=100, end=200)
    f.extension.add(name="ext", number=100, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL, extendee=".t2.P2")
    pool.Add(f)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("t2.P2"))
    msg = cls(kind=1)
    assert message_to_json(msg) == {"kind": "A"}
    msg.Extensions[pool.FindExtensionByName("t2.ext")] = 5
    assert message_to_json(msg) == json_format.MessageToDict(msg, preserving_proto_field_name=True) \
        == {"kind": "A", "[t2.ext]": 5}
