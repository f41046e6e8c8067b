from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from ca.builtin import BuiltinProvider
from ca.csr import parse_csr
from ca.provider import CAConfig, InvalidRequest, TrustBundle

from .helpers import TD, csr_with, make_csr, memory_handshake, new_key, spiffe, write_identity

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def provider() -> BuiltinProvider:
    p = BuiltinProvider()
    p.configure(CAConfig(), TD, None, NOW)
    return p


def test_root_and_intermediate(provider: BuiltinProvider) -> None:
    gen = provider.generations[0]
    assert isinstance(gen.root_key.curve, ec.SECP256R1)
    assert gen.root_cert.not_valid_after_utc - NOW == timedelta(days=3650)
    assert gen.inter_cert.not_valid_after_utc - NOW == timedelta(days=365)
    assert gen.inter_cert.issuer == gen.root_cert.subject
    bc = gen.inter_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0


def test_configurable_lifetimes() -> None:
    p = BuiltinProvider()
    p.configure(CAConfig(root_ttl=timedelta(days=30), intermediate_ttl=timedelta(days=10),
                         max_leaf_ttl=timedelta(days=4)), TD, None, NOW)
    g = p.generations[0]
    assert g.root_cert.not_valid_after_utc - NOW == timedelta(days=30)
    assert g.inter_cert.not_valid_after_utc - NOW == timedelta(days=10)
    with pytest.raises(ValueError, match="intermediate TTL"):
        CAConfig(intermediate_ttl=timedelta(days=1))


def test_sign_leaf(provider: BuiltinProvider) -> None:
    key = new_key()
    req = parse_csr(make_csr(key, spiffe("web")), TD)
    leaf = provider.sign(req, timedelta(hours=72), NOW)
    cert = x509.load_pem_x509_certificate(leaf.cert_pem.encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}/ns/default/dc/dc1/svc/web"]
    assert san.get_values_for_type(x509.DNSName) == [f"web.svc.default.{TD}"]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_agreement and not ku.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.not_valid_after_utc == NOW + timedelta(hours=72)
    assert cert.public_key() == key.public_key()
    assert len(leaf.chain_pem) == 1


def test_short_ttl_and_bounds(provider: BuiltinProvider) -> None:
    req = parse_csr(make_csr(new_key(), spiffe("web")), TD)
    leaf = provider.sign(req, timedelta(minutes=2), NOW)
    assert leaf.not_after == NOW + timedelta(minutes=2)
    with pytest.raises(InvalidRequest, match="outside"):
        provider.sign(req, timedelta(seconds=1), NOW)
    with pytest.raises(InvalidRequest, match="outside"):
        provider.sign(req, timedelta(days=300), NOW)


def test_mtls_handshake_with_issued_leaves(provider: BuiltinProvider, tmp_path: Path) -> None:
    b = provider.bundle(1)
    ids = []
    for name in ("a", "b"):
        key = new_key()
        now = datetime.now(UTC)
        leaf = provider.sign(parse_csr(make_csr(key, spiffe(name)), TD), timedelta(hours=1), now)
        ids.append(write_identity(tmp_path, name, key, leaf.cert_pem, leaf.chain_pem, b.roots_pem))
    assert memory_handshake(ids[0], ids[1]) is None


# -- refusals ------------------------------------------------------------------------------------


def test_refuses_garbage() -> None:
    with pytest.raises(InvalidRequest, match="cannot be parsed"):
        parse_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nnonsense\n-----END CERTIFICATE REQUEST-----\n", TD)
    with pytest.raises(InvalidRequest, match="cannot be parsed"):
        parse_csr(b"\x00\x01garbage", TD)
    with pytest.raises(InvalidRequest, match="empty"):
        parse_csr(b"", TD)


def test_refuses_rsa_and_p384() -> None:
    uri: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe("web").uri)]
    with pytest.raises(InvalidRequest, match=r"RSA 2048.*P-256"):
        parse_csr(csr_with(rsa.generate_private_key(65537, 2048), uri), TD)
    with pytest.raises(InvalidRequest, match=r"secp384r1.*P-256"):
        parse_csr(csr_with(ec.generate_private_key(ec.SECP384R1()), uri), TD)


