"""Throw-away PKI for the HAProxy baseline: one CA, a server and a client leaf (EC P-256), made at run time.

The certificates look like Weft's (SPIFFE URI SAN, short validity) so that both pairs do the same TLS
work: ECDHE with P-256 keys and ECDSA signatures.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "bench.consul"


@dataclass(frozen=True)
class Files:
    ca: Path          # CA certificate (PEM)
    server: Path      # server certificate + key (PEM, HAProxy's `crt` format)
    client: Path      # client certificate + key (PEM)
    server_name: str  # DNS SAN of the server certificate


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, service: str, dns: str,
          usage: x509.ObjectIdentifier, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    spiffe = f"spiffe://{TRUST_DOMAIN}/ns/default/dc/dc1/svc/{service}"
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(service))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns), x509.UniformResourceIdentifier(spiffe)]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def make(directory: Path, server_service: str = "echo", client_service: str = "client") -> Files:
    """Write ca.pem, server.pem and client.pem into `directory`."""
    now = dt.datetime.now(dt.UTC)
    ca_key = _key()
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("bench CA"))
        .issuer_name(_name("bench CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_name = f"{server_service}.svc.{TRUST_DOMAIN}"
    server_cert, server_key = _leaf(ca_key, ca_cert, server_service, server_name, ExtendedKeyUsageOID.SERVER_AUTH, now)
    client_cert, client_key = _leaf(ca_key, ca_cert, client_service, f"{client_service}.svc.{TRUST_DOMAIN}",
                                    ExtendedKeyUsageOID.CLIENT_AUTH, now)
    directory.mkdir(parents=True, exist_ok=True)
    files = Files(directory / "ca.pem", directory / "server.pem", directory / "client.pem", server_name)
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for path, cert, key in ((files.server, server_cert, server_key), (files.client, client_cert, client_key)):
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + _pem_key(key))
        path.chmod(0o600)
    return files
