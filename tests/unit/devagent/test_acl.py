"""Consul's ACL rule language and precedence."""

from __future__ import annotations

import pytest

from devagent import acl

RULES = '''
service "web" { policy = "write" }
service_prefix "" { policy = "read" }
service_prefix "internal-" { policy = "deny" }
service "internal-ok" { policy = "read" }
key_prefix "app/" { policy = "write" }
key_prefix "app/secret/" { policy = "deny" }
key "app/secret/public" { policy = "read" }
key_prefix "list/" { policy = "list" }
node_prefix "" { policy = "read" }
session_prefix "" { policy = "write" }
event "deploy" { policy = "write" }
operator = "read"
'''


def authz(rules: str = RULES) -> acl.PolicyAuthorizer:
    return acl.PolicyAuthorizer("acc", acl.parse_rules(rules))


def test_exact_beats_prefix_and_longest_prefix_wins() -> None:
    a = authz()
    assert a.service_write("web") and a.service_read("web")
    assert a.service_read("api") and not a.service_write("api")
    assert not a.service_read("internal-db")
    assert a.service_read("internal-ok")
    assert a.key_write("app/x") and not a.key_read("app/secret/x")
    assert a.key_read("app/secret/public") and not a.key_write("app/secret/public")
    assert not a.key_read("other")  # default deny


def test_list_grants_read_and_list_only() -> None:
    a = authz()
    assert a.key_list("list/a") and a.key_read("list/a") and not a.key_write("list/a")
    assert not a.key_list("app/secret/x")


def test_key_write_prefix_needs_every_rule_under_it_to_write() -> None:
    a = authz()
    assert a.key_write_prefix("app/other/")
    assert not a.key_write_prefix("app/")  # app/secret/ denies under it
    assert not a.key_write_prefix("")
    assert not a.key_write_prefix("nothing/")  # no rule: default deny


def test_top_level_and_intentions_default() -> None:
    a = authz()
    assert a.operator_read() and not a.operator_write()
    assert not a.acl_read()
    assert a.intention_read("web") and not a.intention_write("web")
    assert not a.intention_read("internal-db")
    assert a.event_write("deploy") and not a.event_write("other")
    assert a.session_write("any-node") and a.node_read("n") and not a.node_write("n")
    with pytest.raises(acl.PermissionDenied, match="lacks permission 'service:write' on \"api\""):
        a.check("service:write", "api")


def test_merge_deny_wins_then_most_permissive() -> None:
    p = acl.merge([acl.parse_rules('service "a" { policy = "read" }'),
                   acl.parse_rules('service "a" { policy = "write" }'),
                   acl.parse_rules('service "b" { policy = "write" }'),
                   acl.parse_rules('service "b" { policy = "deny" }')])
    a = acl.PolicyAuthorizer("x", p)
    assert a.service_write("a")
    assert not a.service_read("b")


def test_service_identity() -> None:
    a = acl.PolicyAuthorizer("x", acl.service_identity_policy("web"))
    assert a.service_write("web") and a.service_write("web-sidecar-proxy")
    assert a.service_read("db") and not a.service_write("db")
    assert a.node_read("n1") and not a.node_write("n1")
    assert not a.key_read("k")


def test_json_rules_and_errors() -> None:
    a = authz('{"key_prefix": {"x/": {"policy": "write"}}, "acl": "read"}')
    assert a.key_write("x/1") and a.acl_read()
    with pytest.raises(acl.RuleError):
        acl.parse_rules('service "x" { policy = "sudo" }')
    with pytest.raises(acl.RuleError):
        acl.parse_rules('bogus "x" { policy = "read" }')
    with pytest.raises(acl.RuleError):
        acl.parse_rules('service "x" { policy = ')
    with pytest.raises(acl.RuleError):
        acl.parse_rules('service "x" { policy = "list" }')


def test_allow_all_when_disabled() -> None:
    assert acl.ALLOW_ALL.key_write_prefix("") and acl.ALLOW_ALL.service_write("x")
    acl.ALLOW_ALL.check("acl:write")


def test_service_write_any() -> None:
    assert authz().service_write_any()  # service "web" grants write
    assert not authz('service_prefix "" { policy = "read" }').service_write_any()
    assert acl.PolicyAuthorizer("x", acl.service_identity_policy("api")).service_write_any()
