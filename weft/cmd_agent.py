"""`weft agent -dev`: the embedded Consul-compatible dev agent.

Flags follow Consul's spelling (`-http-port 8500`, also `--http-port` and `-http-port=8500`).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

from weft import logsetup, runner


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs: object) -> None:
    parser.add_argument(f"-{name}", f"--{name}", dest=name.replace("-", "_"), **kwargs)  # type: ignore[arg-type]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "dev", action="store_true", help="development mode (the only mode; accepted for Consul parity)")
    _flag(parser, "ui", action="store_true", help="accepted for Consul parity; the dev agent serves no web UI")
    _flag(parser, "http-port", type=int, default=8500, help="HTTP API port (default 8500; 0 picks a free port)")
    _flag(parser, "client", default="127.0.0.1", help="address the HTTP API binds to (default 127.0.0.1)")
    _flag(parser, "node", default=socket.gethostname(), help="node name (default: the host name)")
    _flag(parser, "datacenter", default="dc1", help="datacenter name (default dc1)")
    _flag(parser, "data-dir", default=None,
          help="keep state in this directory across restarts (default: memory only)")
    _flag(parser, "log-level", default="info", help="trace, debug, info, warn or error (default info)")
    _flag(parser, "acl-enabled", action="store_true", help="enable ACLs (default policy deny)")
    _flag(parser, "acl-default-policy", default="deny", choices=("allow", "deny"),
          help="ACL default policy when ACLs are enabled (default deny)")
    _flag(parser, "acl-initial-management", default=None, metavar="TOKEN",
          help="secret of the initial management token (with -acl-enabled)")
    _flag(parser, "session-ttl-min", default="10s",
          help="smallest session TTL accepted, as Consul's session_ttl_min (default 10s)")
    _flag(parser, "check-reap-interval", default="30s",
          help="how often critical services are considered for DeregisterCriticalServiceAfter, as Consul's "
               "check_reap_interval (default 30s)")
    _flag(parser, "enable-script-checks", action="store_true",
          help="run script checks (Args) registered through the HTTP API, as Consul's enable_script_checks "
               "(off by default: anyone who can reach the API could run commands)")
    _flag(parser, "enable-local-script-checks", action="store_true",
          help="run script checks from local sources only, as Consul's enable_local_script_checks (the dev "
               "agent reads no configuration files, so HTTP API registrations stay refused)")
    _flag(parser, "prometheus-retention-time", default="1m",
          help="as Consul's telemetry.prometheus_retention_time: 0 turns /v1/agent/metrics?format=prometheus "
               "off (415, Consul's default); the dev agent keeps it on (default 1m)")
    _flag(parser, "check-deregister-interval-min", default="1m",
          help="smallest DeregisterCriticalServiceAfter honoured, as Consul's check_deregister_interval_min "
               "(default 1m)")


def run(args: argparse.Namespace) -> int:
    level = "debug" if args.log_level == "trace" else args.log_level
    try:
        logsetup.configure(level)
    except ValueError as exc:
        print(f"weft agent: {exc}", file=sys.stderr)
        return 2
    from devagent.agent import AgentConfig
    from devagent.codec import DecodeError, parse_duration
    from devagent.server import serve

    try:
        ttl_min = parse_duration(args.session_ttl_min)
    except DecodeError as exc:
        print(f"weft agent: -session-ttl-min: {exc}", file=sys.stderr)
        return 2
    try:
        reap_interval = parse_duration(args.check_reap_interval)
        deregister_min = parse_duration(args.check_deregister_interval_min)
        prometheus_retention = parse_duration(args.prometheus_retention_time)
    except DecodeError as exc:
        print(f"weft agent: duration flag: {exc}", file=sys.stderr)
        return 2
    if reap_interval <= 0:
        print("weft agent: -check-reap-interval must be > 0", file=sys.stderr)
        return 2
    if args.acl_initial_management and not args.acl_enabled:
        print("weft agent: -acl-initial-management needs -acl-enabled", file=sys.stderr)
        return 2
    config = AgentConfig(
        node_name=args.node,
        datacenter=args.datacenter,
        client_addr=args.client,
        http_port=args.http_port,
        data_dir=args.data_dir,
        log_level=level,
        acl_enabled=args.acl_enabled,
        acl_default_policy=args.acl_default_policy,
        acl_initial_management=args.acl_initial_management,
        session_ttl_min_ns=ttl_min,
        check_reap_interval_ns=reap_interval,
        check_deregister_interval_min_ns=deregister_min,
        enable_script_checks=args.enable_script_checks,
        enable_local_script_checks=args.enable_local_script_checks,
        prometheus_retention_ns=prometheus_retention,
    )

    def ready(port: int) -> None:
        print(f"==> weft dev agent (Consul API {_version()}) running: node {config.node_name!r}, "
              f"datacenter {config.datacenter!r}, HTTP on http://{_host(config.client_addr)}:{port}", flush=True)

    async def main(stop: asyncio.Event) -> int:
        try:
            return await serve(config, stop, ready)
        except OSError as exc:
            print(f"weft agent: cannot listen on {config.client_addr}:{config.http_port}: {exc}", file=sys.stderr)
            return 1

    return runner.run(main)


def _host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


def _version() -> str:
    from devagent.agent import CONSUL_VERSION

    return CONSUL_VERSION
