"""Authorization as the sidecar applies it: the policy evaluator plus fail-closed and pass-through rules.

``policies.evaluate.authorize`` decides; this module adds what the sidecar needs around it:

- no compiled table yet (no policy service has ever run): every caller is denied, fail closed;
- :func:`passthrough` says whether a connection's decision holds for every call on it (an L4
  allow in enforce mode), so the inbound side may pass its bytes straight to the app;
- :func:`denial_message` is what a denied caller reads: the rule that decided and why;
- :func:`header_map` turns a request's header pairs into what the evaluator matches, every copy of
  a repeated header kept (a rule on it must hold for each), the same way for gRPC (both engines)
  and HTTP, so that authorization sees what the app will see.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

from policies.evaluate import authorize
from policies.model import TCP, CompiledTable, Decision, GrpcRequest, HttpRequest, TcpRequest, header_map

NO_TABLE = Decision(allowed=False, reason="no compiled policy is available for this service yet (fail closed)")

__all__ = [
    "TCP",
    "Decision",
    "GrpcMetadata",
    "GrpcRequest",
    "HttpRequest",
    "TcpRequest",
    "decide",
    "decision_label",
    "denial_message",
    "grpc_metadata",
    "header_map",
    "passthrough",
]


def grpc_metadata(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """A gRPC request's metadata as rules match it: pseudo-headers and binary (``-bin``) values left out,
    every copy of a repeated key kept (see ``header_map``)."""
    return header_map((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers
                      if not k.startswith(b":") and not k.endswith(b"-bin"))


class GrpcMetadata(Mapping[str, str]):
    """:func:`grpc_metadata` of a request's headers, built the first time a rule looks at it: most rules
    match on the method alone (or the decision is fixed per caller), and never do."""

    __slots__ = ("_headers", "_map")

    def __init__(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        self._headers = headers
        self._map: dict[str, str] | None = None

    def _built(self) -> dict[str, str]:
        built = self._map
        if built is None:
            built = self._map = grpc_metadata(self._headers)
            self._headers = ()
        return built

    @property
    def built(self) -> bool:
        return self._map is not None

    def __getitem__(self, key: str) -> str:
        return self._built()[key]

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return self._built().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._built()

    def __iter__(self) -> Iterator[str]:
        return iter(self._built())

    def __len__(self) -> int:
        return len(self._built())


def decide(table: CompiledTable | None, source: str, request: TcpRequest | HttpRequest | GrpcRequest) -> Decision:
    if table is None:
        return NO_TABLE
    return authorize(table, source, request)


def passthrough(decision: Decision) -> bool:
    """True when every call on a connection with this decision is allowed without looking at it."""
    return decision.allowed and not decision.audited and not decision.per_request


def decision_label(decision: Decision) -> str:
    """``allow``, ``deny`` or ``audit`` (a would-be denial let through by audit mode)."""
    if decision.audited:
        return "audit"
    return "allow" if decision.allowed else "deny"


def denial_message(decision: Decision, source: str, destination: str, what: str = "") -> str:
    """``weft: web -> api/pkg.Svc/Method denied: intention web -> api (KV weft/intentions/api Sources[0])
    denies``: the rule named once. The evaluator's reasons name their rule (or the default policy); a
    reason that does not gets the rule's label in front."""
    target = f"{destination}{what}" if what else destination
    reason = decision.reason
    if decision.rule is not None and decision.rule.rule_id not in reason:
        reason = f"{decision.rule_label}: {reason}"
    return f"weft: {source} -> {target} denied: {reason}"
