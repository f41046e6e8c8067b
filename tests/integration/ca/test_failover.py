"""Two real `weft ca serve` processes against a dev agent: one active, the standby answers UNAVAILABLE,
and takes over (same keys, same trust domain) when the active one is killed."""

from __future__ import annotations

import base64
import json
import signal
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from ca.csr import make_csr, new_key
from ca.identity import SpiffeId
from ca.provider import TrustBundle
from ca.v1 import ca_pb2, ca_pb2_grpc
from tests.support import WEFT, DevAgent, Proc, free_port, wait_for

pytestmark = pytest.mark.integration

KEK = base64.b64encode(bytes(range(32))).decode()


def read_bundle(agent: DevAgent) -> TrustBundle | None:
    try:
        with urllib.request.urlopen(f"{agent.url}/v1/kv/weft/ca/roots?raw", timeout=2) as resp:
            return TrustBundle.from_json(resp.read())
    except OSError:
        return None


def try_sign(address: str, bundle: TrustBundle) -> tuple[grpc.StatusCode, str]:
    sid = SpiffeId.for_service(bundle.trust_domain, "web")
    creds = grpc.ssl_channel_credentials(bundle.roots_pem.encode())
    target = SpiffeId.for_service(bundle.trust_domain, "weft-ca").dns_name
    with grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", target)]) as ch:
        stub = ca_pb2_grpc.CAStub(ch)  # type: ignore[no-untyped-call]
        try:
            resp = stub.Sign(ca_pb2.SignRequest(csr=make_csr(new_key(), sid)), timeout=10)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""  # type: ignore[attr-defined]
        return grpc.StatusCode.OK, resp.root_id


@pytest.fixture
def agent() -> Iterator[DevAgent]:
    a = DevAgent()
    try:
        yield a
    finally:
        a.stop()


def start_ca(agent: DevAgent, port: int, *extra: str, kek: bool = True) -> Proc:
    env = {**agent.env}
    if kek:
        env["WEFT_CA_KEK"] = KEK
    return Proc([*WEFT, "ca", "serve", "--listen", f"127.0.0.1:{port}", "--lock-ttl", "10s", "--lock-delay", "1s",
                 "--check-ttl", "5s", "--maintain-interval", "1s", "--leaf-ttl", "10m", *extra], env=env)


def test_refuses_to_start_without_kek(agent: DevAgent) -> None:
    p = start_ca(agent, free_port(), kek=False)
    try:
        wait_for(lambda: not p.alive(), timeout=30, what="weft ca serve to exit")
        assert p.popen.returncode == 2
        assert "WEFT_CA_KEK" in p.output()
    finally:
        p.stop()
    # with -dev it runs, and says both that its KEK is not secret and that ACLs are off
    dev = start_ca(agent, free_port(), "-dev", kek=False)
    try:
        wait_for(lambda: "ANY caller gets ANY identity" in dev.output(), timeout=60, what="the ACL warning")
        assert "publicly known KEK" in dev.output() and dev.alive()
    finally:
        dev.stop()


def test_failover_to_standby(agent: DevAgent) -> None:
    ports = [free_port(), free_port()]
    procs = [start_ca(agent, ports[0])]
    try:
        wait_for(lambda: read_bundle(agent) is not None, timeout=30, what="the first CA to publish roots")
        procs.append(start_ca(agent, ports[1]))
        first = read_bundle(agent)
        assert first is not None
        bundle: TrustBundle = first
        addresses = [f"127.0.0.1:{p}" for p in ports]

        def roles() -> list[str]:
            out = []
            for a in addresses:
                code, details = try_sign(a, bundle)
                out.append("active" if code == grpc.StatusCode.OK else
                           "standby" if code == grpc.StatusCode.UNAVAILABLE and "standby" in details else "down")
            return out

        wait_for(lambda: sorted(roles()) == ["active", "standby"], timeout=40, interval=0.5,
                 what="one active and one standby CA")
        active = roles().index("active")
        standby = 1 - active
        # rotate on the active replica first: the standby must take over the rotated state
        import asyncio

        from ca.client import GrpcCA, fixed_resolver

        async def rotate() -> str:
            conn = GrpcCA(fixed_resolver(addresses[active]))
            try:
                return (await conn.rotate("", bundle))[0]
            finally:
                await conn.close()

        new_root = asyncio.run(rotate())
        wait_for(lambda: (b := read_bundle(agent)) is not None and b.active_root_id == new_root, timeout=20,
                 what="the rotated bundle in KV")
        rotated = read_bundle(agent)
        assert rotated is not None
        old_bundle, bundle = bundle, rotated
        assert len(bundle.roots) == 2 and old_bundle.active_root_id in bundle.root_ids

        procs[active].signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: try_sign(addresses[standby], bundle)[0] == grpc.StatusCode.OK, timeout=60, interval=0.5,
                 what="the standby to take over")
        took = time.monotonic() - killed
        print(f"standby took over {took:.1f}s after the active CA was killed (lock TTL 10s)")
        # same keys: the new leader signs under the (rotated) root the old one published, and a client
        # still trusting only the first root can talk to it
        code, root_id = try_sign(addresses[standby], bundle)
        assert code == grpc.StatusCode.OK and root_id == new_root
        code, root_id = try_sign(addresses[standby], old_bundle)
        assert code == grpc.StatusCode.OK and root_id == new_root
        after = read_bundle(agent)
        assert after is not None and after.trust_domain == bundle.trust_domain
    finally:
        out = "\n".join(p.output()[-3000:] for p in procs)
        for p in procs:
            p.stop()
        print(out)


