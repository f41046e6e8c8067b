"""A tiny test PKI (cryptography only): roots, intermediates and SPIFFE leaves, good and bad."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.snapshot import Credentials

TD = "11111111-2222-3333-4444-555555555555.consul"


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


@dataclass
class Authority:
    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    trust_domain: str = TD

    @property
    def pem(self) -> str:
        return _pem(self.cert)

    @classmethod
    def root(cls, name: str = "Test Root", trust_domain: str = TD) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                               critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(name, key, cert, trust_domain)

    def leaf(self, service: str, *, serial: int | None = None, expired: bool = False, hours: float = 24,
             trust_domain: str | None = None, dns: str | None = None) -> Credentials:
        td = trust_domain or self.trust_domain
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        if expired:
            start, end = now - dt.timedelta(hours=3), now - dt.timedelta(hours=1)
        else:
            start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(hours=hours)
        uri = f"spiffe://{td}/ns/default/dc/dc1/svc/{service}"
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri),
                                         x509.DNSName(dns or f"{service}.svc.default.{td}")]
        sn = serial or x509.random_serial_number()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
                .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(sn)
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        return Credentials(cert_pem=_pem(cert), key_pem=_key_pem(key), chain_pem="", roots_pem=self.pem,
                           spiffe_id=uri, serial=format(sn, "x"), not_after=end.timestamp(),
                           trust_domain=td, roots_version=self.name)
