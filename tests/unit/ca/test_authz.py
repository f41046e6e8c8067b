from __future__ import annotations

import pytest

from ca.authz import GLOBAL_MANAGEMENT_ID, TokenAuthorizer, parse_rules, service_access

from .fakes import FakeAcl


def test_parse_hcl_and_json() -> None:
    hcl = 'service "web" { policy = "write" }\nservice_prefix "" { policy = "read" }\noperator = "write"\n'
    r = parse_rules(hcl)
    assert r.service == {"web": "write"} and r.service_prefix == {"": "read"} and r.operator == "write"
    j = parse_rules('{"service": {"api": {"policy": "write"}}, "service_prefix": {"a": {"policy": "deny"}}}')
    assert j.service == {"api": "write"} and j.service_prefix == {"a": "deny"}
    with pytest.raises(ValueError):
        parse_rules("service {{{")


def test_exact_beats_prefix_longest_prefix_wins() -> None:
    r = parse_rules('service_prefix "" { policy = "write" }\nservice_prefix "pay" { policy = "deny" }\n'
                    'service "payments" { policy = "write" }')
    assert service_access(r, "payments")[0] == "write"
    assert service_access(r, "payroll")[0] == "deny"
    assert service_access(r, "web")[0] == "write"


def _acl() -> FakeAcl:
    acl = FakeAcl()
    acl.add_policy("p-web", 'service "web" { policy = "write" }')
    acl.add_policy("p-read", 'service_prefix "" { policy = "read" }')
    acl.add_policy("p-deny-web", 'service "web" { policy = "deny" }')
    acl.add_policy("p-op", 'operator = "write"')
    acl.roles["r-api"] = {"ID": "r-api", "Policies": [], "ServiceIdentities": [{"ServiceName": "api"}]}
    acl.add_token("t-web", ["p-web"])
    acl.add_token("t-read", ["p-read"])
    acl.add_token("t-both", ["p-web", "p-deny-web"])
    acl.add_token("t-si", service_identities=["db"])
    acl.add_token("t-role", roles=["r-api"])
    acl.add_token("t-op", ["p-op"])
    acl.add_token("t-root", [GLOBAL_MANAGEMENT_ID])
    return acl


async def test_service_write_decisions() -> None:
    az = TokenAuthorizer(_acl(), "dc1")

    async def ok(tok: str, svc: str) -> bool:
        d = await az.may_write_service(tok, svc)
        assert d is not None
        return d.allowed

    assert await ok("t-web", "web")
    assert not await ok("t-web", "api")
    assert not await ok("t-read", "web")
    assert not await ok("t-both", "web")  # deny wins across policies
    assert await ok("t-si", "db") and await ok("t-si", "db-sidecar-proxy") and not await ok("t-si", "web")
    assert await ok("t-role", "api")
    assert await ok("t-root", "anything")
    assert not await ok("nope", "web")
    d = await az.may_write_service("nope", "web")
    assert d is not None and "not known" in d.reason
    d = await az.may_write_service("t-read", "web")
    assert d is not None and "lacks service:write" in d.reason and "read" in d.reason
    d = await az.may_write_service("", "web")
    assert d is not None and not d.allowed and "no ACL token" in d.reason


async def test_operator_write() -> None:
    az = TokenAuthorizer(_acl(), "dc1")
    assert (await az.may_operate("t-op")).allowed  # type: ignore[union-attr]
    assert (await az.may_operate("t-root")).allowed  # type: ignore[union-attr]
    assert not (await az.may_operate("t-web")).allowed  # type: ignore[union-attr]


async def test_acls_disabled() -> None:
    acl = FakeAcl(enabled=False)
    az = TokenAuthorizer(acl, "dc1")
    # until the CA has asked with its own token, it fails closed
    d = await az.may_write_service("", "web")
    assert d is not None and not d.allowed
    assert not await az.acls_enabled("x")
    assert await az.may_write_service("", "web") is None
    assert await az.may_operate("") is None


async def test_a_caller_cannot_switch_checks_off() -> None:
    acl = _acl()
    az = TokenAuthorizer(acl, "dc1")
    assert await az.acls_enabled("t-root")
    acl.enabled = False  # Consul now claims ACLs are off, but the CA learnt otherwise at start
    d = await az.may_write_service("t-web", "web")
    assert d is not None and not d.allowed and "disabled" in d.reason
