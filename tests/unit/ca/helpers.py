"""Test helpers for the CA: CSRs of every kind, and TLS handshakes in memory (no sockets)."""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ca.csr import key_pem, make_csr, new_key
from ca.identity import SpiffeId

TD = "0c1d2e3f-0000-4000-8000-000000000001.consul"


def csr_with(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, sans: list[x509.GeneralName] | None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def spiffe(service: str, td: str = TD) -> SpiffeId:
    return SpiffeId.for_service(td, service)


def write_identity(directory: Path, name: str, key: ec.EllipticCurvePrivateKey, cert_pem: str,
                   chain: tuple[str, ...] | list[str], roots_pem: str) -> tuple[Path, Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    k = directory / f"{name}.key"
    c = directory / f"{name}.crt"
    r = directory / f"{name}.roots"
    k.write_bytes(key_pem(key))
    c.write_text(cert_pem + "".join(chain))
    r.write_text(roots_pem)
    return k, c, r


def memory_handshake(server: tuple[Path, Path, Path], client: tuple[Path, Path, Path]) -> str | None:
    """Mutual TLS between two contexts over memory BIOs; returns None on success, else the error."""
    sk, sc, sr = server
    ck, cc, cr = client
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(sc, sk)
    sctx.load_verify_locations(sr)
    sctx.verify_mode = ssl.CERT_REQUIRED
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname = False
    cctx.load_cert_chain(cc, ck)
    cctx.load_verify_locations(cr)
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    s = sctx.wrap_bio(s_in, s_out, server_side=True)
    c = cctx.wrap_bio(c_in, c_out, server_side=False)
    done = {"s": False, "c": False}
    for _ in range(20):
        for name, obj in (("c", c), ("s", s)):
            if done[name]:
                continue
            try:
                obj.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                return f"{name}: {exc}"
        data = c_out.read()
        if data:
            s_in.write(data)
        data = s_out.read()
        if data:
            c_in.write(data)
        if all(done.values()):
            # TLS 1.3: the server verifies the client's certificate after the client finishes;
            # push one read through so a refusal surfaces
            try:
                c.write(b"x")
                s_in.write(c_out.read())
                s.read(1)
            except ssl.SSLError as exc:
                return f"s: {exc}"
            return None
    return "handshake did not finish"


__all__ = ["TD", "csr_with", "key_pem", "make_csr", "memory_handshake", "new_key", "spiffe", "write_identity"]
