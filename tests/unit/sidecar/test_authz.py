"""What a denied caller reads (the deciding rule named once, with its origin), and the inbound side's one
authorization step (sidecar.authorizer): counted, logged, worded the same for every protocol."""

from __future__ import annotations

from ca.identity import SpiffeId
from policies.model import TCP, GrpcRequest, RepeatedHeader
from sidecar import authz
from sidecar.authorizer import Authorizer
from sidecar.telemetry import Telemetry
from tests.unit.policies.test_evaluate import build, entry, l4, l7, perm


def test_an_l4_denial_names_its_rule_once() -> None:
    tables = build([entry("greeter", l4("frontend", "deny"))])
    decision = authz.decide(tables["greeter"], "frontend", GrpcRequest("/weft.demo.v1.Greeter/SayHello", {}))
    message = authz.denial_message(decision, "frontend", "greeter", "/weft.demo.v1.Greeter/SayHello")
    rule = "frontend -> greeter (KV weft/intentions/greeter Sources[0])"
    assert message == f"weft: frontend -> greeter/weft.demo.v1.Greeter/SayHello denied: intention {rule} denies"
    assert message.count(rule) == 1


def test_an_l7_denial_names_its_permission_once() -> None:
    tables = build([entry("api", l7("web", perm("deny", PathPrefix="/admin")))])
    decision = authz.decide(tables["api"], "web", GrpcRequest("/admin.Svc/Do", {}))
    message = authz.denial_message(decision, "web", "api", "/admin.Svc/Do")
    assert message.count("web -> api (KV weft/intentions/api Sources[0])") == 1
    assert "Permissions[0] denies" in message


def test_default_policy_and_no_table_say_why() -> None:
    tables = build([entry("api", l4("web", "allow"))])
    decision = authz.decide(tables["api"], "other", TCP)
    assert authz.denial_message(decision, "other", "api") == (
        "weft: other -> api denied: no intention matches this source -> api; default policy deny")
    assert authz.denial_message(authz.decide(None, "web", TCP), "web", "api") == (
        "weft: web -> api denied: no compiled policy is available for this service yet (fail closed)")


# -- the inbound side's one authorization step (sidecar.authorizer) ------------------------------

class _Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, object]]] = []

    def warning(self, now: float, event: str, **fields: object) -> None:
        self.lines.append((event, fields))


def _authorizer() -> tuple[Authorizer, Telemetry, _Log]:
    telemetry, log = Telemetry(), _Log()
    return Authorizer(telemetry, clock=lambda: 0.0, log=log), telemetry, log  # type: ignore[arg-type]


def _decisions(telemetry: Telemetry, decision: str) -> float:
    return sum(s.value for m in telemetry.registry.collect() if m.name == "weft_authz_decisions"
               for s in m.samples if s.name.endswith("_total") and s.labels["decision"] == decision)


def test_a_denied_call_is_counted_logged_once_and_answered_with_its_rule() -> None:
    auth, telemetry, log = _authorizer()
    tables = build([entry("greeter", l4("frontend", "deny"))])
    caller = SpiffeId.for_service("example.org", "frontend")
    verdict = auth.check(tables["greeter"], caller, "greeter", GrpcRequest("/weft.demo.v1.Greeter/SayHello", {}),
                         "/weft.demo.v1.Greeter/SayHello")
    assert not verdict.allowed
    assert verdict.denial == authz.denial_message(verdict.decision, "frontend", "greeter",
                                                  "/weft.demo.v1.Greeter/SayHello")
    assert _decisions(telemetry, "deny") == 1
    assert [event for event, _ in log.lines] == ["denied"]
    assert log.lines[0][1]["source"] == "frontend" and log.lines[0][1]["call"] == "/weft.demo.v1.Greeter/SayHello"


def test_an_audited_call_is_allowed_logged_as_would_deny_and_counted_as_audit() -> None:
    auth, telemetry, log = _authorizer()
    tables = build([entry("db", l4("web", "deny", Mode="audit"))])
    verdict = auth.check(tables["db"], SpiffeId.for_service("example.org", "web"), "db", TCP)
    assert verdict.allowed and verdict.denial is None and verdict.decision.audited
    assert _decisions(telemetry, "audit") == 1
    assert [event for event, _ in log.lines] == ["audit_would_deny"]
    assert "call" not in log.lines[0][1]  # a connection, not a call


def test_an_allowed_call_is_counted_and_not_logged() -> None:
    auth, telemetry, log = _authorizer()
    tables = build([entry("api", l4("web", "allow"))])
    assert auth.check(tables["api"], SpiffeId.for_service("example.org", "web"), "api", TCP).allowed
    assert _decisions(telemetry, "allow") == 1 and log.lines == []


def test_without_a_table_every_caller_is_denied_fail_closed() -> None:
    auth, _, _ = _authorizer()
    verdict = auth.check(None, SpiffeId.for_service("example.org", "web"), "api", TCP)
    assert verdict.denial is not None and "fail closed" in verdict.denial


def test_grpc_metadata_keeps_every_copy_and_leaves_out_pseudo_and_binary_headers() -> None:
    headers = [(b":path", b"/a.S/M"), (b"x-team", b"a"), (b"X-Team", b"b"), (b"trace-bin", b"\x00\x01")]
    metadata = authz.grpc_metadata(headers)
    assert set(metadata) == {"x-team"}
    assert isinstance(metadata["x-team"], RepeatedHeader) and metadata["x-team"].values == ("a", "b")


def test_grpc_metadata_is_built_only_when_a_rule_looks_at_it() -> None:
    headers = [(b":path", b"/a.S/M"), (b"x-team", b"a"), (b"X-Team", b"b"), (b"trace-bin", b"\x00\x01")]
    by_path = build([entry("api", l7("web", perm("allow", PathPrefix="/a.S/")))])["api"]
    lazy = authz.GrpcMetadata(headers)
    assert authz.decide(by_path, "web", GrpcRequest("/a.S/M", lazy)).allowed and not lazy.built
    by_header = build([entry("api", l7("web", perm("allow", PathPrefix="/a.S/",
                                                   Header=[{"Name": "x-team", "Exact": "a"}])))])["api"]
    lazy = authz.GrpcMetadata(headers)
    # every copy of x-team must match: "b" does not, so the call is refused, as with the eager map
    eager = authz.decide(by_header, "web", GrpcRequest("/a.S/M", authz.grpc_metadata(headers)))
    assert authz.decide(by_header, "web", GrpcRequest("/a.S/M", lazy)).allowed is eager.allowed is False
    assert lazy.built and dict(lazy) == authz.grpc_metadata(headers) and len(lazy) == 1
    assert lazy.get("x-team") == authz.grpc_metadata(headers)["x-team"] and "trace-bin" not in lazy
