"""Fault injection for rehearsals (pure: randomness passed in).

The KV document ``weft/faults/<destination>``, applied at the destination's inbound::

    {"Delay": {"Percent": 10, "Duration": "200ms"},
     "Abort": {"Percent": 5, "GrpcStatus": 14, "HttpStatus": 503},
     "Sources": ["web"], "Methods": ["/pkg.Svc/Method"]}

``Delay`` and/or ``Abort`` (at least one); ``Percent`` 0-100 (fractions allowed); ``Duration`` a Go
duration up to ``MAX_DELAY``; ``GrpcStatus`` 1-16 (for gRPC calls), ``HttpStatus`` 200-599 (for
HTTP calls; both default: 14 UNAVAILABLE and 503). ``Sources`` (caller service names) and ``Methods``
(gRPC ``/pkg.Svc/Method`` or HTTP path prefixes) narrow what is affected. Delay and abort are drawn
independently, as Envoy's fault filter does. No key, no faults.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from catalog.models import parse_duration

KV_PREFIX = "weft/faults/"
MAX_DELAY = 60.0
MAX_LIST = 1000


class FaultError(ValueError):
    """A fault document that cannot be used; the message names the field."""


@dataclass(frozen=True)
class FaultDoc:
    delay_percent: float = 0.0
    delay: float = 0.0
    abort_percent: float = 0.0
    grpc_status: int = 14
    http_status: int = 503
    sources: frozenset[str] = frozenset()
    methods: tuple[str, ...] = ()


@dataclass(frozen=True)
class Fault:
    delay: float = 0.0
    abort: bool = False
    grpc_status: int = 14
    http_status: int = 503

    @property
    def any(self) -> bool:
        return self.delay > 0 or self.abort


NO_FAULT = Fault()


def _percent(obj: Mapping[str, Any], what: str) -> float:
    p = obj.get("Percent")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 100:
        raise FaultError(f"{what}.Percent: expected a number from 0 to 100, got {p!r}")
    return float(p)


def _fields(obj: Any, what: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise FaultError(f"{what}: expected an object")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise FaultError(f"{what}.{unknown[0]}: unknown field (expected {', '.join(allowed)})")
    return obj


def _strings(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise FaultError(f"{what}: expected a list of non-empty strings")
    if len(value) > MAX_LIST:
        raise FaultError(f"{what}: more than {MAX_LIST} items")
    return value


def parse_document(raw: str | bytes | Any, where: str = "document") -> FaultDoc:
    doc = raw
    if isinstance(raw, (str, bytes)):
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise FaultError(f"{where}: not valid JSON: {exc}") from None
    d = _fields(doc, where, ("Delay", "Abort", "Sources", "Methods"))
    if d.get("Delay") is None and d.get("Abort") is None:
        raise FaultError(f"{where}: neither Delay nor Abort is set")
    out: dict[str, Any] = {}
    if d.get("Delay") is not None:
        delay = _fields(d["Delay"], f"{where}.Delay", ("Percent", "Duration"))
        out["delay_percent"] = _percent(delay, f"{where}.Delay")
        duration = delay.get("Duration")
        if not isinstance(duration, str):
            raise FaultError(f"{where}.Delay.Duration: expected a duration like \"200ms\", got {duration!r}")
        try:
            seconds = parse_duration(duration, f"{where}.Delay.Duration")
        except ValueError as exc:
            raise FaultError(str(exc)) from None
        if not 0 < seconds <= MAX_DELAY:
            raise FaultError(f"{where}.Delay.Duration: must be more than 0 and at most {MAX_DELAY:g}s")
        out["delay"] = seconds
    if d.get("Abort") is not None:
        abort = _fields(d["Abort"], f"{where}.Abort", ("Percent", "GrpcStatus", "HttpStatus"))
        out["abort_percent"] = _percent(abort, f"{where}.Abort")
        g = abort.get("GrpcStatus", 14)
        if isinstance(g, bool) or not isinstance(g, int) or not 1 <= g <= 16:
            raise FaultError(f"{where}.Abort.GrpcStatus: expected a gRPC status code from 1 to 16, got {g!r}")
        h = abort.get("HttpStatus", 503)
        if isinstance(h, bool) or not isinstance(h, int) or not 200 <= h <= 599:
            raise FaultError(f"{where}.Abort.HttpStatus: expected an HTTP status from 200 to 599, got {h!r}")
        out["grpc_status"], out["http_status"] = g, h
    out["sources"] = frozenset(_strings(d.get("Sources"), f"{where}.Sources"))
    methods = _strings(d.get("Methods"), f"{where}.Methods")
    for i, m in enumerate(methods):
        if not m.startswith("/"):
            raise FaultError(f"{where}.Methods[{i}]: must start with '/' (\"/pkg.Service/Method\" or a path)")
    out["methods"] = tuple(methods)
    return FaultDoc(**out)


def applies(doc: FaultDoc, source: str, path: str) -> bool:
    if doc.sources and source not in doc.sources:
        return False
    if doc.methods:
        p = path.partition("?")[0]
        return any(p == m or (m.endswith("/") and p.startswith(m)) or p.startswith(m + "/") for m in doc.methods)
    return True


def decide(doc: FaultDoc | None, source: str, path: str, rng: random.Random) -> Fault:
    """The fault (if any) for one call of ``source`` to ``path``."""
    if doc is None or not applies(doc, source, path):
        return NO_FAULT
    delay = doc.delay if doc.delay_percent and rng.random() * 100 < doc.delay_percent else 0.0
    abort = bool(doc.abort_percent) and rng.random() * 100 < doc.abort_percent
    if not delay and not abort:
        return NO_FAULT
    return Fault(delay=delay, abort=abort, grpc_status=doc.grpc_status, http_status=doc.http_status)
