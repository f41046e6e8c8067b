"""What a denied caller reads: the deciding rule named once, with its origin."""

from __future__ import annotations

from policies.model import TCP, GrpcRequest
from sidecar import authz
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
