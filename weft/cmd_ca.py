"""`weft ca`: the certificate authority.

    weft ca serve [-dev] [--kek-file F] [--leaf-ttl D] [--listen ADDR] ...   run a CA replica
    weft ca roots                                                             print the trust bundle (JSON)
    weft ca rotate [--ca-addr ADDR]                                           new root, cross-signed
    weft ca sign --service NAME --out DIR [--ttl D] [--token T]               key.pem, cert.pem, chain.pem, roots.pem

All read CONSUL_HTTP_ADDR and CONSUL_HTTP_TOKEN (and the rest of Consul's CLI variables).

This module also wires the CA's Protocols (``ca.backend``) to the Consul layer (``catalog``): ``ca``
must not import ``catalog``, so the adapters live here. ``weft/cmd_sidecar.py`` reuses
``consul_resolver``, ``_read_bundle``, ``_own_token`` and ``_datacenter``: keep their names and
signatures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import structlog

from ca.authz import TokenAuthorizer
from ca.backend import KEY_LEADER, SERVICE_NAME, KVEntry, ServiceAddress, TokenRejected
from ca.client import CARefused, CAUnavailable, GrpcCA, Resolver, fixed_resolver
from ca.csr import key_pem, make_csr, new_key
from ca.identity import IdentityError, SpiffeId, validate_service_name
from ca.provider import (
    DEFAULT_INTERMEDIATE_TTL,
    DEFAULT_LEAF_TTL,
    DEFAULT_MAX_LEAF_TTL,
    DEFAULT_ROOT_TTL,
    MIN_LEAF_TTL,
    CAConfig,
    CAError,
    TrustBundle,
)
from ca.server import CAServer, CAService, ServeOptions
from ca.store import CAStore, KekError, load_kek, read_roots
from catalog.client import (
    ConsulACLDisabled,
    ConsulClient,
    ConsulError,
    ConsulNotFound,
    ConsulPermissionDenied,
)
from catalog.lock import LeaderLock
from catalog.registration import service_registration, ttl_check_id
from devmesh.state import consul_for_cli
from weft import logsetup, runner
from weft.durations import parse_duration

log = structlog.get_logger("weft.ca")

def _fmt(d: timedelta) -> str:
    return f"{int(d.total_seconds())}s"


# -- adapters: ca.backend Protocols on catalog ---------------------------------------------------------


class ConsulKV:
    def __init__(self, client: ConsulClient) -> None:
        self._c = client

    @staticmethod
    def _entry(key: str, e: Any) -> KVEntry | None:
        if e is None or e.value is None:
            return None
        return KVEntry(key, bytes(e.value), int(e.modify_index))

    async def get(self, key: str) -> KVEntry | None:
        _, e = await self._c.kv_get(key)
        return self._entry(key, e)

    async def put(self, key: str, value: bytes, *, cas: int | None = None) -> bool:
        return await self._c.kv_put(key, value, cas=cas)

    async def watch(self, key: str, index: int, wait_s: float) -> tuple[KVEntry | None, int]:
        idx, e = await self._c.kv_get(key, index=index, wait=wait_s)
        return self._entry(key, e), idx


class ConsulAcl:
    def __init__(self, client: ConsulClient) -> None:
        self._c = client

    async def token_self(self, token: str) -> dict[str, Any] | None:
        try:
            r = await self._c.request("GET", "/v1/acl/token/self", token=token)
        except ConsulACLDisabled:  # 401: ACL support disabled
            return None
        except (ConsulPermissionDenied, ConsulNotFound) as exc:  # 403 ACL not found; 404 no such token
            raise TokenRejected(exc.message) from None
        doc = r.json()
        if not isinstance(doc, dict):
            raise TokenRejected("token lookup answered no object")
        return doc

    async def _read(self, path: str) -> dict[str, Any]:
        try:
            r = await self._c.request("GET", path)
        except ConsulPermissionDenied as exc:
            raise CAError(f"the CA's own Consul token may not read ACL policies and roles (it needs "
                          f"acl = \"read\"): {exc.message}") from None
        doc = r.json()
        if not isinstance(doc, dict):
            raise ConsulError(f"{path}: expected an object")
        return doc

    async def policy(self, policy_id: str) -> dict[str, Any]:
        return await self._read(f"/v1/acl/policy/{policy_id}")

    async def role(self, role_id: str) -> dict[str, Any]:
        return await self._read(f"/v1/acl/role/{role_id}")


class ConsulRegistry:
    def __init__(self, client: ConsulClient) -> None:
        self._c = client
        self._check_ids: dict[str, str] = {}

    async def register(self, service_id: str, address: str, port: int, tags: list[str], ttl_s: float) -> None:
        reg = service_registration(name=SERVICE_NAME, service_id=service_id, address=address, port=port,
                                   tags=tags, ttl=f"{max(ttl_s, 1.0):.0f}s", meta={"weft": "ca"})
        self._check_ids[service_id] = ttl_check_id(reg)
        await self._c.agent_service_register(reg)

    async def pass_check(self, service_id: str, note: str) -> None:
        await self._c.agent_check_pass(self._check_ids.get(service_id, f"{service_id}:ttl"), note)

    async def deregister(self, service_id: str) -> None:
        await self._c.agent_service_deregister(service_id)

    def check_ids(self) -> list[str]:
        return list(self._check_ids.values())

    async def healthy(self, service: str) -> list[ServiceAddress]:
        _, instances = await self._c.health_service(service, passing=True)
        out = [ServiceAddress(i.service_id, i.address, i.port, tuple(i.tags),
                              active=any(c.output.strip() == "active" for c in i.checks)) for i in instances]
        return sorted(out, key=lambda s: 0 if s.active else 1)


class SessionTiedToChecks:
    """Wraps a ConsulClient for `catalog.lock.LeaderLock`: each session it creates also lists the CA's own
    TTL health check (`ServiceChecks`), so Consul invalidates the leader's session as soon as that check
    goes critical (a dead replica stops passing it) instead of waiting for the session TTL to lapse."""

    def __init__(self, client: ConsulClient, registry: ConsulRegistry | None) -> None:
        self._client = client
        self._registry = registry

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def session_create(self, **kwargs: Any) -> str:
        checks = self._registry.check_ids() if self._registry is not None else []
        if checks:
            kwargs["service_checks"] = checks
        return await self._client.session_create(**kwargs)


class TermLock:
    """A `catalog.lock.LeaderLock` is one term; this campaigns again with a fresh one after a loss."""

    def __init__(self, factory: Callable[[], LeaderLock]) -> None:
        self._factory = factory
        self._lock: LeaderLock | None = None

    async def acquire(self) -> None:
        if self._lock is not None and self._lock.lost.is_set():
            await self._lock.stop()
            self._lock = None
        if self._lock is None:
            self._lock = self._factory()
        await self._lock.acquire()

    async def wait_lost(self) -> None:
        if self._lock is None:
            return
        await self._lock.wait_lost()

    async def release(self) -> None:
        if self._lock is not None:
            await self._lock.stop()
            self._lock = None


def consul_resolver(client: ConsulClient) -> Resolver:
    registry = ConsulRegistry(client)

    async def resolve() -> list[str]:
        return [f"{s.address}:{s.port}" for s in await registry.healthy(SERVICE_NAME)]

    return resolve


def _own_token(client: ConsulClient) -> str:
    s = client.settings
    if s.token:
        return s.token
    if s.token_file:
        with contextlib.suppress(OSError):
            return Path(s.token_file).read_text().strip()
    return ""


async def _datacenter(client: ConsulClient, given: str) -> str:
    if given:
        return given
    if client.settings.datacenter:
        return client.settings.datacenter
    try:
        return (await client.agent_self()).datacenter
    except (ConsulError, ValueError):
        return "dc1"


# -- arguments -------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ca_command", metavar="{serve,roots,rotate,sign}")
    sub.required = True

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-log-level", "--log-level", default="info", help="debug, info, warn or error")

    serve = sub.add_parser("serve", help="run a CA replica (one is active, the others stand by)")
    common(serve)
    serve.add_argument("-dev", "--dev", action="store_true",
                       help="allow running without a KEK (an insecure built-in one is used)")
    serve.add_argument("--kek-file", "-kek-file", default=None,
                       help="file with the key-encryption key (32 bytes raw/base64/hex, or a passphrase); "
                            "default: $WEFT_CA_KEK")
    serve.add_argument("--listen", "-listen", default="127.0.0.1:8553", help="gRPC address (default 127.0.0.1:8553)")
    serve.add_argument("--advertise", "-advertise", default="", help="address registered in Consul (default: listen)")
    serve.add_argument("--datacenter", "-datacenter", default="", help="default: the agent's datacenter")
    serve.add_argument("--leaf-ttl", "-leaf-ttl", type=parse_duration, default=DEFAULT_LEAF_TTL,
                       help="leaf certificate lifetime (default 72h; minutes in tests, 2s at the least)")
    serve.add_argument("--max-leaf-ttl", "-max-leaf-ttl", type=parse_duration, default=None,
                       help="longest TTL a caller may ask for (default 7d, at least --leaf-ttl)")
    serve.add_argument("--root-ttl", "-root-ttl", type=parse_duration, default=DEFAULT_ROOT_TTL,
                       help="root lifetime (default 3650d)")
    serve.add_argument("--intermediate-ttl", "-intermediate-ttl", type=parse_duration,
                       default=DEFAULT_INTERMEDIATE_TTL, help="intermediate lifetime (default 365d)")
    serve.add_argument("--lock-ttl", "-lock-ttl", type=parse_duration, default=timedelta(seconds=15),
                       help="Consul session TTL of the leader lock (default 15s; a standby takes over within it)")
    serve.add_argument("--lock-delay", "-lock-delay", type=parse_duration, default=timedelta(seconds=5),
                       help="Consul lock-delay after a lost session (default 5s)")
    serve.add_argument("--check-ttl", "-check-ttl", type=parse_duration, default=timedelta(seconds=15),
                       help="TTL of the weft-ca health check (default 15s)")
    serve.add_argument("--maintain-interval", "-maintain-interval", type=parse_duration,
                       default=timedelta(seconds=30), help="how often to prune retired roots (default 30s)")
    serve.add_argument("--no-register", "-no-register", action="store_true",
                       help="do not register as Consul service weft-ca")

    roots = sub.add_parser("roots", help="print the trust bundle (Consul's /v1/connect/ca/roots shape)")
    common(roots)

    rotate = sub.add_parser("rotate", help="make a new root, cross-signed by the current one (operator:write)")
    common(rotate)
    rotate.add_argument("--ca-addr", "-ca-addr", default="", help="CA address (default: find weft-ca in Consul)")
    rotate.add_argument("--token", "-token", default=None, help="ACL token (default $CONSUL_HTTP_TOKEN)")

    sign = sub.add_parser("sign", help="get a certificate for a service (for VMs and debugging)")
    common(sign)
    sign.add_argument("--service", "-service", required=True, help="service name")
    sign.add_argument("--out", "-out", required=True, help="directory for key.pem, cert.pem, chain.pem, roots.pem")
    sign.add_argument("--ttl", "-ttl", type=parse_duration, default=None, help="leaf lifetime (default: the CA's)")
    sign.add_argument("--token", "-token", default=None,
                      help="ACL token with service:write on the service and key:read on weft/ca/roots "
                           "(default $CONSUL_HTTP_TOKEN)")
    sign.add_argument("--ca-addr", "-ca-addr", default="", help="CA address (default: find weft-ca in Consul)")
    sign.add_argument("--datacenter", "-datacenter", default="", help="default: the agent's datacenter")


def run(args: argparse.Namespace) -> int:
    logsetup.configure(args.log_level)
    if args.ca_command == "serve":
        return _serve(args)
    if args.ca_command == "roots":
        return asyncio.run(_roots())
    if args.ca_command == "rotate":
        return asyncio.run(_rotate(args))
    if args.ca_command == "sign":
        return asyncio.run(_sign(args))
    print(f"weft ca: unknown subcommand {args.ca_command!r}", file=sys.stderr)
    return 2


# -- serve -----------------------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> CAConfig:
    leaf: timedelta = args.leaf_ttl
    max_leaf: timedelta = args.max_leaf_ttl or max(DEFAULT_MAX_LEAF_TTL, leaf)
    return CAConfig(root_ttl=args.root_ttl, intermediate_ttl=args.intermediate_ttl, leaf_ttl=leaf,
                    max_leaf_ttl=max_leaf, min_leaf_ttl=MIN_LEAF_TTL)


def _serve(args: argparse.Namespace) -> int:
    try:
        kek = load_kek(args.kek_file, args.dev)
        config = _config(args)
    except (KekError, ValueError) as exc:
        print(f"weft ca serve: {exc}", file=sys.stderr)
        return 2
    if kek.insecure:
        log.warning("ca.dev_kek", message="no KEK given: -dev uses a built-in, publicly known KEK; "
                                         "the CA's keys in Consul KV are NOT protected")

    async def main(stop: asyncio.Event) -> int:
        async with ConsulClient.from_env() as client:
            dc = await _datacenter(client, args.datacenter)
            store = CAStore(ConsulKV(client), kek)
            service = CAService(store, TokenAuthorizer(ConsulAcl(client), dc), config, datacenter=dc,
                                own_token=_own_token(client))
            advertise = args.advertise or args.listen
            registry = None if args.no_register else ConsulRegistry(client)
            sessions = cast(ConsulClient, SessionTiedToChecks(client, registry))
            lock = TermLock(lambda: LeaderLock(sessions, KEY_LEADER, ttl=_fmt(args.lock_ttl),
                                               lock_delay=_fmt(args.lock_delay), value=advertise.encode(),
                                               session_name="weft-ca"))
            options = ServeOptions(listen=args.listen, advertise=args.advertise,
                                   check_ttl_s=args.check_ttl.total_seconds(),
                                   maintain_interval_s=args.maintain_interval.total_seconds())
            server = CAServer(service, lock, registry, options)
            while not stop.is_set():
                try:
                    if not await server.start(stop):
                        return 0
                    break
                except (KekError, CAError, IdentityError) as exc:
                    log.error("ca.fatal", error=str(exc))
                    print(f"weft ca serve: {exc}", file=sys.stderr)
                    return 1
                except (ConsulError, OSError) as exc:
                    log.warning("ca.consul_unavailable", error=str(exc), retry_in=1.0)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 1.0)
            print(f"weft ca: listening on {server.address} (trust domain {service.trust_domain})", flush=True)
            try:
                await stop.wait()
            finally:
                await server.stop()
            return 0

    return runner.run(main)


# -- roots, rotate, sign ------------------------------------------------------------------------------------


async def _read_bundle(client: ConsulClient) -> TrustBundle | None:
    return await read_roots(ConsulKV(client))


async def _roots() -> int:
    async with _client(None, "weft ca roots") as client:
        try:
            bundle = await _read_bundle(client)
        except ConsulError as exc:
            print(f"weft ca roots: {exc}", file=sys.stderr)
            return 1
    if bundle is None:
        print("weft ca roots: no trust bundle in Consul KV weft/ca/roots (has a CA ever run?)", file=sys.stderr)
        return 1
    print(bundle.to_json())
    return 0


def _client(token: str | None, prog: str) -> ConsulClient:
    """A Consul client for an operator command: CONSUL_HTTP_ADDR, else a running weft dev's agent
    (`devmesh.state`); ``--token`` replaces CONSUL_HTTP_TOKEN, as Consul's CLI does."""
    env = dict(consul_for_cli(prog).env)
    if token is not None:
        env["CONSUL_HTTP_TOKEN"] = token
        env.pop("CONSUL_HTTP_TOKEN_FILE", None)
    return ConsulClient.from_env(env)