def test_refuses_bad_sans() -> None:
    key = new_key()
    with pytest.raises(InvalidRequest, match="no subjectAltName"):
        parse_csr(csr_with(key, None), TD)
    web: x509.GeneralName = x509.UniformResourceIdentifier(spiffe("web").uri)
    two: list[x509.GeneralName] = [web, x509.UniformResourceIdentifier(spiffe("b").uri)]
    with pytest.raises(InvalidRequest, match="exactly one URI SAN"):
        parse_csr(csr_with(key, two), TD)
    with pytest.raises(InvalidRequest, match="trust domain"):
        parse_csr(make_csr(key, spiffe("web", "other-cluster.consul")), TD)
    with pytest.raises(InvalidRequest, match="not a SPIFFE ID"):
        parse_csr(csr_with(key, [x509.UniformResourceIdentifier("https://example.com/")]), TD)
    bad_dns: list[x509.GeneralName] = [web, x509.DNSName("evil.example.com")]
    with pytest.raises(InvalidRequest, match="DNS SANs"):
        parse_csr(csr_with(key, bad_dns), TD)
    ip: list[x509.GeneralName] = [web, x509.IPAddress(ipaddress.ip_address("10.0.0.1"))]
    with pytest.raises(InvalidRequest, match="IPAddress"):
        parse_csr(csr_with(key, ip), TD)


def test_refuses_bad_signature() -> None:
    pem = make_csr(new_key(), spiffe("web"))
    csr = x509.load_pem_x509_csr(pem)
    der = bytearray(csr.public_bytes(Encoding.DER))
    der[-3] ^= 0x01  # flip a bit inside the signature
    with pytest.raises(InvalidRequest, match=r"signature|parsed"):
        parse_csr(bytes(der), TD)


# -- state, rotation, pruning --------------------------------------------------------------------


def test_state_round_trip(provider: BuiltinProvider) -> None:
    state = provider.state()
    other = BuiltinProvider()
    other.configure(provider.config, TD, state, NOW)
    assert other.bundle(1) == provider.bundle(1)
    with pytest.raises(Exception, match="trust domain"):
        BuiltinProvider().configure(provider.config, "x.consul", state, NOW)


def test_bundle_shape(provider: BuiltinProvider) -> None:
    doc = provider.bundle(7).to_consul()
    assert set(doc) == {"ActiveRootID", "TrustDomain", "Roots"}
    root = doc["Roots"][0]
    for k in ("ID", "Name", "SerialNumber", "SigningKeyID", "NotBefore", "NotAfter", "RootCert",
              "IntermediateCerts", "Active", "PrivateKeyType", "PrivateKeyBits", "CreateIndex", "ModifyIndex"):
        assert k in root
    assert root["Active"] is True and root["PrivateKeyType"] == "ec" and root["PrivateKeyBits"] == 256
    assert doc["ActiveRootID"] == root["ID"]
    assert TrustBundle.from_consul(doc, 7) == provider.bundle(7)


