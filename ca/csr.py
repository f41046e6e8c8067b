"""Checking certificate signing requests, and making them (no I/O; uses ``cryptography``).

The CA signs leaves only from CSRs; a CSR is accepted only if it is well-formed, its signature
verifies, its key is EC P-256, and it asks for exactly one identity: one URI SAN that is a service
SPIFFE ID of this trust domain (plus, optionally, that identity's own DNS SAN). Anything else raises
:class:`ca.provider.InvalidRequest` naming what is wrong.
"""

from __future__ import annotations

from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from ca.identity import IdentityError, SpiffeId
from ca.provider import InvalidRequest, NotAuthorized, SignRequest

MAX_CSR_BYTES = 16 * 1024
_ALLOWED_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


def describe_key(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return type(key).__name__.removeprefix("_")


def parse_csr(data: bytes | str, trust_domain: str) -> SignRequest:
    """Validate a PEM (or DER) CSR for ``trust_domain``; return the identity and key it carries."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if not raw:
        raise InvalidRequest("the CSR is empty")
    if len(raw) > MAX_CSR_BYTES:
        raise InvalidRequest(f"the CSR is larger than {MAX_CSR_BYTES} bytes")
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(raw)
        else:
            csr = x509.load_der_x509_csr(raw)
    except ValueError as exc:
        raise InvalidRequest(f"the CSR cannot be parsed (expected a PEM or DER PKCS#10 request): {exc}") from None

    try:
        public_key = csr.public_key()
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"the CSR's public key cannot be read: {exc}") from None
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
        raise InvalidRequest(f"the CSR's key is {describe_key(public_key)}; an EC P-256 (secp256r1) key is required")
    try:
        valid = csr.is_signature_valid
    except Exception as exc:  # unsupported algorithms raise from cryptography
        raise InvalidRequest(f"the CSR's signature cannot be checked: {exc}") from None
    if not valid:
        raise InvalidRequest("the CSR's signature does not verify with its own public key")
    algorithm = csr.signature_hash_algorithm
    if not isinstance(algorithm, _ALLOWED_HASHES):
        raise InvalidRequest("the CSR must be signed with ECDSA over SHA-256, SHA-384 or SHA-512")

    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise InvalidRequest("the CSR has no subjectAltName; it must carry the SPIFFE ID as a URI SAN") from None
    except ValueError as exc:
        raise InvalidRequest(f"the CSR's extensions cannot be parsed: {exc}") from None

    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise InvalidRequest(f"the CSR must carry exactly one URI SAN (the SPIFFE ID), it has {len(uris)}")
    try:
        identity = SpiffeId.parse(uris[0])
        identity.require_trust_domain(trust_domain)
    except IdentityError as exc:
        raise InvalidRequest(f"the CSR's URI SAN is not acceptable: {exc}") from None
    dns_names = san.get_values_for_type(x509.DNSName)
    if any(name != identity.dns_name for name in dns_names):
        raise InvalidRequest(f"the CSR's DNS SANs {dns_names} do not match its identity; only "
                             f"{identity.dns_name!r} is allowed")
    others = [g for g in san if not isinstance(g, x509.UniformResourceIdentifier | x509.DNSName)]
    if others:
        kinds = sorted({type(g).__name__ for g in others})
        raise InvalidRequest(f"the CSR asks for SANs the CA does not issue: {', '.join(kinds)}")

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return SignRequest(identity=identity, csr_pem=raw, public_key_der=der, public_key=public_key)


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 private key, made where it will be used."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey, identity: SpiffeId) -> bytes:
    """A PEM CSR for ``identity`` signed by ``key`` (what sidecars and ``weft ca sign`` send)."""
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.service[:64])]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(identity.uri), x509.DNSName(identity.dns_name)]),
            critical=False,
        )
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# -- renewal with the current certificate ---------------------------------------------------------

RENEWAL_CONTEXT = b"weft-ca-renew\x00"


def _csr_der(csr_pem: bytes) -> bytes:
    raw = csr_pem if not csr_pem.lstrip().startswith(b"-----BEGIN") else \
        x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
    return raw


def make_renewal_proof(current_key: ec.EllipticCurvePrivateKey, csr_pem: bytes) -> bytes:
    """Signature by the current leaf's key over the new CSR: proves possession for a renewal."""
    return current_key.sign(RENEWAL_CONTEXT + _csr_der(csr_pem), ec.ECDSA(hashes.SHA256()))


def _load_chain(pem: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise InvalidRequest(f"the certificate offered for renewal cannot be parsed: {exc}") from None
    if not certs:
        raise InvalidRequest("the certificate offered for renewal is empty")
    return certs


def verify_renewal(request: SignRequest, current_chain_pem: bytes, proof: bytes, roots_pem: str,
                   now: datetime) -> None:
    """Check that the caller holds a current, valid leaf of the same identity issued by this CA.

    Raises :class:`InvalidRequest` for unreadable input and :class:`NotAuthorized` naming the reason.
    """
    chain = _load_chain(current_chain_pem)
    leaf = chain[0]
    if now < leaf.not_valid_before_utc:
        raise NotAuthorized(f"the certificate offered for renewal is not valid before {leaf.not_valid_before_utc}")
    if now >= leaf.not_valid_after_utc:
        raise NotAuthorized(f"the certificate offered for renewal expired at {leaf.not_valid_after_utc}; "
                            "request a new one with an ACL token")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if uris != [request.identity.uri]:
        raise NotAuthorized(f"the certificate offered for renewal is for {uris or 'no identity'}, "
                            f"not for {request.identity.uri}")
    try:
        store = Store(x509.load_pem_x509_certificates(roots_pem.encode()))
        verifier = PolicyBuilder().store(store).time(now).build_client_verifier()
        verifier.verify(leaf, chain[1:])
    except (VerificationError, ValueError) as exc:
        raise NotAuthorized(f"the certificate offered for renewal was not issued by this CA's roots: {exc}") from None
    public_key = leaf.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise NotAuthorized("the certificate offered for renewal does not carry an EC key")
    try:
        public_key.verify(proof, RENEWAL_CONTEXT + _csr_der(request.csr_pem), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise NotAuthorized("the renewal proof does not verify with the key of the certificate offered "
                            "for renewal") from None
