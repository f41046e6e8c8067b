"""The weft.ca.v1 service over real gRPC/TLS on loopback (Consul replaced by in-memory fakes)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca.client import CARefused, LeafManager
from ca.csr import make_csr, make_renewal_proof, new_key
from ca.identity import SpiffeId
from ca.renewal import Backoff
from ca.v1 import ca_pb2, ca_pb2_grpc
from ca.wire import bundle_from_pb
from tests.unit.ca.fakes import FakeKV, FakeLock
from tests.unit.ca.helpers import csr_with

from .conftest import RunningCA, default_acl, start_ca

pytestmark = pytest.mark.integration


def _sid(ca: RunningCA, service: str) -> SpiffeId:
    return SpiffeId.for_service(ca.service.trust_domain, service)


async def test_sign_and_refusals_over_grpc(running_ca: RunningCA) -> None:
    ca = running_ca
    conn = ca.connector()
    bundle = ca.service.bundle
    try:
        web = _sid(ca, "web")
        ok = await conn.sign(make_csr(new_key(), web), token="web-token", current_chain=b"", proof=b"",
                             ttl_seconds=600, bundle=bundle)
        cert = x509.load_pem_x509_certificate(ok.cert_pem.encode())
        assert cert.not_valid_after_utc - datetime.now(UTC) <= timedelta(minutes=10)

        async def refused(csr: bytes, token: str = "web-token", chain: bytes = b"", proof: bytes = b"",
                          ttl: int = 0) -> CARefused:
            with pytest.raises(CARefused) as info:
                await conn.sign(csr, token=token, current_chain=chain, proof=proof, ttl_seconds=ttl, bundle=bundle)
            return info.value

        uri: list[x509.GeneralName] = [x509.UniformResourceIdentifier(web.uri)]
        cases = [
            (await refused(b"not a csr"), grpc.StatusCode.INVALID_ARGUMENT, "cannot be parsed"),
            (await refused(csr_with(rsa.generate_private_key(65537, 2048), uri)),
             grpc.StatusCode.INVALID_ARGUMENT, "RSA 2048"),
            (await refused(csr_with(ec.generate_private_key(ec.SECP384R1()), uri)),
             grpc.StatusCode.INVALID_ARGUMENT, "secp384r1"),
            (await refused(make_csr(new_key(), SpiffeId.for_service("elsewhere.consul", "web"))),
             grpc.StatusCode.INVALID_ARGUMENT, "trust domain"),
            (await refused(make_csr(new_key(), _sid(ca, "api"))), grpc.StatusCode.PERMISSION_DENIED,
             "lacks service:write on 'api'"),
            (await refused(make_csr(new_key(), web), token="reader"), grpc.StatusCode.PERMISSION_DENIED,
             "lacks service:write"),
            (await refused(make_csr(new_key(), web), token="bogus"), grpc.StatusCode.PERMISSION_DENIED, "not known"),
            (await refused(make_csr(new_key(), web), ttl=1), grpc.StatusCode.INVALID_ARGUMENT, "shorter"),
        ]
        for err, code, text in cases:
            assert err.code == code, err
            assert text in err.message, err
    finally:
        await conn.close()


async def test_expired_certificate_is_refused_for_renewal(running_ca: RunningCA) -> None:
    ca = running_ca
    conn = ca.connector()
    try:
        web = _sid(ca, "web")
        key = new_key()
        ok = await conn.sign(make_csr(key, web), token="web-token", current_chain=b"", proof=b"",
                             ttl_seconds=2, bundle=ca.service.bundle)
        current = (ok.cert_pem + "".join(ok.chain_pem)).encode()
        csr = make_csr(new_key(), web)
        # a valid renewal works without a token
        again = await conn.sign(csr, token="", current_chain=current, proof=make_renewal_proof(key, csr),
                                ttl_seconds=2, bundle=ca.service.bundle)
        assert again.cert_pem
        await asyncio.sleep(2.5)
        with pytest.raises(CARefused) as info:
            await conn.sign(csr, token="", current_chain=current, proof=make_renewal_proof(key, csr),
                            ttl_seconds=2, bundle=ca.service.bundle)
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "expired" in info.value.message
    finally:
        await conn.close()


async def test_standby_answers_unavailable_and_client_moves_on() -> None:
    kv, lock, acl = FakeKV(), FakeLock(), default_acl()
    a = await start_ca(kv, acl, lock)
    b = await start_ca(kv, acl, lock)
    try:
        assert a.service.active and not b.service.active
        channel = grpc.aio.secure_channel(
            b.address, grpc.ssl_channel_credentials(a.service.bundle.roots_pem.encode()),  # type: ignore[union-attr]
            options=[("grpc.ssl_target_name_override", b.service.serving_identity().dns_name)])
        stub = ca_pb2_grpc.CAStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Sign(ca_pb2.SignRequest(csr=make_csr(new_key(), _sid(a, "web")), token="web-token"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "standby" in (info.value.details() or "")
        await channel.close(None)
        # a client that knows both replicas, standby first, gets its certificate
        from ca.client import GrpcCA, fixed_resolver

        conn = GrpcCA(fixed_resolver(b.address, a.address))
        ok = await conn.sign(make_csr(new_key(), _sid(a, "web")), token="web-token", current_chain=b"", proof=b"",
                             ttl_seconds=0, bundle=a.service.bundle)
        assert ok.cert_pem
        await conn.close()
    finally:
        for ca in (a, b):
            ca.stop.set()
            await ca.server.stop()


async def test_leaf_manager_renews_and_follows_rotation(running_ca: RunningCA) -> None:
    ca = running_ca
    seen: list[int] = []
    mgr = LeafManager(_sid(ca, "web"), ca.connector(), token="web-token", bundle=ca.service.bundle,
                      ttl=timedelta(seconds=4), backoff=Backoff(base=0.2, cap=1.0))
    mgr.subscribe(lambda c: seen.append(c.serial))
    stop = asyncio.Event()
    task = mgr.start(stop)
    try:
        first = await mgr.wait_ready(30)
        assert mgr.expiry_unix() == first.not_after.timestamp()
        # renewed at 60-90 % of a 4 s life, by proof of possession (no token needed any more)
        mgr._token = ""
        await _until(lambda: mgr.current is not None and mgr.current.serial != first.serial, 30)
        second = mgr.current
        assert second is not None and second.not_after > first.not_after
        # rotation: renewed at once, with the new root in the bundle and a chain through the cross-signature
        new_root = await ca.service.rotate("operator")
        await _until(lambda: mgr.current is not None and mgr.current.bundle.active_root_id == new_root
                     and _issuer_root(mgr) == new_root, 20)
        assert len(mgr.current.bundle.roots) == 2  # type: ignore[union-attr]
        assert mgr.failures == 0
    finally:
        stop.set()
        await task


def _issuer_root(mgr: LeafManager) -> str:
    cur = mgr.current
    assert cur is not None
    chain = x509.load_pem_x509_certificates(cur.chain_pem)
    inter = chain[0]
    for r in cur.bundle.roots:
        root = x509.load_pem_x509_certificate(r.root_cert.encode())
        if inter.issuer == root.subject:
            return r.id
    return ""


async def _until(pred, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.05)


async def test_watch_roots_stream(running_ca: RunningCA) -> None:
    ca = running_ca
    channel = grpc.aio.secure_channel(
        ca.address, grpc.ssl_channel_credentials(ca.service.bundle.roots_pem.encode()),  # type: ignore[union-attr]
        options=[("grpc.ssl_target_name_override", ca.service.serving_identity().dns_name)])
    stub = ca_pb2_grpc.CAStub(channel)  # type: ignore[no-untyped-call]
    call = stub.WatchRoots(ca_pb2.WatchRootsRequest(known_index=0))
    first = bundle_from_pb(await call.read())
    assert len(first.roots) == 1
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Rotate(ca_pb2.RotateRequest(token="web-token"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    resp = await stub.Rotate(ca_pb2.RotateRequest(token="operator"))
    second = bundle_from_pb(await call.read())
    assert second.active_root_id == resp.new_root_id and len(second.roots) == 2
    call.cancel()
    await channel.close(None)


async def test_grpc_server_picks_up_renewed_leaf_without_restart(running_ca: RunningCA, tmp_path: object) -> None:
    """LeafManager.server_credentials(): gRPC's certificate fetcher (on a gRPC thread) serves each new
    leaf to the next handshake."""
    import socket
    import ssl
    from pathlib import Path

    from grpc_health.v1 import health, health_pb2_grpc

    ca = running_ca
    web = LeafManager(_sid(ca, "web"), ca.connector(), token="all", bundle=ca.service.bundle,
                      ttl=timedelta(seconds=3), backoff=Backoff(base=0.2, cap=1.0))
    client = LeafManager(_sid(ca, "a"), ca.connector(), token="all", bundle=ca.service.bundle,
                         ttl=timedelta(hours=1))
    stop = asyncio.Event()
    tasks = [web.start(stop), client.start(stop)]
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    try:
        await web.wait_ready(30)
        creds = await client.wait_ready(30)
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)  # type: ignore[attr-defined]
        port = server.add_secure_port("127.0.0.1:0", web.server_credentials(require_client_auth=True))
        await server.start()
        d = Path(str(tmp_path))
        (d / "k.pem").write_bytes(creds.key_pem)
        (d / "c.pem").write_bytes(creds.cert_chain_pem)
        (d / "r.pem").write_bytes(creds.roots_pem)

        def served_serial() -> int:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.load_cert_chain(d / "c.pem", d / "k.pem")
            ctx.load_verify_locations(d / "r.pem")
            ctx.set_alpn_protocols(["h2"])
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                    ctx.wrap_socket(raw, server_hostname=_sid(ca, "web").dns_name) as tls:
                der = tls.getpeercert(binary_form=True)
                assert der is not None
                return x509.load_der_x509_certificate(der).serial_number

        first = web.current
        assert first is not None
        assert await asyncio.to_thread(served_serial) == first.serial
        await _until(lambda: web.current is not None and web.current.serial != first.serial, 30)
        renewed = web.current
        assert renewed is not None

        async def serves_renewed() -> bool:
            return await asyncio.to_thread(served_serial) == renewed.serial

        deadline = asyncio.get_running_loop().time() + 20
        while not await serves_renewed():
            assert asyncio.get_running_loop().time() < deadline, "the gRPC server kept the old leaf"
            await asyncio.sleep(0.1)
    finally:
        await server.stop(None)
        stop.set()
        for t in tasks:
            await t


async def test_grpc_health_serving_on_active_not_serving_on_standby() -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    kv, lock, acl = FakeKV(), FakeLock(), default_acl()
    a = await start_ca(kv, acl, lock)
    b = await start_ca(kv, acl, lock)
    try:
        async def status(ca: RunningCA) -> int:
            bundle = a.service.bundle
            assert bundle is not None
            async with grpc.aio.secure_channel(
                    ca.address, grpc.ssl_channel_credentials(bundle.roots_pem.encode()),
                    options=[("grpc.ssl_target_name_override", a.service.serving_identity().dns_name)]) as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                resp = await stub.Check(health_pb2.HealthCheckRequest(service="weft.ca.v1.CA"), timeout=10)
                return int(resp.status)

        deadline = asyncio.get_running_loop().time() + 10
        while (await status(a), await status(b)) != (health_pb2.HealthCheckResponse.SERVING,
                                                     health_pb2.HealthCheckResponse.NOT_SERVING):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.2)
    finally:
        for ca in (a, b):
            ca.stop.set()
            await ca.server.stop()