def test_cli_roots_sign_rotate(agent: DevAgent, tmp_path: object) -> None:
    from pathlib import Path

    out_dir = Path(str(tmp_path)) / "creds"
    port = free_port()
    ca = start_ca(agent, port)
    try:
        wait_for(lambda: read_bundle(agent) is not None, timeout=30, what="roots")
        import subprocess

        env = {**agent.env, "PATH": "/usr/bin:/bin"}
        roots = subprocess.run([*WEFT, "ca", "roots"], env=env, capture_output=True, text=True, timeout=60)
        assert roots.returncode == 0, roots.stderr
        doc = json.loads(roots.stdout)
        assert set(doc) == {"ActiveRootID", "TrustDomain", "Roots"}

        def sign_ok() -> bool:
            r = subprocess.run([*WEFT, "ca", "sign", "--service", "web", "--out", str(out_dir), "--ttl", "5m",
                                "--ca-addr", f"127.0.0.1:{port}"], env=env, capture_output=True, text=True,
                               timeout=60)
            return r.returncode == 0

        wait_for(sign_ok, timeout=30, interval=0.5, what="weft ca sign")
        assert (out_dir / "key.pem").stat().st_mode & 0o777 == 0o600
        for name in ("cert.pem", "chain.pem", "roots.pem"):
            assert (out_dir / name).read_text().startswith("-----BEGIN CERTIFICATE-----")
        # a replica with another KEK refuses to start, and says why
        wrong = Proc([*WEFT, "ca", "serve", "--listen", f"127.0.0.1:{free_port()}", "--no-register"],
                     env={**agent.env, "WEFT_CA_KEK": base64.b64encode(b"x" * 32).decode()})
        try:
            wait_for(lambda: not wrong.alive(), timeout=60, what="a CA with the wrong KEK to exit")
            assert wrong.popen.returncode == 1 and "another KEK" in wrong.output()
        finally:
            wrong.stop()
        rot = subprocess.run([*WEFT, "ca", "rotate", "--ca-addr", f"127.0.0.1:{port}"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert rot.returncode == 0, rot.stderr
        new_id = json.loads(rot.stdout)["NewRootID"]
        wait_for(lambda: (b := read_bundle(agent)) is not None and b.active_root_id == new_id
                 and len(b.roots) == 2, timeout=20, what="the rotated bundle in KV")
    finally:
        ca.stop()


def test_serving_certificate_outlives_a_short_leaf_ttl(agent: DevAgent) -> None:
    # The CA's own TLS certificate has the leaf TTL; it must be renewed before it expires even when the
    # maintenance interval (default 30s) is longer than that TTL.
    port = free_port()
    p = Proc([*WEFT, "ca", "serve", "-dev", "--listen", f"127.0.0.1:{port}", "--leaf-ttl", "3s",
              "--max-leaf-ttl", "1h"], env=agent.env)
    try:
        wait_for(lambda: read_bundle(agent) is not None, timeout=30, what="the CA to publish roots")
        bundle = read_bundle(agent)
        assert bundle is not None
        wait_for(lambda: try_sign(f"127.0.0.1:{port}", bundle)[0] == grpc.StatusCode.OK, timeout=30,
                 what="the CA to sign")
        time.sleep(7)  # more than two serving-certificate lifetimes
        code, details = try_sign(f"127.0.0.1:{port}", bundle)
        assert code == grpc.StatusCode.OK, (code, details, p.output()[-2000:])
    finally:
        p.stop()
