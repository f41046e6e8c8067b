"""The built-in CA provider: EC P-256 root and intermediate, leaves from CSRs (no I/O).

Each *generation* is a root (10 years by default) with the intermediate that signs leaves (1 year).
Rotation makes a new generation whose root is also cross-signed by the old root; new leaves' chains
are ``[new intermediate, new root cross-signed by the old root]``, so a peer that still trusts only
the old root builds leaf -> intermediate -> cross-signed root -> old root, while a peer that trusts
the new root finds it in its trust store one step earlier (OpenSSL/BoringSSL look in the trust store
first). The old generation stays in the bundle, retired, until the longest leaf it can have signed
has expired (``retired_at + max_leaf_ttl`` plus clock skew); then ``maintain`` drops it.

This is the same scheme Consul's built-in provider uses (the cross-signed certificate appears in the
new root's ``IntermediateCerts``).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca.identity import validate_trust_domain
from ca.provider import (
    CAConfig,
    CAError,
    InvalidRequest,
    RootInfo,
    SignedLeaf,
    SignRequest,
    TrustBundle,
)

STATE_VERSION = 1


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _load_key(pem: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError("CA state holds a key that is not EC")
    return key


def _colon_hex(data: bytes) -> str:
    return ":".join(f"{b:02x}" for b in data)


def cert_id(cert: x509.Certificate) -> str:
    """A root's ID, as Consul spells it: the colon-separated hex SHA-1 fingerprint."""
    return _colon_hex(cert.fingerprint(hashes.SHA1()))


