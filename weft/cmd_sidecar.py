"""`weft sidecar --sidecar-for SERVICE_ID [--admin-port N] ...`: run a sidecar proxy next to a service.

This module only turns flags into a `sidecar.config.SidecarConfig` (`config_of`) and runs
`sidecar.app.Sidecar` with it; what a sidecar does at start-up, while running and on SIGTERM/SIGINT
(drain, then deregister, exit 0) is described and assembled in `sidecar/app.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import TYPE_CHECKING

from weft.durations import parse_duration_or_seconds

if TYPE_CHECKING:
    from sidecar.config import SidecarConfig
    from sidecar.limits import Limits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--sidecar-for", "-sidecar-for", required=True, metavar="SERVICE_ID",
      help="ID of the local service this sidecar fronts (as registered with the local Consul agent)")
    a("--admin-port", "-admin-port", type=int, default=19000, help="admin API port (/ready /live /metrics /config); "
      "0 picks a free port")
    a("--admin-bind", "-admin-bind", default="127.0.0.1", help="admin API bind address (default loopback)")
    a("--ca-addr", "-ca-addr", default="", help="CA address host:port (default: Consul service weft-ca)")
    a("--public-port", "-public-port", type=int, default=0,
      help="public mTLS port when no <id>-sidecar-proxy registration gives one (default: free port in 21000-21255)")
    a("--bind", "-bind", default="", help="public listener bind address (default: the proxy's address, else 0.0.0.0)")
    a("--upstream", "-upstream", action="append", default=[], metavar="NAME:PORT",
      help="an upstream when no proxy registration declares them (repeatable)")
    a("--token", "-token", default=None, help="Consul ACL token for the CA (default CONSUL_HTTP_TOKEN)")
    a("--ttl", "-ttl", default="10s", help="TTL of the sidecar's health check (kept passing while ready)")
    a("--deregister-after", "-deregister-after", default="1m",
      help="DeregisterCriticalServiceAfter of the TTL check (Consul's minimum is 1m)")
    a("--drain-timeout", "-drain-timeout", type=float, default=10.0,
      help="seconds in-flight calls get to finish on SIGTERM")
    a("--max-message-bytes", "-max-message-bytes", type=int, default=4 * 1024 * 1024,
      help="largest gRPC message proxied, both directions")
    a("--access-log-rate", "-access-log-rate", type=float, default=20.0,
      help="access lines per second logged in full before sampling starts")
    a("--access-log-sample", "-access-log-sample", type=float, default=0.01,
      help="fraction of calls logged above the rate (0..1)")
    a("--descriptor-set", "-descriptor-set", default="",
      help="FileDescriptorSet of the app (protoc --descriptor_set_out) when it offers no reflection")
    a("--no-reflection", "-no-reflection", action="store_true", help="do not ask the app for its methods")
    a("--no-passthrough", "-no-passthrough", action="store_true",
      help="authorize every call on the full path even for L4-allowed callers (slower; per-call inbound metrics)")
    a("--leaf-ttl", "-leaf-ttl", type=parse_duration_or_seconds, default=None,
      help="leaf certificate lifetime to ask the CA for, as `weft ca serve --leaf-ttl` takes it (72h, 90m; a plain "
           "number is still read as seconds, the older form) (default: the CA's)")
    a("--watch-wait", "-watch-wait", type=float, default=60.0, help="blocking query wait, seconds")
    a("--log-level", "-log-level", default=os.environ.get("WEFT_LOG_LEVEL", "info"),
      help="debug, info, warn or error")
    from sidecar.limits import described, flag_name

    group = parser.add_argument_group("limits and hardening", "what one peer may make this sidecar buffer or do "
                                      "(see the README's \"Limits and hardening\")")
    for name, kind, default, text in described():
        group.add_argument(flag_name(name), dest=f"limit_{name}", type=kind, default=default,
                           metavar="SECONDS" if kind is float else "N",
                           help=f"{text} (default: {default})")


def limits_of(args: argparse.Namespace) -> Limits:
    """The sidecar's limits from its flags (ValueError naming the flag when one is out of range)."""
    from sidecar.limits import Limits, described

    return Limits(**{name: getattr(args, f"limit_{name}") for name, _, _, _ in described()})


def config_of(args: argparse.Namespace) -> SidecarConfig:
    """The sidecar's configuration from its parsed flags; ValueError (the message names the flag) when one
    is out of range or the descriptor set cannot be read."""
    from sidecar.config import SidecarConfig, parse_upstream

    descriptor_methods = None
    if args.descriptor_set:
        from sidecar.methods import methods_of_descriptor_set

        try:
            with open(args.descriptor_set, "rb") as f:
                descriptor_methods = methods_of_descriptor_set(f.read())
        except (OSError, ValueError) as exc:
            raise ValueError(f"--descriptor-set {args.descriptor_set}: {exc}") from None
    return SidecarConfig(
        service_id=args.sidecar_for, admin_port=args.admin_port, admin_bind=args.admin_bind, ca_addr=args.ca_addr,
        public_port=args.public_port, bind=args.bind, upstreams=tuple(parse_upstream(u) for u in args.upstream),
        token=args.token, ttl=args.ttl, deregister_after=args.deregister_after, drain_timeout=args.drain_timeout,
        max_message_bytes=args.max_message_bytes, access_log_rate=args.access_log_rate,
        access_log_sample=args.access_log_sample, descriptor_methods=descriptor_methods,
        reflect=not args.no_reflection, passthrough=not args.no_passthrough,
        leaf_ttl=args.leaf_ttl or None, watch_wait=args.watch_wait, limits=limits_of(args))


def run(args: argparse.Namespace) -> int:
    from sidecar import app

    app.tune_process()  # before any thread starts (see its docstring)
    from weft import logsetup, runner

    try:
        logsetup.configure(args.log_level)
        config = config_of(args)
    except ValueError as exc:
        print(f"weft sidecar: {exc}", file=sys.stderr)
        return 2

    async def main(stop: asyncio.Event) -> int:
        try:
            return await app.Sidecar(config).run(stop)
        except app.StartError as exc:
            print(f"weft sidecar: {exc}", file=sys.stderr)
            return exc.exit_code

    return runner.run(main)
