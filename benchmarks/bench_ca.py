"""CA benchmark: signing throughput, and how fast a rotation reaches 100 WatchRoots watchers.

Signing (certificates per second, one process, same run):
- ``provider``: the CA's whole signing path for one CSR (``ca.csr.parse_csr``: parse, signature and
  key checks, SAN checks; then ``BuiltinProvider.sign``);
- ``service_token``: ``CAService.sign`` with an ACL token checked against (in-memory) policies;
- ``grpc``: ``Sign`` over gRPC/TLS on loopback, 16 calls in flight (CSR made beforehand);
- baselines: ``cryptography`` building the same leaf with no checks at all; the least any CA must do
  (load the CSR, verify its signature, build the leaf); raw ECDSA P-256 signatures over the same TBS
  bytes (the floor: one signature per certificate).

Rotation: a real dev agent and a real ``weft ca serve``; 100 watchers stream ``WatchRoots``; we
run ``weft ca rotate`` and time until every watcher holds the new bundle. Baseline: the same CLI's
fixed cost, a ``weft ca roots`` run (Python start-up, one Consul read). Also the in-process time from a
``Rotate`` RPC to 100 watchers, without any process start-up.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca.authz import TokenAuthorizer
from ca.builtin import BuiltinProvider
from ca.client import GrpcCA, fixed_resolver
from ca.csr import make_csr, new_key, parse_csr
from ca.identity import SpiffeId
from ca.provider import CAConfig, TrustBundle
from ca.server import CAServer, CAService, ServeOptions
from ca.store import CAStore, kek_from_text
from ca.v1 import ca_pb2, ca_pb2_grpc
from ca.wire import bundle_from_pb
from tests.support import WEFT, DevAgent, Proc, free_port, wait_for
from tests.unit.ca.fakes import FakeAcl, FakeKV, FakeLock, FakeRegistry

TD = "0b0b0b0b-1111-4222-8333-444444444444.consul"
N_SIGN = 300
N_WATCHERS = 100


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else 0.0


def _signing() -> dict[str, Any]:
    now = datetime.now(UTC)
    provider = BuiltinProvider()
    provider.configure(CAConfig(), TD, None, now)
    ident = SpiffeId.for_service(TD, "web")
    csrs = [make_csr(new_key(), ident) for _ in range(N_SIGN)]
    ttl = timedelta(hours=72)
    gen = provider.generations[0]
    keys = [x509.load_pem_x509_csr(c).public_key() for c in csrs]
    tbs = x509.load_pem_x509_certificate(provider.sign(parse_csr(csrs[0], TD), ttl, now).cert_pem.encode()
                                         ).tbs_certificate_bytes

    def ours(batch: list[bytes]) -> None:
        for csr in batch:
            provider.sign(parse_csr(csr, TD), ttl, now)

    def build(pk: Any) -> None:
        (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")]))
         .issuer_name(gen.inter_cert.subject).public_key(pk).serial_number(x509.random_serial_number())
         .not_valid_before(now).not_valid_after(now + ttl)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                               ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
         .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ident.uri),
                                                     x509.DNSName(ident.dns_name)]), critical=False)
         .sign(gen.inter_key, hashes.SHA256()))

    def builder(batch: list[Any]) -> None:
        # baseline 1: cryptography builds the same leaf, no checks of any kind
        for pk in batch:
            build(pk)

    def minimal(batch: list[bytes]) -> None:
        # baseline 2: the least any CA must do: load the CSR, verify its signature, build the leaf
        for pem in batch:
            csr = x509.load_pem_x509_csr(pem)
            if not csr.is_signature_valid:
                raise ValueError("bad CSR")
            build(csr.public_key())

    def raw_ecdsa(batch: list[bytes]) -> None:
        # baseline 2: one raw ECDSA P-256 signature over a real leaf's TBS bytes per certificate
        for _ in batch:
            gen.inter_key.sign(tbs, ec.ECDSA(hashes.SHA256()))

    # interleaved rounds, so that a noisy neighbour hits all three alike; medians of the rounds
    rounds, size = 6, N_SIGN // 6
    times: dict[str, list[float]] = {"ours": [], "builder": [], "minimal": [], "raw": []}
    for r in range(rounds):
        sl = slice(r * size, (r + 1) * size)
        for name, fn, batch in (("ours", ours, csrs[sl]), ("builder", builder, keys[sl]),
                                ("minimal", minimal, csrs[sl]), ("raw", raw_ecdsa, csrs[sl])):
            t = time.perf_counter()
            fn(batch)  # type: ignore[operator,arg-type]
            times[name].append(time.perf_counter() - t)
    ours_t = statistics.median(times["ours"])
    builder_t = statistics.median(times["builder"])
    minimal_t = statistics.median(times["minimal"])
    raw = statistics.median(times["raw"])
    n = size
    return {
        "n": N_SIGN,
        "provider_certs_per_s": _rate(n, ours_t),
        "baseline_builder_certs_per_s": _rate(n, builder_t),
        "baseline_minimal_ca_certs_per_s": _rate(n, minimal_t),
        "provider_vs_minimal_ca": round(minimal_t / ours_t, 3),
        "baseline_raw_ecdsa_per_s": _rate(n, raw),
        "provider_vs_builder": round(builder_t / ours_t, 3),
        "provider_vs_raw_ecdsa": round(raw / ours_t, 3),
    }


def _acl() -> FakeAcl:
    acl = FakeAcl()
    acl.add_policy("p", 'service "web" { policy = "write" }\nservice_prefix "" { policy = "read" }')
    acl.add_token("t", ["p"])
    acl.add_policy("op", 'operator = "write"')
    acl.add_token("op", ["op"])
    return acl


async def _start(acl: FakeAcl) -> tuple[CAServer, asyncio.Event]:
    service = CAService(CAStore(FakeKV(), kek_from_text(bytes(32), "bench")), TokenAuthorizer(acl, "dc1"),
                        CAConfig())
    stop = asyncio.Event()
    server = CAServer(service, FakeLock().handle(), FakeRegistry(), ServeOptions(listen="127.0.0.1:0"))
    await server.start(stop)
    while not service.active:  # it campaigns again once registered
        await asyncio.sleep(0.01)
    return server, stop


async def _service_and_grpc() -> dict[str, Any]:
    server, stop = await _start(_acl())
    try:
        svc = server.service
        ident = SpiffeId.for_service(svc.trust_domain, "web")
        csrs = [make_csr(new_key(), ident) for _ in range(N_SIGN)]
        t = time.perf_counter()
        for csr in csrs:
            await svc.sign(csr, "t", b"", b"", 0)
        token_path = time.perf_counter() - t

        bundle = svc.bundle
        assert bundle is not None
        conn = GrpcCA(fixed_resolver(f"127.0.0.1:{server.port}"))
        sem = asyncio.Semaphore(16)

        async def one(csr: bytes) -> None:
            async with sem:
                await conn.sign(csr, token="t", current_chain=b"", proof=b"", ttl_seconds=0, bundle=bundle)

        await one(csrs[0])  # connect and handshake outside the timing
        t = time.perf_counter()
        await asyncio.gather(*(one(c) for c in csrs))
        over_grpc = time.perf_counter() - t
        await conn.close()

        # in-process: Rotate RPC -> 100 WatchRoots watchers
        rpc_ms = await _rotation_fanout(f"127.0.0.1:{server.port}", bundle, rotate=lambda: conn_rotate(
            server, bundle))
        return {"service_token_certs_per_s": _rate(N_SIGN, token_path),
                "grpc_certs_per_s_16_in_flight": _rate(N_SIGN, over_grpc),
                "rotate_rpc_to_100_watchers_ms": rpc_ms}
    finally:
        stop.set()
        await server.stop()


async def conn_rotate(server: CAServer, bundle: TrustBundle) -> None:
    conn = GrpcCA(fixed_resolver(f"127.0.0.1:{server.port}"))
    try:
        await conn.rotate("op", bundle)
    finally:
        await conn.close()


async def _rotation_fanout(address: str, bundle: TrustBundle, rotate: Any) -> float:
    """Open N_WATCHERS WatchRoots streams, run `rotate()`, return ms until all hold a new active root."""
    target = SpiffeId.for_service(bundle.trust_domain, "weft-ca").dns_name
    channels = [grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(bundle.roots_pem.encode()),
                                        options=[("grpc.ssl_target_name_override", target)]) for _ in range(10)]
    old_active = bundle.active_root_id
    got_initial = 0
    done_at: list[float] = []
    initial = asyncio.Event()
    finished = asyncio.Event()

    async def watch(i: int) -> None:
        nonlocal got_initial
        stub = ca_pb2_grpc.CAStub(channels[i % len(channels)])  # type: ignore[no-untyped-call]
        call = stub.WatchRoots(ca_pb2.WatchRootsRequest(known_index=0))
        first = True
        async for pb in call:
            b = bundle_from_pb(pb)
            if first:
                first = False
                got_initial += 1
                if got_initial == N_WATCHERS:
                    initial.set()
            if b.active_root_id != old_active:
                done_at.append(time.perf_counter())
                if len(done_at) == N_WATCHERS:
                    finished.set()
                call.cancel()
                return

    tasks = [asyncio.create_task(watch(i)) for i in range(N_WATCHERS)]
    try:
        await asyncio.wait_for(initial.wait(), 60)
        t0 = time.perf_counter()
        await rotate()
        await asyncio.wait_for(finished.wait(), 120)
        return round((max(done_at) - t0) * 1000, 1)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close(None)


def _read_bundle(agent: DevAgent) -> TrustBundle | None:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{agent.url}/v1/kv/weft/ca/roots?raw", timeout=2) as resp:
            return TrustBundle.from_json(resp.read())
    except OSError:
        return None


def _cli_rotation() -> dict[str, Any]:
    agent = DevAgent()
    port = free_port()
    ca = Proc([*WEFT, "ca", "serve", "-dev", "--listen", f"127.0.0.1:{port}", "--no-register"], env=agent.env)
    try:
        wait_for(lambda: _read_bundle(agent) is not None, timeout=60, what="CA roots")
        bundle = _read_bundle(agent)
        assert bundle is not None
        env = {**agent.env}
        roots_runs = []
        for _ in range(3):
            t = time.perf_counter()
            subprocess.run([*WEFT, "ca", "roots"], env=env, capture_output=True, check=True, timeout=60)
            roots_runs.append(time.perf_counter() - t)

        async def rotate_cli() -> None:
            proc = await asyncio.create_subprocess_exec(
                *WEFT, "ca", "rotate", "--ca-addr", f"127.0.0.1:{port}", env={**__import__("os").environ, **env},
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            _, err = await proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"weft ca rotate failed: {err.decode()[-500:]}")

        ms = asyncio.run(_rotation_fanout(f"127.0.0.1:{port}", bundle, rotate_cli))
        base_ms = round(statistics.median(roots_runs) * 1000, 1)
        return {"weft_ca_rotate_to_100_watchers_ms": ms, "baseline_weft_ca_roots_cli_ms": base_ms,
                "rotate_vs_cli_baseline": round(ms / base_ms, 3) if base_ms else None}
    finally:
        ca.stop()
        agent.stop()


def run() -> dict[str, Any]:
    from weft import logsetup

    logsetup.configure("warn")  # one log line per signature would measure the logger
    out: dict[str, Any] = {}
    out["signing"] = _signing()
    out["service"] = asyncio.run(_service_and_grpc())
    out["rotation_cli"] = _cli_rotation()
    s = out["signing"]
    print(f"   provider {s['provider_certs_per_s']} certs/s vs minimal CA {s['baseline_minimal_ca_certs_per_s']} "
          f"(x{s['provider_vs_minimal_ca']}), bare builder "
          f"{s['baseline_builder_certs_per_s']} (x{s['provider_vs_builder']}), raw ECDSA "
          f"{s['baseline_raw_ecdsa_per_s']}/s; over gRPC {out['service']['grpc_certs_per_s_16_in_flight']} certs/s",
          flush=True)
    r = out["rotation_cli"]
    print(f"   weft ca rotate -> 100 watchers: {r['weft_ca_rotate_to_100_watchers_ms']} ms "
          f"(weft ca roots CLI alone: {r['baseline_weft_ca_roots_cli_ms']} ms); Rotate RPC -> 100 watchers: "
          f"{out['service']['rotate_rpc_to_100_watchers_ms']} ms", flush=True)
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
