"""Mutual TLS for the sidecar: contexts from the snapshot's credentials, peer identities, error reasons.

- :class:`TlsContexts` builds ``ssl.SSLContext`` objects (server side for the public listener,
  client side for the upstream connections) from a :class:`~sidecar.snapshot.Credentials`, and
  caches them by the credentials' generation. Listeners ask for the context of the *current*
  snapshot for every new connection, so a rotated leaf or a new trust bundle applies to the next
  handshake without a restart; established connections keep going.
- The peer's chain is verified against the roots by OpenSSL (``CERT_REQUIRED``); then
  :func:`peer_identity` reads the SPIFFE ID from the URI SAN and checks its trust domain, and
  :func:`check_server_identity` checks that a server is the upstream we meant to reach (its URI SAN
  and its DNS SAN ``<service>.svc.default.<trust-domain>``, which clients also pass as SNI/host name).
- :func:`tls_error_reason` maps a handshake failure to a short reason for
  ``weft_tls_handshake_errors_total``.
"""

from __future__ import annotations

import os
import ssl
import tempfile
import threading
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from ca.identity import IdentityError, SpiffeId, dns_name
from sidecar.snapshot import Credentials

ALPN_GRPC = ["h2"]
ALPN_HTTP = ["http/1.1"]


class PeerIdentityError(Exception):
    """The peer's certificate is valid but does not carry the identity required; ``reason`` for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _load_chain(ctx: ssl.SSLContext, creds: Credentials) -> None:
    """``load_cert_chain`` only reads files: write leaf+chain and key to a private temp dir, load, remove."""
    with tempfile.TemporaryDirectory(prefix="weft-tls-") as d:
        os.chmod(d, 0o700)
        cert_path = os.path.join(d, "cert.pem")
        key_path = os.path.join(d, "key.pem")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(creds.key_pem)
        with open(cert_path, "w") as f:
            f.write(creds.full_chain_pem)
        ctx.load_cert_chain(cert_path, key_path)


def server_context(creds: Credentials, alpn: list[str] | None = None) -> ssl.SSLContext:
    """A server context that requires and verifies a client certificate from our roots."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=creds.roots_pem)
    _load_chain(ctx, creds)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def client_context(creds: Credentials, alpn: list[str] | None = None) -> ssl.SSLContext:
    """A client context that presents our leaf and verifies the server against our roots and host name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=creds.roots_pem)
    _load_chain(ctx, creds)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


@dataclass(frozen=True)
class _Entry:
    generation: str
    server: dict[str, ssl.SSLContext]
    client: dict[str, ssl.SSLContext]


class TlsContexts:
    """Contexts for the current credentials, rebuilt once per credentials generation (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entry: _Entry | None = None

    def _current(self, creds: Credentials) -> _Entry:
        entry = self._entry
        if entry is None or entry.generation != creds.generation:
            with self._lock:
                entry = self._entry
                if entry is None or entry.generation != creds.generation:
                    entry = _Entry(creds.generation, {}, {})
                    self._entry = entry
        return entry

    def server(self, creds: Credentials, protocol: str) -> ssl.SSLContext:
        entry = self._current(creds)
        ctx = entry.server.get(protocol)
        if ctx is None:
            alpn = ALPN_GRPC if protocol == "grpc" else ALPN_HTTP if protocol == "http" else None
            ctx = server_context(creds, alpn)
            entry.server[protocol] = ctx
        return ctx

    def client(self, creds: Credentials, protocol: str) -> ssl.SSLContext:
        entry = self._current(creds)
        ctx = entry.client.get(protocol)
        if ctx is None:
            alpn = ALPN_HTTP if protocol == "http" else ALPN_GRPC if protocol == "grpc" else None
            ctx = client_context(creds, alpn)
            entry.client[protocol] = ctx
        return ctx


def spiffe_ids_of(der: bytes) -> list[str]:
    """The URI SANs of a DER certificate (empty when it has none)."""
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return []
    assert isinstance(san, x509.SubjectAlternativeName)
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def dns_names_of(der: bytes) -> list[str]:
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return []
    assert isinstance(san, x509.SubjectAlternativeName)
    return list(san.get_values_for_type(x509.DNSName))


def peer_identity(der: bytes | None, trust_domain: str) -> SpiffeId:
    """The SPIFFE identity of a verified peer certificate, which must belong to ``trust_domain``."""
    if not der:
        raise PeerIdentityError("no_client_cert", "the peer presented no certificate")
    uris = [u for u in spiffe_ids_of(der) if u.startswith("spiffe://")]
    if len(uris) != 1:
        raise PeerIdentityError("bad_identity", f"the peer certificate carries {len(uris)} SPIFFE IDs, not one")
    try:
        ident = SpiffeId.parse(uris[0])
    except IdentityError as exc:
        raise PeerIdentityError("bad_identity", f"the peer's SPIFFE ID is not a service identity: {exc}") from None
    if trust_domain and ident.trust_domain != trust_domain:
        raise PeerIdentityError("wrong_trust_domain",
                                f"the peer {ident.uri} is not in this mesh's trust domain {trust_domain}")
    return ident


def expected_server_name(service: str, trust_domain: str) -> str:
    """The DNS SAN (and SNI / ``grpc.ssl_target_name_override``) of an upstream's sidecars."""
    return dns_name(service, trust_domain)


def check_server_identity(der: bytes | None, service: str, trust_domain: str) -> SpiffeId:
    """Check that a server certificate is the upstream ``service``'s: URI SAN and DNS SAN."""
    ident = peer_identity(der, trust_domain)
    if ident.service != service:
        raise PeerIdentityError("wrong_identity", f"expected upstream {service} but the server is {ident.uri}")
    assert der is not None
    want = expected_server_name(service, trust_domain)
    if want not in dns_names_of(der):
        raise PeerIdentityError("wrong_identity", f"the server certificate lacks the DNS SAN {want}")
    return ident


def tls_error_reason(exc: BaseException) -> str:
    """A short, bounded reason for a failed handshake."""
    if isinstance(exc, PeerIdentityError):
        return exc.reason
    if isinstance(exc, TimeoutError) or "taking longer" in str(exc):
        return "timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = getattr(exc, "verify_code", None)
        msg = str(getattr(exc, "verify_message", "") or exc).lower()
        if code == 10 or "expired" in msg:
            return "expired"
        if code == 9 or "not yet valid" in msg:
            return "not_yet_valid"
        if code in (2, 19, 20, 21) or "issuer" in msg or "self-signed" in msg or "self signed" in msg:
            return "unknown_ca"
        if code == 62 or "hostname" in msg or "ip address mismatch" in msg:
            return "wrong_identity"
        return "verify_failed"
    text = str(exc).lower()
    if "wrong_version_number" in text or "wrong version number" in text or "http_request" in text \
            or "http request" in text or "unknown_protocol" in text or "record_layer_failure" in text \
            or "packet length too long" in text:
        return "not_tls"
    if "peer did not return a certificate" in text or "certificate required" in text \
            or "certificate_required" in text:
        return "no_client_cert"
    if "certificate expired" in text or "certificate_expired" in text:
        return "expired"
    if "unknown ca" in text or "unknown_ca" in text or "certificate verify failed" in text:
        return "unknown_ca"
    if "bad certificate" in text or "bad_certificate" in text:
        return "bad_certificate"
    if "alpn" in text or "no application protocol" in text:
        return "alpn"
    if isinstance(exc, (ConnectionError, EOFError)) or "eof" in text:
        return "eof"
    return "other"
