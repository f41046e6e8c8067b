"""CAService (the CA's logic without transport) against in-memory fakes: signing and every refusal."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca.authz import TokenAuthorizer
from ca.csr import make_renewal_proof
from ca.provider import CAConfig, InvalidRequest, NotAuthorized
from ca.server import CAService, NotActive
from ca.store import CAStore, kek_from_text

from .fakes import FakeAcl, FakeKV
from .helpers import csr_with, make_csr, new_key

KEK = kek_from_text(bytes(32), "test")


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


async def make_service(acl: FakeAcl, clock: Callable[[], datetime] | None = None,
                       kv: FakeKV | None = None) -> CAService:
    svc = CAService(CAStore(kv or FakeKV(), KEK), TokenAuthorizer(acl, "dc1"),
                    CAConfig(leaf_ttl=timedelta(hours=1), max_leaf_ttl=timedelta(hours=2)),
                    clock=clock or Clock())
    await svc.prepare()
    await svc.become_active()
    return svc


def acl() -> FakeAcl:
    a = FakeAcl()
    a.add_policy("web-write", 'service "web" { policy = "write" }')
    a.add_policy("read-all", 'service_prefix "" { policy = "read" }')
    a.add_policy("op", 'operator = "write"')
    a.add_token("web-token", ["web-write"])
    a.add_token("reader", ["read-all"])
    a.add_token("operator", ["op"])
    return a


async def test_sign_with_token() -> None:
    svc = await make_service(acl())
    sid = svc.serving_identity().__class__.for_service(svc.trust_domain, "web")
    leaf = await svc.sign(make_csr(new_key(), sid), "web-token", b"", b"", 0)
    assert leaf.identity == sid
    assert leaf.not_after - leaf.not_before <= timedelta(hours=1, minutes=7)
    leaf = await svc.sign(make_csr(new_key(), sid), "web-token", b"", b"", 300)
    assert leaf.not_after - leaf.not_before < timedelta(minutes=6)


async def test_refusals() -> None:
    svc = await make_service(acl())
    td = svc.trust_domain
    web = svc.serving_identity().__class__.for_service(td, "web")
    api = web.__class__.for_service(td, "api")
    key = new_key()
    # garbage
    with pytest.raises(InvalidRequest, match="cannot be parsed"):
        await svc.sign(b"garbage", "web-token", b"", b"", 0)
    # RSA and P-384 keys
    uri: list[x509.GeneralName] = [x509.UniformResourceIdentifier(web.uri)]
    with pytest.raises(InvalidRequest, match="RSA"):
        await svc.sign(csr_with(rsa.generate_private_key(65537, 2048), uri), "web-token", b"", b"", 0)
    with pytest.raises(InvalidRequest, match="secp384r1"):
        await svc.sign(csr_with(ec.generate_private_key(ec.SECP384R1()), uri), "web-token", b"", b"", 0)
    # another trust domain
    foreign = web.__class__.for_service("other.consul", "web")
    with pytest.raises(InvalidRequest, match="trust domain"):
        await svc.sign(make_csr(key, foreign), "web-token", b"", b"", 0)
    # another identity than the token covers
    with pytest.raises(NotAuthorized, match="lacks service:write on 'api'"):
        await svc.sign(make_csr(key, api), "web-token", b"", b"", 0)
    # a token without rights, an unknown token, no token
    with pytest.raises(NotAuthorized, match=r"gives read"):
        await svc.sign(make_csr(key, web), "reader", b"", b"", 0)
    with pytest.raises(NotAuthorized, match="not known"):
        await svc.sign(make_csr(key, web), "forged", b"", b"", 0)
    with pytest.raises(NotAuthorized, match="no ACL token"):
        await svc.sign(make_csr(key, web), "", b"", b"", 0)
    # TTL out of range
    with pytest.raises(InvalidRequest, match="longer than"):
        await svc.sign(make_csr(key, web), "web-token", b"", b"", 86400 * 30)
    # other datacenter
    other_dc = web.__class__.for_service(td, "web", datacenter="dc9")
    with pytest.raises(NotAuthorized, match="datacenter"):
        await svc.sign(make_csr(key, other_dc), "web-token", b"", b"", 0)
    assert svc.signed == 0


async def test_renewal_and_expired_renewal() -> None:
    clock = Clock()
    svc = await make_service(acl(), clock)
    web = svc.serving_identity().__class__.for_service(svc.trust_domain, "web")
    api = web.__class__.for_service(svc.trust_domain, "api")
    old_key = new_key()
    leaf = await svc.sign(make_csr(old_key, web), "web-token", b"", b"", 0)
    current = (leaf.cert_pem + "".join(leaf.chain_pem)).encode()
    csr = make_csr(new_key(), web)
    renewed = await svc.sign(csr, "", current, make_renewal_proof(old_key, csr), 0)
    assert renewed.identity == web
    # the certificate of one identity does not renew another
    csr_api = make_csr(new_key(), api)
    with pytest.raises(NotAuthorized, match="not for"):
        await svc.sign(csr_api, "", current, make_renewal_proof(old_key, csr_api), 0)
    # an expired certificate is refused
    clock.now += timedelta(hours=2)
    with pytest.raises(NotAuthorized, match="expired"):
        await svc.sign(csr, "", current, make_renewal_proof(old_key, csr), 0)


async def test_acls_disabled_anyone_gets_anything() -> None:
    svc = await make_service(FakeAcl(enabled=False))
    assert not svc.acls_enabled
    sid = svc.serving_identity().__class__.for_service(svc.trust_domain, "anything")
    assert (await svc.sign(make_csr(new_key(), sid), "", b"", b"", 0)).identity == sid


async def test_standby_refuses_and_takes_over() -> None:
    kv = FakeKV()
    a = await make_service(acl(), kv=kv)
    b = CAService(CAStore(kv, KEK), TokenAuthorizer(acl(), "dc1"), a.config)
    await b.prepare()
    assert await b.load()
    assert b.trust_domain == a.trust_domain and b.bundle is not None
    assert b.bundle.root_ids == a.bundle.root_ids  # type: ignore[union-attr]
    web = a.serving_identity().__class__.for_service(a.trust_domain, "web")
    with pytest.raises(NotActive):
        await b.sign(make_csr(new_key(), web), "web-token", b"", b"", 0)
    a.become_standby()
    await b.become_active()
    assert (await b.sign(make_csr(new_key(), web), "web-token", b"", b"", 0)).identity == web


async def test_rotate_needs_operator_and_publishes() -> None:
    kv = FakeKV()
    svc = await make_service(acl(), kv=kv)
    first = svc.bundle
    assert first is not None
    with pytest.raises(NotAuthorized, match="operator:write"):
        await svc.rotate("web-token")
    seen = []

    async def watcher() -> None:
        async for b in svc.watch(first.index):
            seen.append(b)
            return

    import asyncio

    task = asyncio.create_task(watcher())
    await asyncio.sleep(0)
    new_id = await svc.rotate("operator")
    await asyncio.wait_for(task, 5)
    assert seen[0].active_root_id == new_id and len(seen[0].roots) == 2
    from ca.store import read_roots

    published = await read_roots(kv)
    assert published is not None and published.active_root_id == new_id


def test_status_codes_for_errors() -> None:
    import grpc

    from ca.server import _status_for

    class ConsulUnavailable(Exception):
        pass

    assert _status_for(InvalidRequest("x"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert _status_for(NotAuthorized("x"))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert _status_for(NotActive("x"))[0] == grpc.StatusCode.UNAVAILABLE
    assert _status_for(ConsulUnavailable("down"))[0] == grpc.StatusCode.UNAVAILABLE
    assert _status_for(ConnectionRefusedError())[0] == grpc.StatusCode.UNAVAILABLE
    code, message = _status_for(KeyError("secret-ish detail"))
    assert code == grpc.StatusCode.INTERNAL and "secret-ish" not in message


async def test_rotation_that_cannot_be_saved_is_undone() -> None:
    kv = FakeKV()
    svc = await make_service(acl(), kv=kv)
    before = svc.bundle
    assert before is not None
    kv.fail = True
    with pytest.raises(ConnectionError):
        await svc.rotate("operator")
    assert svc.bundle == before
    assert svc.provider.bundle(0).root_ids == before.root_ids  # still signing under the old root
    kv.fail = False
    new_id = await svc.rotate("operator")
    assert svc.bundle is not None and svc.bundle.active_root_id == new_id
