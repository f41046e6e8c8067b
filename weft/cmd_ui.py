"""`weft ui [-http-addr 127.0.0.1:8580]`: the web dashboard of the mesh (see `weft.ui.server`).

Topology with live golden metrics per edge (a failing edge in red), services with their instances,
health, sidecars, certificate expiry and policy version, intentions per destination with their origin
and a "would this call be allowed?" form, and the live tap of a chosen service. It reads Consul and
the sidecars' admin APIs, holds no private key, and binds to loopback unless told otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from devmesh.state import consul_for_cli

DEFAULT_ADDR = "127.0.0.1:8580"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-http-addr", "--http-addr", default=DEFAULT_ADDR, metavar="HOST:PORT",
                        help="where the dashboard listens (loopback unless told otherwise)")
    parser.add_argument("-interval", "--interval", type=float, default=2.0,
                        help="seconds between refreshes of metrics and state")
    parser.add_argument("-state-dir", "--state-dir", default=None,
                        help="a running `weft dev`'s state dir (where to find Consul and admin URLs)")


def parse_addr(raw: str) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"-http-addr {raw!r}: expected HOST:PORT")
    return (host.strip("[]") or "127.0.0.1"), int(port)


async def _main(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from aiohttp import web

    from weft.ui.server import Dashboard, make_app

    host, port = parse_addr(args.http_addr)
    consul = consul_for_cli("weft ui", args.state_dir)
    runner = web.AppRunner(make_app(Dashboard(consul, interval=args.interval), host), access_log=None,
                           handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        print(f"weft ui: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    bound = runner.addresses[0][1] if runner.addresses else port
    shown = f"[{host}]" if ":" in host else host
    print(f"weft ui: dashboard at http://{shown}:{bound}/", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        parse_addr(args.http_addr)
    except ValueError as exc:
        print(f"weft ui: {exc}", file=sys.stderr)
        return 2
    if args.interval <= 0:
        print("weft ui: -interval must be positive", file=sys.stderr)
        return 2
    from weft import runner

    return runner.run(lambda stop: _main(args, stop))
