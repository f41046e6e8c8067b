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

from collections.abc import Iterable

from policies.evaluate import authorize
from policies.model import TCP, CompiledTable, Decision, GrpcRequest, HttpRequest, TcpRequest, header_map

NO_TABLE = Decision(allowed=False, reason="no compiled policy is available for this service yet (fail closed)")

__all__ = [
    "TCP",
    "Decision",
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