def _ski(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat()


def _from_iso(s: Any) -> datetime | None:
    return None if s is None else datetime.fromisoformat(str(s)).astimezone(UTC)


@dataclass(frozen=True, slots=True)
class _Derived:
    source: tuple[x509.Certificate, ...]
    root_id: str
    chain: tuple[str, ...]
    inter_ski: x509.SubjectKeyIdentifier


@dataclass
class Generation:
    """One root, its signing intermediate, and the certificates other roots cross-signed for it."""

    root_key: ec.EllipticCurvePrivateKey
    root_cert: x509.Certificate
    inter_key: ec.EllipticCurvePrivateKey
    inter_cert: x509.Certificate
    cross_signed: list[x509.Certificate] = field(default_factory=list)
    active: bool = True
    retired_at: datetime | None = None
    prune_after: datetime | None = None
    create_index: int = 0
    modify_index: int = 0

    # PEM chain, root id and the intermediate's key id, computed once per (root, intermediate, cross-signed)
    _memo: _Derived | None = field(default=None, repr=False, compare=False)

    def _derived(self) -> _Derived:
        # the memo holds the certificates it was computed from (so they stay alive), compared by identity
        source = (self.root_cert, self.inter_cert, *self.cross_signed)
        memo = self._memo
        if memo is None or len(memo.source) != len(source) or any(
                a is not b for a, b in zip(memo.source, source, strict=True)):
            chain = (_pem(self.inter_cert), *(_pem(c) for c in self.cross_signed))
            memo = self._memo = _Derived(source, cert_id(self.root_cert), chain, _ski(self.inter_cert))
        return memo

    @property
    def id(self) -> str:
        return self._derived().root_id

    def chain(self) -> tuple[str, ...]:
        return self._derived().chain

    @property
    def inter_ski(self) -> x509.SubjectKeyIdentifier:
        return self._derived().inter_ski

    def to_state(self) -> dict[str, Any]:
        return {
            "root_key": _key_pem(self.root_key),
            "root_cert": _pem(self.root_cert),
            "inter_key": _key_pem(self.inter_key),
            "inter_cert": _pem(self.inter_cert),
            "cross_signed": [_pem(c) for c in self.cross_signed],
            "active": self.active,
            "retired_at": _iso(self.retired_at),
            "prune_after": _iso(self.prune_after),
            "create_index": self.create_index,
            "modify_index": self.modify_index,
        }

    @classmethod
    def from_state(cls, doc: dict[str, Any]) -> Generation:
        return cls(
            root_key=_load_key(doc["root_key"]),
            root_cert=x509.load_pem_x509_certificate(doc["root_cert"].encode()),
            inter_key=_load_key(doc["inter_key"]),
            inter_cert=x509.load_pem_x509_certificate(doc["inter_cert"].encode()),
            cross_signed=[x509.load_pem_x509_certificate(c.encode()) for c in doc.get("cross_signed", [])],
            active=bool(doc["active"]),
            retired_at=_from_iso(doc.get("retired_at")),
            prune_after=_from_iso(doc.get("prune_after")),
            create_index=int(doc.get("create_index", 0)),
            modify_index=int(doc.get("modify_index", 0)),
        )


class BuiltinProvider:
    """The CA provider Weft ships (see the module docstring)."""

    name = "builtin"

    def __init__(self) -> None:
        self._config = CAConfig()
        self._trust_domain = ""
        self._generations: list[Generation] = []
        self._index = 0
        # the largest leaf TTL any configuration of this CA has allowed: bounds how long a retired
        # root must stay in the bundle
        self._max_leaf_ttl = self._config.max_leaf_ttl

    # -- configuration and state -------------------------------------------------------------

    def configure(self, config: CAConfig, trust_domain: str, state: dict[str, Any] | None,
                  now: datetime) -> None:
        self._config = config
        self._trust_domain = validate_trust_domain(trust_domain)
        if state is None:
            self._generations = []
            self._index = 0
            self._max_leaf_ttl = config.max_leaf_ttl
            self._generations.append(self._new_generation(now))
            return
        if state.get("provider") != self.name or int(state.get("version", 0)) != STATE_VERSION:
            raise CAError(f"CA state was written by provider {state.get('provider')!r} version "
                          f"{state.get('version')!r}; this is {self.name!r} version {STATE_VERSION}")
        if state.get("trust_domain") != trust_domain:
            raise CAError(f"CA state belongs to trust domain {state.get('trust_domain')!r}, not {trust_domain!r}")
        self._generations = [Generation.from_state(g) for g in state["generations"]]
        self._index = int(state.get("index", 0))
        self._max_leaf_ttl = max(config.max_leaf_ttl, timedelta(seconds=float(state.get("max_leaf_ttl_s", 0))))
        if sum(1 for g in self._generations if g.active) != 1:
            raise CAError("CA state must have exactly one active root")

    def state(self) -> dict[str, Any]:
        return {
            "provider": self.name,
            "version": STATE_VERSION,
            "trust_domain": self._trust_domain,
            "index": self._index,
            "max_leaf_ttl_s": self._max_leaf_ttl.total_seconds(),
            "generations": [g.to_state() for g in self._generations],
        }

    @property
    def config(self) -> CAConfig:
        return self._config

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    @property
    def state_index(self) -> int:
        """Grows with every change of the roots or chains; kept in the state, so it survives failover."""
        return self._index

    @property
    def generations(self) -> tuple[Generation, ...]:
        return tuple(self._generations)

    def _active(self) -> Generation:
        for g in self._generations:
            if g.active:
                return g
        raise CAError("the CA has no active root (not configured)")

    def _next_index(self) -> int:
        self._index += 1
        return self._index

    # -- certificate making ------------------------------------------------------------------

    def _name(self, kind: str) -> x509.Name:
        return x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Weft"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Weft {kind} {secrets.token_hex(4)}"),
        ])

    def _ca_builder(self, subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
                    not_before: datetime, not_after: datetime, path_length: int | None,
                    authority_key: x509.SubjectKeyIdentifier | None) -> x509.CertificateBuilder:
        ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
        aki = (x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(authority_key)
               if authority_key is not None else
               x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski))
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(secrets.randbits(62) | (1 << 62))  # fits Consul's uint64 SerialNumber
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(aki, critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{self._trust_domain}")]), critical=False)
        )

    def _new_intermediate(self, root_key: ec.EllipticCurvePrivateKey, root_cert: x509.Certificate,
                          now: datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        not_after = min(now + self._config.intermediate_ttl, root_cert.not_valid_after_utc)
        cert = self._ca_builder(self._name("Intermediate CA"), root_cert.subject, key.public_key(),
                                now - self._config.clock_skew, not_after, 0, _ski(root_cert)
                                ).sign(root_key, hashes.SHA256())
        return key, cert

    def _new_generation(self, now: datetime) -> Generation:
        root_key = ec.generate_private_key(ec.SECP256R1())
        name = self._name("Root CA")
        root_cert = self._ca_builder(name, name, root_key.public_key(), now - self._config.clock_skew,
                                     now + self._config.root_ttl, None, None).sign(root_key, hashes.SHA256())
        inter_key, inter_cert = self._new_intermediate(root_key, root_cert, now)
        index = self._next_index()
        return Generation(root_key, root_cert, inter_key, inter_cert, create_index=index, modify_index=index)

    def _cross_sign(self, cert: x509.Certificate, now: datetime) -> x509.Certificate:
        signer = self._active()
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            raise InvalidRequest("only CA certificates can be cross-signed") from None
        if not bc.ca:
            raise InvalidRequest("only CA certificates can be cross-signed")
        public_key = cert.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise InvalidRequest("only EC CA certificates can be cross-signed")
        not_after = min(cert.not_valid_after_utc, signer.root_cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(cert.subject)
            .issuer_name(signer.root_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(max(cert.not_valid_before_utc, now - self._config.clock_skew))
            .not_valid_after(not_after)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(signer.root_cert)),
                           critical=False)
        )
        for ext in cert.extensions:
            if isinstance(ext.value, x509.AuthorityKeyIdentifier):
                continue
            builder = builder.add_extension(ext.value, critical=ext.critical)
        return builder.sign(signer.root_key, hashes.SHA256())

    # -- issuing -----------------------------------------------------------------------------

    def sign(self, request: SignRequest, ttl: timedelta, now: datetime) -> SignedLeaf:
        if not self._config.min_leaf_ttl <= ttl <= self._config.max_leaf_ttl:
            raise InvalidRequest(f"TTL {ttl} is outside the allowed range "
                                 f"{self._config.min_leaf_ttl} .. {self._config.max_leaf_ttl}")
        if request.identity.trust_domain != self._trust_domain:
            raise InvalidRequest(f"identity {request.identity} is not in trust domain {self._trust_domain!r}")
        gen = self._active()
        public_key = request.public_key or serialization.load_der_public_key(request.public_key_der)
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
            raise InvalidRequest("an EC P-256 key is required")
        skew = min(self._config.clock_skew, ttl / 10)
        not_before = now - skew
        not_after = min(now + ttl, gen.inter_cert.not_valid_after_utc)
        if not_after <= now:
            raise CAError("the signing intermediate has expired; the CA must renew it")
        identity = request.identity
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.service[:64])]))
            .issuer_name(gen.inter_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(gen.inter_ski),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(identity.uri), x509.DNSName(identity.dns_name)]), critical=False)
            .sign(gen.inter_key, hashes.SHA256())
        )
        return SignedLeaf(identity=identity, cert_pem=_pem(cert), chain_pem=gen.chain(),
                          serial=cert.serial_number, not_before=cert.not_valid_before_utc,
                          not_after=cert.not_valid_after_utc, root_id=gen.id)

    def active_chain(self) -> tuple[str, ...]:
        return self._active().chain()

    # -- rotation and upkeep -----------------------------------------------------------------

    def rotate(self, now: datetime) -> str:
        old = self._active()
        new = self._new_generation(now)
        new.cross_signed.append(self._cross_sign(new.root_cert, now))
        old.active = False
        old.retired_at = now
        old.prune_after = now + self._max_leaf_ttl + self._config.clock_skew
        old.modify_index = new.create_index
        self._generations.append(new)
        return new.id

    def maintain(self, now: datetime) -> bool:
        changed = False
        keep: list[Generation] = []
        dropped: list[Generation] = []
        for g in self._generations:
            if not g.active and g.prune_after is not None and g.prune_after <= now:
                dropped.append(g)
            else:
                keep.append(g)
        if dropped:
            self._generations = keep
            changed = True
            self._next_index()
            dropped_subjects = {g.root_cert.subject for g in dropped}
            for g in keep:
                before = len(g.cross_signed)
                g.cross_signed = [c for c in g.cross_signed if c.issuer not in dropped_subjects]
                if len(g.cross_signed) != before:
                    g.modify_index = self._next_index()
        active = self._active()
        if active.root_cert.not_valid_after_utc - now <= self._config.root_ttl / 10:
            self.rotate(now)
            return True
        remaining = active.inter_cert.not_valid_after_utc - now
        if remaining <= self._config.intermediate_ttl / 5 or remaining <= self._max_leaf_ttl:
            active.inter_key, active.inter_cert = self._new_intermediate(active.root_key, active.root_cert, now)
            active.modify_index = self._next_index()
            changed = True
        return changed

    def bundle(self, index: int) -> TrustBundle:
        active = self._active()
        cluster = self._trust_domain.removesuffix(".consul")
        roots = tuple(
            RootInfo(
                id=g.id,
                name="Weft CA Primary Cert",
                serial_number=g.root_cert.serial_number,
                signing_key_id=_colon_hex(_ski(g.inter_cert).digest),
                not_before=g.root_cert.not_valid_before_utc,
                not_after=g.root_cert.not_valid_after_utc,
                root_cert=_pem(g.root_cert),
                intermediate_certs=g.chain(),
                active=g.active,
                create_index=g.create_index,
                modify_index=g.modify_index,
            )
            for g in self._generations
        )
        return TrustBundle(trust_domain=self._trust_domain, active_root_id=active.id, roots=roots,
                           index=index, cluster_id=cluster)
