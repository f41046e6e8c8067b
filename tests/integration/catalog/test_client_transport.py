"""ConsulClient's transport and error mapping against a scripted HTTP server (unix socket and TCP):
address forms, token header, typed errors, malformed bodies. The server here is not Consul; it answers
what each test scripts, so that every status Consul can send is covered."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from catalog.client import (
    ConsulACLDisabled,
    ConsulBadRequest,
    ConsulClient,
    ConsulError,
    ConsulInvalidResponse,
    ConsulNotFound,
    ConsulPermissionDenied,
    ConsulTxnConflict,
    ConsulUnavailable,
)
from catalog.models import ConsulSettings, KVTxnOp
from tests.support import free_port

pytestmark = pytest.mark.integration


class Scripted:
    def __init__(self) -> None:
        self.requests: list[web.Request] = []
        self.bodies: list[bytes] = []
        self.answer: tuple[int, str, dict[str, str]] = (200, "null", {})

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(request)
        self.bodies.append(await request.read())
        status, body, headers = self.answer
        return web.Response(status=status, text=body, headers=headers, content_type="application/json")


@pytest.fixture
async def unix_server(tmp_path: Path) -> AsyncIterator[tuple[Scripted, str]]:
    s = Scripted()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", s.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = str(tmp_path / "consul.sock")
    site = web.UnixSite(runner, sock)
    await site.start()
    try:
        yield s, sock
    finally:
        await runner.cleanup()


@pytest.fixture
async def tcp_server() -> AsyncIterator[tuple[Scripted, int]]:
    s = Scripted()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", s.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield s, port
    finally:
        await runner.cleanup()


async def test_unix_socket_token_and_blocking_params(unix_server: tuple[Scripted, str]) -> None:
    s, sock = unix_server
    s.answer = (200, json.dumps([{"Key": "a b", "Value": None, "ModifyIndex": 7}]),
                {"X-Consul-Index": "7", "X-Consul-KnownLeader": "true"})
    env = {"CONSUL_HTTP_ADDR": f"unix://{sock}", "CONSUL_HTTP_TOKEN": "tok-1"}
    async with ConsulClient(ConsulSettings.from_env(env)) as c:
        index, e = await c.kv_get("a b", index=5, wait=2.5)
        assert index == 7 and e is not None and e.key == "a b"
        await c.kv_get("a b", token="other")
    first, second = s.requests
    assert first.path == "/v1/kv/a b"
    assert first.query["index"] == "5" and first.query["wait"] == "2500ms"
    assert first.headers["X-Consul-Token"] == "tok-1"
    assert second.headers["X-Consul-Token"] == "other"
    assert "index" not in second.query           # index 0: a plain read


async def test_token_file(tcp_server: tuple[Scripted, int], tmp_path: Path) -> None:
    s, port = tcp_server
    tf = tmp_path / "token"
    tf.write_text("from-file\n")
    s.answer = (200, "true", {})
    async with ConsulClient.from_env({"CONSUL_HTTP_ADDR": f"http://127.0.0.1:{port}",
                                      "CONSUL_HTTP_TOKEN_FILE": str(tf)}) as c:
        assert await c.kv_put("k", b"v", flags=3, cas=0)
    r = s.requests[0]
    assert r.headers["X-Consul-Token"] == "from-file"
    assert r.method == "PUT" and r.query["flags"] == "3" and r.query["cas"] == "0"
    assert s.bodies[0] == b"v"


@pytest.mark.parametrize(("status", "exc"), [
    (400, ConsulBadRequest), (413, ConsulBadRequest), (401, ConsulACLDisabled), (403, ConsulPermissionDenied),
    (404, ConsulNotFound), (429, ConsulUnavailable), (500, ConsulUnavailable), (503, ConsulUnavailable),
])
async def test_status_mapping(tcp_server: tuple[Scripted, int], status: int, exc: type[ConsulError]) -> None:
    s, port = tcp_server
    s.answer = (status, "Consul says no", {})
    async with ConsulClient.from_env({"CONSUL_HTTP_ADDR": f"127.0.0.1:{port}"}) as c:
        with pytest.raises(exc) as err:
            await c.agent_service_deregister("svc-1")
    assert "Consul says no" in str(err.value)
    assert err.value.status == status


async def test_missing_key_is_none_with_index_and_bad_body_is_invalid(tcp_server: tuple[Scripted, int]) -> None:
    s, port = tcp_server
    async with ConsulClient.from_env({"CONSUL_HTTP_ADDR": f"127.0.0.1:{port}"}) as c:
        s.answer = (404, "", {"X-Consul-Index": "12"})
        assert await c.kv_get("nope") == (12, None)
        s.answer = (200, "{not json", {"X-Consul-Index": "12"})
        with pytest.raises(ConsulInvalidResponse):
            await c.kv_get("k")
        s.answer = (200, json.dumps([{"Node": {"Node": "n"}, "Service": {"ID": "x", "Service": "x", "Port": "80"}}]),
                    {"X-Consul-Index": "3"})
        with pytest.raises(ConsulInvalidResponse, match=r"Service\.Port"):
            await c.health_connect("x")


async def test_txn_conflict_carries_operation_errors(tcp_server: tuple[Scripted, int]) -> None:
    s, port = tcp_server
    s.answer = (409, json.dumps({"Results": None, "Errors": [{"OpIndex": 0, "What": "failed to lock key"}]}), {})
    async with ConsulClient.from_env({"CONSUL_HTTP_ADDR": f"127.0.0.1:{port}"}) as c:
        with pytest.raises(ConsulTxnConflict) as err:
            await c.txn([KVTxnOp("lock", "k", b"v", session="s1")])
    assert err.value.errors[0].what == "failed to lock key"
    sent: Any = json.loads(s.bodies[0])
    assert sent == [{"KV": {"Verb": "lock", "Key": "k", "Value": "dg==", "Session": "s1"}}]


async def test_health_and_hash_params(tcp_server: tuple[Scripted, int]) -> None:
    s, port = tcp_server
    async with ConsulClient.from_env({"CONSUL_HTTP_ADDR": f"127.0.0.1:{port}"}) as c:
        s.answer = (200, "[]", {"X-Consul-Index": "4"})
        assert await c.health_connect("api", index=3, wait=1) == (4, ())
        await c.health_service("api", passing=False, tag=["v1", "blue"])
        s.answer = (200, json.dumps({"ID": "web-1", "Service": "web", "Port": 1, "ContentHash": "h2"}),
                    {"X-Consul-ContentHash": "h2"})
        h, reg = await c.agent_service("web-1", hash="h1", wait=5)
        assert h == "h2" and reg is not None and reg.name == "web"
    health, tagged, agent = s.requests
    assert health.path == "/v1/health/connect/api" and "passing" in health.query and health.query["index"] == "3"
    assert tagged.query.getall("tag") == ["v1", "blue"] and "passing" not in tagged.query
    assert agent.path == "/v1/agent/service/web-1" and agent.query["hash"] == "h1" and agent.query["wait"] == "5s"


async def test_dropped_connections() -> None:
    """A server that drops every other connection without answering (as a restarted agent's stale
    keep-alive connection does): a GET is resent once on a fresh connection (aiohttp does this for
    idempotent methods); a server that never answers is ConsulUnavailable."""
    import asyncio

    connections = 0
    drop_all = False

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        if drop_all or connections % 2 == 1:
            writer.close()
            return
        body = b'"10.0.0.1:8300"'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with ConsulClient.from_env({"CONSUL_HTTP_ADDR": f"127.0.0.1:{port}"}) as c:
            assert await c.status_leader() == "10.0.0.1:8300"
            assert connections == 2
            drop_all = True
            with pytest.raises(ConsulUnavailable):
                await c.status_leader()
    finally:
        server.close()
        await server.wait_closed()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "consul.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_https_with_cacert_and_verification(tmp_path: Path) -> None:
    import ssl

    cert, key = _self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    s = Scripted()
    s.answer = (200, '"127.0.0.1:8300"', {})
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", s.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
    try:
        addr = f"127.0.0.1:{port}"
        async with ConsulClient.from_env({"CONSUL_HTTP_ADDR": addr, "CONSUL_HTTP_SSL": "true",
                                          "CONSUL_CACERT": str(cert)}) as c:
            assert await c.status_leader() == "127.0.0.1:8300"
        async with ConsulClient.from_env({"CONSUL_HTTP_ADDR": f"https://{addr}"}) as c:
            with pytest.raises(ConsulUnavailable):       # not trusted without the CA
                await c.status_leader()
        async with ConsulClient.from_env({"CONSUL_HTTP_ADDR": f"https://{addr}",
                                          "CONSUL_HTTP_SSL_VERIFY": "false"}) as c:
            assert await c.status_leader() == "127.0.0.1:8300"
    finally:
        await runner.cleanup()


async def test_ipv6_address() -> None:
    s = Scripted()
    s.answer = (200, '"[::1]:8300"', {})
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", s.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "::1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with ConsulClient.from_env({"CONSUL_HTTP_ADDR": f"[::1]:{port}"}) as c:
            assert c.address == f"http://[::1]:{port}"
            assert await c.status_leader() == "[::1]:8300"
    finally:
        await runner.cleanup()