def test_rotation_cross_sign_and_prune(tmp_path: Path) -> None:
    p = BuiltinProvider()
    cfg = CAConfig(leaf_ttl=timedelta(hours=1), max_leaf_ttl=timedelta(hours=2))
    now = datetime.now(UTC)
    p.configure(cfg, TD, None, now)
    old_bundle = p.bundle(1)
    key_a = new_key()
    leaf_a = p.sign(parse_csr(make_csr(key_a, spiffe("a")), TD), timedelta(hours=1), now)

    new_id = p.rotate(now)
    new_bundle = p.bundle(2)
    assert new_bundle.active_root_id == new_id
    assert len(new_bundle.roots) == 2 and old_bundle.active_root_id in new_bundle.root_ids
    key_b = new_key()
    leaf_b = p.sign(parse_csr(make_csr(key_b, spiffe("b")), TD), timedelta(hours=1), now)
    assert len(leaf_b.chain_pem) == 2  # new intermediate + new root cross-signed by the old

    a_old = write_identity(tmp_path / "a_old", "a", key_a, leaf_a.cert_pem, leaf_a.chain_pem, old_bundle.roots_pem)
    b_new = write_identity(tmp_path / "b_new", "b", key_b, leaf_b.cert_pem, leaf_b.chain_pem, new_bundle.roots_pem)
    a_new = write_identity(tmp_path / "a_new", "a", key_a, leaf_a.cert_pem, leaf_a.chain_pem, new_bundle.roots_pem)
    # a peer still trusting only the old root accepts a new leaf, and the other way round
    assert memory_handshake(a_old, b_new) is None
    assert memory_handshake(b_new, a_old) is None
    assert memory_handshake(a_new, b_new) is None
    # a peer trusting only the new root accepts new leaves (trust store searched first)
    only_new = "".join(r.root_cert for r in new_bundle.roots if r.active)
    b_only_new = write_identity(tmp_path / "b_only", "b", key_b, leaf_b.cert_pem, leaf_b.chain_pem, only_new)
    assert memory_handshake(b_only_new, b_new) is None

    # the old root stays until the longest leaf it can have signed has expired
    assert not p.maintain(now + timedelta(hours=1))
    assert len(p.bundle(3).roots) == 2
    assert p.maintain(now + timedelta(hours=2, minutes=2))
    pruned = p.bundle(4)
    assert pruned.root_ids == (new_id,)
    leaf_c = p.sign(parse_csr(make_csr(new_key(), spiffe("c")), TD), timedelta(hours=1), now)
    assert len(leaf_c.chain_pem) == 1  # the cross-signed certificate goes with the old root


def test_intermediate_renewed_near_expiry() -> None:
    p = BuiltinProvider()
    cfg = CAConfig(intermediate_ttl=timedelta(days=10), leaf_ttl=timedelta(hours=1), max_leaf_ttl=timedelta(days=1))
    p.configure(cfg, TD, None, NOW)
    first = p.generations[0].inter_cert.serial_number
    assert not p.maintain(NOW + timedelta(days=1))
    assert p.maintain(NOW + timedelta(days=8, hours=1))
    assert p.generations[0].inter_cert.serial_number != first
    # a leaf never outlives its intermediate
    leaf = p.sign(parse_csr(make_csr(new_key(), spiffe("web")), TD), timedelta(days=1), NOW + timedelta(days=8))
    assert leaf.not_after <= p.generations[0].inter_cert.not_valid_after_utc


# -- renewal with the current certificate --------------------------------------------------------


def test_renewal_proof() -> None:
    from ca.csr import make_renewal_proof, verify_renewal
    from ca.provider import NotAuthorized

    p = BuiltinProvider()
    now = datetime.now(UTC)
    p.configure(CAConfig(), TD, None, now)
    old_key = new_key()
    leaf = p.sign(parse_csr(make_csr(old_key, spiffe("web")), TD), timedelta(hours=1), now)
    current = (leaf.cert_pem + "".join(leaf.chain_pem)).encode()
    roots = p.bundle(1).roots_pem
    new_csr = make_csr(new_key(), spiffe("web"))
    req = parse_csr(new_csr, TD)
    verify_renewal(req, current, make_renewal_proof(old_key, new_csr), roots, now)
    # after a rotation the old leaf still renews (its root is still in the bundle)
    p.rotate(now)
    verify_renewal(req, current, make_renewal_proof(old_key, new_csr), p.bundle(2).roots_pem, now)

    with pytest.raises(NotAuthorized, match="expired"):
        verify_renewal(req, current, make_renewal_proof(old_key, new_csr), roots, now + timedelta(hours=2))
    with pytest.raises(NotAuthorized, match="proof does not verify"):
        verify_renewal(req, current, make_renewal_proof(new_key(), new_csr), roots, now)
    other = parse_csr(make_csr(new_key(), spiffe("api")), TD)
    with pytest.raises(NotAuthorized, match="not for"):
        verify_renewal(other, current, make_renewal_proof(old_key, new_csr), roots, now)
    stranger = BuiltinProvider()
    stranger.configure(CAConfig(), TD, None, now)
    with pytest.raises(NotAuthorized, match="not issued by"):
        verify_renewal(req, current, make_renewal_proof(old_key, new_csr), stranger.bundle(1).roots_pem, now)
    with pytest.raises(InvalidRequest, match=r"cannot be parsed|empty"):
        verify_renewal(req, b"junk", b"", roots, now)
