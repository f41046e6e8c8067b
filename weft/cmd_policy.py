"""`weft policy serve`: the policy service (see `policies.server`).

    weft policy serve [-default-policy deny|allow] [-grpc-addr 127.0.0.1:8507] [-lock-ttl 15s]
                      [-lock-delay 1s] [-service-id ID] [-no-register] [-log-level info]

Reads `CONSUL_HTTP_ADDR` / `CONSUL_HTTP_TOKEN` like Consul's tools. Every replica watches and
compiles and answers the gRPC API; the replica holding the lock on `weft/policy/leader` writes the
compiled tables. It registers itself as service `weft-policy` (port = the gRPC port) with a TTL
check whose note says `leader` or `standby`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys

import structlog

from catalog.client import ConsulClient, ConsulError
from catalog.lock import LeaderLock
from catalog.models import parse_duration
from catalog.registration import Registered, service_registration
from policies.model import LEADER_KEY, SERVICE_NAME
from policies.server import PolicyService, start_grpc
from weft import logsetup, runner

DEFAULT_GRPC_ADDR = "127.0.0.1:8507"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    serve = sub.add_parser("serve", help="run the policy service")
    serve.add_argument("-default-policy", "--default-policy", choices=("deny", "allow"), default="deny",
                       help="decision when no intention matches, carried in every compiled table (default deny)")
    serve.add_argument("-grpc-addr", "--grpc-addr", default=DEFAULT_GRPC_ADDR,
                       help=f"host:port of the gRPC API weft.policy.v1 (default {DEFAULT_GRPC_ADDR})")
    serve.add_argument("-advertise-addr", "--advertise-addr", default="",
                       help="address registered in Consul (default: the gRPC host; the agent's address when "
                            "listening on all interfaces)")
    serve.add_argument("-lock-ttl", "--lock-ttl", default="15s",
                       help="TTL of the leader session (10s..24h; a dead leader is replaced within ~2x this)")
    serve.add_argument("-lock-delay", "--lock-delay", default="1s",
                       help="Consul lock-delay after a leader's session is invalidated (default 1s)")
    serve.add_argument("-wait", "--wait", default="30s", help="blocking query wait (default 30s)")
    serve.add_argument("-service-id", "--service-id", default="",
                       help="service ID to register (default weft-policy-<hostname>-<port>)")
    serve.add_argument("-no-register", "--no-register", action="store_true",
                       help="do not register the weft-policy service in Consul")
    serve.add_argument("-standby-only", "--standby-only", action="store_true",
                       help="never campaign for leadership: compile and answer Check, never write")
    serve.add_argument("-sources", "--sources", default="kv,native",
                       help="intention sources to watch: kv, native or both (default kv,native). Until every "
                            "watched source has answered once, nothing is published")
    serve.add_argument("-log-level", "--log-level", default="info", help="debug, info, warn or error")


async def _serve(args: argparse.Namespace, stop: asyncio.Event) -> int:
    log = structlog.get_logger("weft.policy")
    lock_ttl = parse_duration(args.lock_ttl, "-lock-ttl")
    lock_delay = parse_duration(args.lock_delay, "-lock-delay")
    wait = parse_duration(args.wait, "-wait")
    async with ConsulClient.from_env() as consul:
        service_id_holder: dict[str, str] = {}
        registered: Registered | None = None

        def on_leadership(leader: bool) -> None:
            if registered is not None and registered.keeper is not None:
                registered.keeper.set_status("passing", "leader" if leader else "standby")

        def make_lock() -> LeaderLock:
            return LeaderLock(consul, LEADER_KEY, ttl=lock_ttl, lock_delay=lock_delay,
                              value=service_id_holder.get("id", ""), session_name="weft-policy leader")

        service = PolicyService(consul, default_policy=args.default_policy, wait=wait,
                                lock_factory=None if args.standby_only else make_lock, on_leadership=on_leadership,
                                sources=[x.strip() for x in args.sources.split(",") if x.strip()])
        server, port = await start_grpc(service, args.grpc_addr)
        host = args.grpc_addr.rsplit(":", 1)[0] or "127.0.0.1"
        service_id = args.service_id or f"{SERVICE_NAME}-{socket.gethostname()}-{port}"
        service_id_holder["id"] = service_id
        log.info("policy service listening", grpc=f"{host}:{port}", default_policy=args.default_policy,
                 consul=consul.address, service_id=service_id, pid=os.getpid())
        try:
            if args.no_register:
                await service.run(stop)
            else:
                advertise = args.advertise_addr or ("" if host in ("0.0.0.0", "[::]", "::") else host)
                reg = service_registration(name=SERVICE_NAME, port=port, service_id=service_id,
                                           address=advertise, ttl="15s",
                                           meta={"default_policy": args.default_policy})
                registered = Registered(consul, reg, note="standby")
                try:
                    await registered.register()
                except ConsulError as exc:  # publishing policy matters more than being discoverable
                    log.error("could not register the weft-policy service; running unregistered",
                              error=str(exc))
                    registered = None
                    await service.run(stop)
                else:
                    async with registered:
                        await service.run(stop)
        finally:
            await server.stop(grace=1)
    return 0


def run(args: argparse.Namespace) -> int:
    logsetup.configure(args.log_level)
    try:
        return runner.run(lambda stop: _serve(args, stop))
    except (ValueError, OSError) as exc:
        print(f"weft policy: {exc}", file=sys.stderr)
        return 1
