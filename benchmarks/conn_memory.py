"""What 1,000 idle or half-open connections cost a sidecar's public port, in RSS (VmRSS of /proc/<pid>/status).

    .venv/bin/python -m benchmarks.conn_memory [--connections 1000]

For each scenario a fresh sidecar process (the public port of ``sidecar.inbound.Inbound`` with the
test PKI, a pass-through intention, and the echo app behind it in another process) is started on
loopback; its RSS is read, N connections are opened and held, and its RSS is read again:

- ``tcp_no_bytes``: TCP connections that never send a byte;
- ``client_hello``: connections that send a TLS ClientHello and never finish the handshake;
- ``idle_passthrough``: finished mTLS handshakes (ALPN h2) that send the HTTP/2 preface and SETTINGS,
  then nothing: connections passed through to the app;
- ``idle_outbound_tcp``: connections to a TCP upstream's outbound listener that send a few bytes,
  get them echoed and stay idle. The outbound listener and the upstream's public port run in the same
  process (the TCP echo app in another), so the figure covers both sidecars' side of each connection.

The sidecar runs with ``max_pending_handshakes`` above N so that every half-open connection is held;
``client_hello_default_limits`` repeats ``client_hello`` with the default (256), which drops the
oldest unfinished handshakes past it. Everything runs on
127.0.0.1 and is stopped at the end. (``serve`` is the sidecar side, started by the driver.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import ssl
import sys
import tempfile
import time
from pathlib import Path

from tests.support import Proc, free_port, wait_for

PY = sys.executable
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def vm_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no VmRSS for pid {pid}")


# -- the sidecar side --------------------------------------------------------------------------------

async def _serve(app_port: int, workdir: Path, pending: int, connections: int, outbound_tcp: bool) -> None:
    from sidecar.inbound import Inbound
    from sidecar.limits import Limits
    from sidecar.outbound import Outbound
    from sidecar.telemetry import Telemetry
    from sidecar.tls import TlsContexts
    from tests.integration.sidecar.harness import Authority, Holder, snapshot, table

    ca = Authority.root()
    limits = Limits(max_pending_handshakes=pending, max_connections=connections)
    protocol = "tcp" if outbound_tcp else "grpc"
    holder = Holder(snapshot("api", ca.leaf("api"), protocol=protocol, app_port=app_port,
                             policy=table("api", ("web", "allow"))))
    inbound = Inbound(holder, Telemetry(), TlsContexts(), limits=limits)
    port = await inbound.start("127.0.0.1", 0)
    if outbound_tcp:
        local = free_port()
        source = Holder(snapshot("web", ca.leaf("web"), upstreams={"api": (local, [port], "tcp")},
                                 policy=table("web")))
        await Outbound(source, Telemetry(), TlsContexts(), limits=limits).start()
        port = local
    web = ca.leaf("web")
    (workdir / "roots.pem").write_text(web.roots_pem)
    (workdir / "chain.pem").write_text(web.full_chain_pem)
    (workdir / "key.pem").write_text(web.key_pem)
    (workdir / "port").write_text(str(port))
    await asyncio.Event().wait()


# -- the driver ------------------------------------------------------------------------------------

def _client_context(workdir: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=(workdir / "roots.pem").read_text())
    ctx.load_cert_chain(str(workdir / "chain.pem"), str(workdir / "key.pem"))
    ctx.set_alpn_protocols(["h2"])
    return ctx


async def _open(scenario: str, port: int, n: int, workdir: Path) -> list[asyncio.StreamWriter]:
    from sidecar.tls import expected_server_name
    from tests.unit.sidecar.pki import TD

    ctx = _client_context(workdir)
    name = expected_server_name("api", TD)
    writers: list[asyncio.StreamWriter] = []
    limit = asyncio.Semaphore(32)

    async def one() -> None:
        async with limit:
            if scenario == "idle_outbound_tcp":
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"ping")
                await reader.readexactly(4)
            elif scenario == "idle_passthrough":
                _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=name)
                writer.write(H2_PREFACE)
                await writer.drain()
            else:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                if scenario == "client_hello":
                    sslobj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=name)
                    try:
                        sslobj.do_handshake()
                    except ssl.SSLWantReadError:
                        pass
                    writer.write(out.read())
                    await writer.drain()
            writers.append(writer)

    await asyncio.gather(*(one() for _ in range(n)))
    return writers


def run_scenario(scenario: str, n: int, app_port: int, pending: int) -> dict[str, float]:
    """One fresh sidecar process; ``app_port`` is the gRPC echo app, or the TCP one for ``idle_outbound_tcp``."""
    with tempfile.TemporaryDirectory(prefix="weft-connmem-") as tmp:
        workdir = Path(tmp)
        sidecar = Proc([PY, "-m", "benchmarks.conn_memory", "serve", "--app-port", str(app_port),
                        "--dir", tmp, "--pending", str(pending), "--max-connections", str(2 * n + 100),
                        *(["--outbound-tcp"] if scenario == "idle_outbound_tcp" else [])])
        try:
            wait_for(lambda: (workdir / "port").exists() or not sidecar.alive(), timeout=60, interval=0.1,
                     what="the sidecar")
            if not sidecar.alive():
                raise RuntimeError(sidecar.output()[-2000:])
            port = int((workdir / "port").read_text())

            async def drive() -> dict[str, float]:
                # one warm-up connection of the same kind, so that one-time allocations are not counted
                for w in await _open(scenario, port, 1, workdir):
                    w.close()
                await asyncio.sleep(1.0)
                before = vm_rss_mb(sidecar.pid)
                t0 = time.monotonic()
                writers = await _open(scenario, port, n, workdir)
                opened = time.monotonic() - t0
                await asyncio.sleep(2.0)
                after = vm_rss_mb(sidecar.pid)
                for w in writers:
                    w.close()
                return {"connections": len(writers), "rss_mb_before": round(before, 1), "rss_mb_after": round(after, 1),
                        "rss_mb_added": round(after - before, 1), "seconds_to_open": round(opened, 2)}

            import uvloop

            return uvloop.run(drive())
        finally:
            sidecar.stop()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conn_memory", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve")
    serve.add_argument("--app-port", type=int, required=True)
    serve.add_argument("--dir", required=True)
    serve.add_argument("--pending", type=int, required=True)
    serve.add_argument("--max-connections", type=int, required=True)
    serve.add_argument("--outbound-tcp", action="store_true")
    parser.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args(argv)
    _raise_fd_limit()
    if args.command == "serve":
        import uvloop

        uvloop.run(_serve(args.app_port, Path(args.dir), args.pending, args.max_connections, args.outbound_tcp))
        return 0
    from sidecar.limits import Limits

    app_port, tcp_port = free_port(), free_port()
    app = Proc([PY, "-m", "tests.apps.echo.server", "--port", str(app_port)])
    tcp_app = Proc([PY, "-m", "tests.apps.tcpecho.server", "--port", str(tcp_port)])
    try:
        results = {s: run_scenario(s, args.connections, app_port, args.connections + 100)
                   for s in ("tcp_no_bytes", "client_hello", "idle_passthrough")}
        results["idle_outbound_tcp"] = run_scenario("idle_outbound_tcp", args.connections, tcp_port,
                                                    args.connections + 100)
        # with the default bound on unfinished handshakes, the oldest half-open connections are dropped
        results["client_hello_default_limits"] = run_scenario("client_hello", args.connections, app_port,
                                                              Limits().max_pending_handshakes)
    finally:
        app.stop()
        tcp_app.stop()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
