from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.snapshot import (
    Credentials,
    Endpoint,
    Registration,
    SnapshotBuilder,
    SnapshotError,
    UpstreamConfig,
    diff,
    kind_of,
    normalize_protocol,
    validate_methods,
)

CERT = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n"
# A real key made at test time (no key material in the tree); its base64 body must never leak.
KEY = ec.generate_private_key(ec.SECP256R1()).private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
KEY_BODY = KEY.splitlines()[1]


def creds(serial: str = "01", roots: str = CERT) -> Credentials:
    return Credentials(cert_pem=CERT, key_pem=KEY, chain_pem="", roots_pem=roots,
                       spiffe_id="spiffe://c1.consul/ns/default/dc/dc1/svc/web", serial=serial,
                       not_after=1000.0, trust_domain="c1.consul", roots_version="r1")


def reg(*ups: UpstreamConfig) -> Registration:
    return Registration(service="web", service_id="web-1", proxy_id="web-1-sidecar-proxy",
                        public_address="127.0.0.1", public_port=21000, local_service_address="127.0.0.1",
                        local_service_port=8080, upstreams=tuple(ups), protocol="grpc")


def complete_builder() -> SnapshotBuilder:
    b = SnapshotBuilder()
    b.set_registration(reg(UpstreamConfig("api", 9191)))
    b.set_credentials(creds())
    b.set_policy(None, "v1")
    b.set_endpoints("api", [Endpoint("127.0.0.1", 2000)])
    b.set_protocol("api", "grpc")
    return b


def test_published_only_when_complete() -> None:
    b = SnapshotBuilder()
    assert b.build() is None
    b.set_registration(reg(UpstreamConfig("api", 9191), UpstreamConfig("db", 9192)))
    assert b.missing() == ["leaf certificate", "policy", "endpoints of api", "protocol of api", "endpoints of db",
                           "protocol of db"]
    b.set_protocol("api", "grpc")
    b.set_protocol("db", "tcp")
    b.set_credentials(creds())
    b.set_policy(None, "absent")
    b.set_endpoints("api", [])
    assert b.build() is None
    b.set_endpoints("db", [Endpoint("10.0.0.1", 1)])
    snap = b.build()
    assert snap is not None
    assert snap.upstream("api") is not None and snap.upstream("api").endpoints == ()  # type: ignore[union-attr]
    assert snap.version == 1


def test_protocols_and_methods_flow_into_snapshot() -> None:
    b = complete_builder()
    b.set_protocol("api", "GRPC")
    b.set_protocol("web", "http")
    b.set_methods("api", {"/p.S/M": "unary"})
    snap = b.build()
    assert snap is not None
    api = snap.upstreams["api"]
    assert api.protocol == "grpc" and api.methods == {"/p.S/M": "unary"}
    assert snap.registration.protocol == "http"


def test_setters_report_change() -> None:
    b = complete_builder()
    assert not b.set_endpoints("api", [Endpoint("127.0.0.1", 2000)])
    assert b.set_endpoints("api", [Endpoint("127.0.0.1", 2001)])
    assert not b.set_policy(None, "v1")
    assert b.set_policy(None, "v2")
    assert not b.set_credentials(creds())
    assert b.set_credentials(creds("02"))


def test_describe_never_shows_private_key() -> None:
    snap = complete_builder().build()
    assert snap is not None
    text = repr(snap.describe()) + repr(snap)
    assert KEY_BODY not in text and "PRIVATE KEY" not in text
    assert snap.describe()["upstreams"]["api"]["endpoints"] == ["127.0.0.1:2000"]


def test_diff_lists_each_change() -> None:
    b = complete_builder()
    first = b.build()
    assert first is not None
    kinds = [c["change"] for c in diff(None, first)]
    assert kinds == ["initial", "certificate", "roots", "policy", "endpoints"]
    b.set_endpoints("api", [Endpoint("127.0.0.1", 2000), Endpoint("127.0.0.1", 2001)])
    b.set_credentials(creds("02"))
    b.set_policy(None, "v2")
    second = b.build()
    assert second is not None
    changes = diff(first, second)
    assert {c["change"] for c in changes} == {"certificate", "policy", "endpoints"}
    ep = next(c for c in changes if c["change"] == "endpoints")
    assert ep["added"] == ["127.0.0.1:2001"] and ep["removed"] == []
    cert = next(c for c in changes if c["change"] == "certificate")
    assert cert["serial"] == "02" and cert["previous_serial"] == "01"
    assert diff(second, second) == []


def test_bad_inputs_named() -> None:
    with pytest.raises(SnapshotError, match="protocol 'udp'"):
        normalize_protocol("udp")
    assert normalize_protocol(None) == "tcp"
    assert normalize_protocol("http2") == "http"
    with pytest.raises(SnapshotError, match="not a gRPC method path"):
        validate_methods({"nope": "unary"})
    with pytest.raises(SnapshotError, match="kind 'weird'"):
        validate_methods({"/a.B/C": "weird"})
    with pytest.raises(SnapshotError, match="declared twice"):
        reg(UpstreamConfig("api", 1), UpstreamConfig("api", 2))
    with pytest.raises(SnapshotError, match="LocalBindPort 1 is used"):
        reg(UpstreamConfig("api", 1), UpstreamConfig("db", 1))
    with pytest.raises(SnapshotError, match="not a port"):
        UpstreamConfig("api", 70000)
    with pytest.raises(SnapshotError, match="key is not PEM"):
        Credentials(cert_pem=CERT, key_pem="x", chain_pem="", roots_pem=CERT, spiffe_id="s", serial="1",
                    not_after=0, trust_domain="t")


def test_kind_of() -> None:
    assert kind_of(False, False) == "unary"
    assert kind_of(True, False) == "client_stream"
    assert kind_of(False, True) == "server_stream"
    assert kind_of(True, True) == "bidi_stream"


def test_the_tls_generation_follows_what_a_tls_context_is_built_from() -> None:
    other_roots = CERT + "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n"
    assert creds().generation == creds(serial="02").generation  # the serial is not in a TLS context
    assert creds().generation != creds(roots=other_roots).generation
    assert dataclasses.replace(creds(), roots_pem=other_roots).generation == creds(roots=other_roots).generation
    assert creds().generation not in repr(creds())
