"""The inbound side's one authorization step: decide, count, log, and the text a denied caller reads.

Every way a caller reaches the app (a gRPC stream or an HTTP request on the per-call path, a TCP
connection, a pass-through connection) is authorized here and nowhere else, so the metric
(``weft_authz_decisions_total`` {decision, rule}), the log lines (``denied``, ``audit_would_deny``,
at most a few per second per sidecar, the rest counted in ``suppressed_before``: a denied caller
cannot flood the log) and the denial message are the same whatever the protocol.

The decision itself is ``sidecar.authz.decide`` (pure: the evaluator plus fail-closed); what the
evaluator matches is ``sidecar.authz.header_map`` of the request's headers, every copy of a repeated
header kept, so authorization sees what the app will see.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ca.identity import SpiffeId
from policies.model import CompiledTable
from sidecar import authz
from sidecar.telemetry import RateLimitedLog, Telemetry


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision and, when it denies, the message for the caller (PERMISSION_DENIED details or a 403 body)."""

    decision: authz.Decision
    denial: str | None

    @property
    def allowed(self) -> bool:
        return self.denial is None


class Authorizer:
    """Authorizes the callers of one sidecar's public port (see the module docstring)."""

    def __init__(self, telemetry: Telemetry, *, clock: Callable[[], float] = time.monotonic,
                 log: RateLimitedLog | None = None) -> None:
        self.telemetry = telemetry
        self.clock = clock
        self.log = log or RateLimitedLog("weft.sidecar.authz")

    def check(self, table: CompiledTable | None, caller: SpiffeId, destination: str,
              request: authz.TcpRequest | authz.HttpRequest | authz.GrpcRequest, what: str = "") -> Verdict:
        """Decide ``request`` from ``caller`` and settle it (count, log, message). ``what`` names the call
        in messages: ``/pkg.Svc/Method`` or `` GET /path``; empty for a connection."""
        return self.settle(authz.decide(table, caller.uri, request), caller, destination, what)

    def settle(self, decision: authz.Decision, caller: SpiffeId, destination: str, what: str = "") -> Verdict:
        """Count and log a decision already taken (a connection is decided at its handshake, before it is
        known whether its calls will be decided one by one)."""
        self.telemetry.decision(authz.decision_label(decision), decision.rule_label)
        if decision.allowed:
            if decision.audited:
                self._log("audit_would_deny", decision, caller, destination, what)
            return Verdict(decision, None)
        self._log("denied", decision, caller, destination, what)
        return Verdict(decision, authz.denial_message(decision, caller.service, destination, what))

    def _log(self, event: str, decision: authz.Decision, caller: SpiffeId, destination: str, what: str) -> None:
        fields = {"source": caller.service, "destination": destination, "rule": decision.rule_label,
                  "reason": decision.reason}
        if what:
            fields["call"] = what.strip()
        self.log.warning(self.clock(), event, **fields)
