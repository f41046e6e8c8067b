"""TLS contexts and identity checks, with handshakes over memory BIOs (no sockets)."""

from __future__ import annotations

import dataclasses
import ssl

import pytest

from sidecar.snapshot import Credentials
from sidecar.tls import (
    PeerIdentityError,
    TlsContexts,
    check_server_identity,
    client_context,
    expected_server_name,
    peer_identity,
    server_context,
    tls_error_reason,
)
from tests.unit.sidecar.pki import TD, Authority


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, server_name: str) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, server_side=False, server_hostname=server_name)
    done_c = done_s = False
    for _ in range(20):
        if not done_c:
            try:
                c.do_handshake()
                done_c = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not done_s:
            try:
                s.do_handshake()
                done_s = True
            except ssl.SSLWantReadError:
                pass
        c_in.write(s_out.read())
        if done_c and done_s:
            # TLS 1.3: the server checks the client certificate after the client thinks it is done
            c.write(b"x")
            s_in.write(c_out.read())
            assert s.read(1) == b"x"
            return s, c
    raise AssertionError("handshake did not finish")


@pytest.fixture(scope="module")
def ca() -> Authority:
    return Authority.root()


def with_roots(creds: Credentials, *roots: Authority) -> Credentials:
    return dataclasses.replace(creds, roots_pem="".join(r.pem for r in roots))


def test_mutual_tls_and_identities(ca: Authority) -> None:
    server_creds = ca.leaf("api")
    client_creds = ca.leaf("web")
    s, c = handshake(server_context(server_creds, ["h2"]), client_context(client_creds),
                     expected_server_name("api", TD))
    ident = peer_identity(s.getpeercert(binary_form=True), TD)
    assert ident.service == "web"
    assert check_server_identity(c.getpeercert(binary_form=True), "api", TD).service == "api"
    with pytest.raises(PeerIdentityError) as err:
        check_server_identity(c.getpeercert(binary_form=True), "db", TD)
    assert err.value.reason == "wrong_identity"


def test_foreign_ca_refused(ca: Authority) -> None:
    foreign = Authority.root("Foreign")
    with pytest.raises(ssl.SSLError) as err:
        handshake(server_context(ca.leaf("api")), client_context(foreign.leaf("web")),
                  expected_server_name("api", TD))
    assert tls_error_reason(err.value) == "unknown_ca"


def test_expired_client_cert_refused(ca: Authority) -> None:
    with pytest.raises(ssl.SSLError) as err:
        handshake(server_context(ca.leaf("api")), client_context(ca.leaf("web", expired=True)),
                  expected_server_name("api", TD))
    assert tls_error_reason(err.value) == "expired"


def test_server_with_wrong_name_refused_by_client(ca: Authority) -> None:
    with pytest.raises(ssl.SSLCertVerificationError) as err:
        handshake(server_context(ca.leaf("db")), client_context(ca.leaf("web")), expected_server_name("api", TD))
    assert tls_error_reason(err.value) == "wrong_identity"


def test_other_trust_domain_identity_refused(ca: Authority) -> None:
    other = ca.leaf("web", trust_domain="other.consul")
    s, _ = handshake(server_context(ca.leaf("api")), client_context(other), expected_server_name("api", TD))
    with pytest.raises(PeerIdentityError) as err:
        peer_identity(s.getpeercert(binary_form=True), TD)
    assert err.value.reason == "wrong_trust_domain"
    with pytest.raises(PeerIdentityError) as err2:
        peer_identity(None, TD)
    assert err2.value.reason == "no_client_cert"


def test_two_roots_trusted_during_rotation(ca: Authority) -> None:
    new = Authority.root("New Root")
    server = with_roots(ca.leaf("api"), ca, new)
    client = with_roots(new.leaf("web"), ca, new)
    s, _ = handshake(server_context(server), client_context(client), expected_server_name("api", TD))
    assert peer_identity(s.getpeercert(binary_form=True), TD).service == "web"


def test_contexts_cached_per_generation(ca: Authority) -> None:
    contexts = TlsContexts()
    a = ca.leaf("api")
    assert contexts.server(a, "grpc") is contexts.server(a, "grpc")
    assert contexts.server(a, "grpc") is not contexts.server(a, "tcp")
    b = ca.leaf("api")
    assert contexts.server(b, "grpc") is not contexts.server(a, "grpc")


def test_plaintext_reason() -> None:
    assert tls_error_reason(ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")) == "not_tls"
    assert tls_error_reason(ssl.SSLError(1, "[SSL: HTTP_REQUEST] http request")) == "not_tls"
    assert tls_error_reason(TimeoutError()) == "timeout"
    assert tls_error_reason(ssl.SSLError(1, "[SSL: PEER_DID_NOT_RETURN_A_CERTIFICATE] peer did not return a "
                                            "certificate")) == "no_client_cert"
