from __future__ import annotations

import pytest

from ca.identity import (
    IdentityError,
    SpiffeId,
    cluster_id_of,
    dns_name,
    trust_domain_for,
    validate_trust_domain,
)

TD = "11111111-2222-3333-4444-555555555555.consul"


def test_round_trip() -> None:
    uri = f"spiffe://{TD}/ns/default/dc/dc1/svc/web"
    sid = SpiffeId.parse(uri)
    assert sid == SpiffeId(trust_domain=TD, namespace="default", datacenter="dc1", service="web")
    assert str(sid) == uri
    assert sid.uri == uri
    assert sid.dns_name == f"web.svc.default.{TD}"


def test_for_service_defaults() -> None:
    sid = SpiffeId.for_service(TD, "api")
    assert sid.namespace == "default" and sid.datacenter == "dc1"
    assert SpiffeId.parse(str(sid)) == sid


def test_trust_domain_from_cluster_id() -> None:
    assert trust_domain_for("11111111-2222-3333-4444-555555555555") == TD
    assert cluster_id_of(TD) == "11111111-2222-3333-4444-555555555555"
    with pytest.raises(IdentityError, match="does not end"):
        cluster_id_of("example.org")
    with pytest.raises(IdentityError, match="cluster id"):
        trust_domain_for("Not Valid")


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("http://x.consul/ns/default/dc/dc1/svc/web", "must start with"),
        ("SPIFFE://x.consul/ns/default/dc/dc1/svc/web", "lowercase"),
        ("spiffe://x.consul", "no path"),
        ("spiffe://x.consul/", "no path"),
        ("spiffe:///ns/default/dc/dc1/svc/web", "non-empty"),
        ("spiffe://X.Consul/ns/default/dc/dc1/svc/web", "trust domain"),
        ("spiffe://x.consul:8443/ns/default/dc/dc1/svc/web", "port"),
        ("spiffe://x.consul/ns/default/dc/dc1/svc/web/extra", "service identity"),
        ("spiffe://x.consul/ns/default/dc/dc1/agent/web", "service identity"),
        ("spiffe://x.consul/ns/default/dc/dc1/svc/", "service"),
        ("spiffe://x.consul/ns/default/dc/dc1/svc/we.b", "service 'we.b'"),
        ("spiffe://x.consul/ns/default/dc/dc1/svc/web?x=1", "query"),
        ("spiffe://x.consul/ns/default/dc/dc1/svc/web#f", "fragment"),
        ("spiffe://u@x.consul/ns/default/dc/dc1/svc/web", "user info"),
        ("spiffe://x.consul/ns/def%41ult/dc/dc1/svc/web", "percent"),
        ("spiffe://x..consul/ns/default/dc/dc1/svc/web", "trust domain"),
        ("", "must start with"),
    ],
)
def test_rejects(uri: str, why: str) -> None:
    with pytest.raises(IdentityError, match=why):
        SpiffeId.parse(uri)


def test_rejects_non_string() -> None:
    with pytest.raises(IdentityError, match="must be a string"):
        SpiffeId.parse(42)  # type: ignore[arg-type]


def test_constructor_validates() -> None:
    with pytest.raises(IdentityError, match="service"):
        SpiffeId(trust_domain=TD, namespace="default", datacenter="dc1", service="-bad")
    with pytest.raises(IdentityError, match="datacenter"):
        SpiffeId(trust_domain=TD, namespace="default", datacenter="", service="web")


def test_trust_domain_check() -> None:
    sid = SpiffeId.for_service("other.consul", "web")
    assert sid.in_trust_domain("other.consul")
    with pytest.raises(IdentityError, match=r"belongs to trust domain 'other\.consul'"):
        sid.require_trust_domain(TD)
    assert SpiffeId.for_service(TD, "web").require_trust_domain(TD).service == "web"


def test_dns_name_and_validate() -> None:
    assert dns_name("api", TD) == f"api.svc.default.{TD}"
    with pytest.raises(IdentityError):
        validate_trust_domain("a" * 300)
    with pytest.raises(IdentityError):
        dns_name("a.b", TD)