def _resolver(client: ConsulClient, ca_addr: str) -> Resolver:
    return fixed_resolver(ca_addr) if ca_addr else consul_resolver(client)


async def _rotate(args: argparse.Namespace) -> int:
    async with _client(args.token, "weft ca rotate") as client:
        token = args.token if args.token is not None else _own_token(client)
        ca = GrpcCA(_resolver(client, args.ca_addr))
        try:
            bundle = await _read_bundle(client)
            if bundle is None:
                print("weft ca rotate: no trust bundle in Consul KV; is a CA running?", file=sys.stderr)
                return 1
            new_id, after = await ca.rotate(token, bundle)
        except (CARefused, CAUnavailable, ConsulError) as exc:
            print(f"weft ca rotate: {exc}", file=sys.stderr)
            return 1
        finally:
            await ca.close()
    print(json.dumps({"NewRootID": new_id, "ActiveRootID": after.active_root_id,
                      "Roots": [{"ID": r.id, "Active": r.active, "NotAfter": r.not_after.isoformat()}
                                for r in after.roots]}, indent=2))
    return 0


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


async def _sign(args: argparse.Namespace) -> int:
    try:
        validate_service_name(args.service)
    except IdentityError as exc:
        print(f"weft ca sign: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    async with _client(args.token, "weft ca sign") as client:
        token = args.token if args.token is not None else _own_token(client)
        ca = GrpcCA(_resolver(client, args.ca_addr))
        try:
            bundle = await _read_bundle(client)
            if bundle is None:
                print("weft ca sign: no trust bundle in Consul KV; is a CA running?", file=sys.stderr)
                return 1
            dc = await _datacenter(client, args.datacenter)
            identity = SpiffeId.for_service(bundle.trust_domain, args.service, datacenter=dc)
            key = new_key()
            ttl = int(args.ttl.total_seconds()) if args.ttl else 0
            result = await ca.sign(make_csr(key, identity), token=token, current_chain=b"", proof=b"",
                                   ttl_seconds=ttl, bundle=bundle)
        except (CARefused, CAUnavailable, ConsulError) as exc:
            print(f"weft ca sign: {exc}", file=sys.stderr)
            return 1
        finally:
            await ca.close()
    roots = result.bundle or bundle
    _write_files(out, key_pem(key), result.cert_pem, "".join(result.chain_pem), roots.roots_pem)
    print(f"wrote {out}/key.pem (0600), cert.pem, chain.pem, roots.pem for {identity}")
    return 0


def _write_files(out: Path, key: bytes, cert: str, chain: str, roots: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_private(out / "key.pem", key)
    (out / "cert.pem").write_text(cert)
    (out / "chain.pem").write_text(chain)
    (out / "roots.pem").write_text(roots)
