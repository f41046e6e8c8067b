"""The HAProxy mTLS pair used as the baseline: installed from Debian's packages when missing.

client side: plaintext h2 in (`proto h2`) -> mTLS h2 out (`alpn h2`, server certificate verified)
server side: mTLS in (`alpn h2`, client certificate required) -> h2c to the app
plus, on the same two processes, a TCP pair (plaintext in -> mTLS -> plaintext TCP to the app).
Each HAProxy runs one thread (`nbthread 1`), like one Python sidecar process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from benchmarks.pki import Files
from tests.support import Proc, free_port, wait_for


def ensure_installed() -> str | None:
    """The haproxy binary, installing it with apt-get when missing and possible; None if unavailable."""
    found = shutil.which("haproxy") or (Path("/usr/sbin/haproxy").exists() and "/usr/sbin/haproxy") or None
    if found:
        return str(found)
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "haproxy"], env=env, check=True, capture_output=True,
                       timeout=300)
    except (subprocess.SubprocessError, OSError):
        return None
    return shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)


def version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10).stdout
    return out.splitlines()[0] if out else "unknown"


_GLOBAL = """global
    nbthread 1
    maxconn 4096
    tune.ssl.default-dh-param 2048

defaults
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout tunnel 120s
"""


def client_config(grpc_in: int, tcp_in: int, grpc_out: int, tcp_out: int, pki: Files) -> str:
    verify = (f"ssl verify required ca-file {pki.ca} crt {pki.client} verifyhost {pki.server_name}"
              f" sni str({pki.server_name})")
    return _GLOBAL + f"""
frontend grpc_in
    mode http
    bind 127.0.0.1:{grpc_in} proto h2
    default_backend grpc_out

backend grpc_out
    mode http
    server upstream 127.0.0.1:{grpc_out} {verify} alpn h2

frontend tcp_in
    mode tcp
    bind 127.0.0.1:{tcp_in}
    default_backend tcp_out

backend tcp_out
    mode tcp
    server upstream 127.0.0.1:{tcp_out} {verify}
"""


def server_config(grpc_in: int, tcp_in: int, grpc_app: int, tcp_app: int, pki: Files) -> str:
    tls = f"ssl crt {pki.server} ca-file {pki.ca} verify required"
    return _GLOBAL + f"""
frontend grpc_in
    mode http
    bind 127.0.0.1:{grpc_in} {tls} alpn h2
    default_backend grpc_app

backend grpc_app
    mode http
    server app 127.0.0.1:{grpc_app} proto h2

frontend tcp_in
    mode tcp
    bind 127.0.0.1:{tcp_in} {tls}
    default_backend tcp_app

backend tcp_app
    mode tcp
    server app 127.0.0.1:{tcp_app}
"""


@dataclass
class Pair:
    client: Proc
    server: Proc
    grpc_port: int  # where the load generator sends gRPC (client side's plaintext h2 listener)
    tcp_port: int   # where it sends TCP

    @property
    def pids(self) -> list[int]:
        return [self.client.pid, self.server.pid]

    def stop(self) -> None:
        self.client.stop()
        self.server.stop()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_pair(binary: str, workdir: Path, pki: Files, grpc_app: int, tcp_app: int) -> Pair:
    c_grpc, c_tcp, s_grpc, s_tcp = (free_port() for _ in range(4))
    (workdir / "haproxy-server.cfg").write_text(server_config(s_grpc, s_tcp, grpc_app, tcp_app, pki))
    (workdir / "haproxy-client.cfg").write_text(client_config(c_grpc, c_tcp, s_grpc, s_tcp, pki))
    for name in ("server", "client"):
        check = subprocess.run([binary, "-c", "-q", "-f", str(workdir / f"haproxy-{name}.cfg")],
                               capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy {name} config rejected: {check.stdout}{check.stderr}")
    server = Proc([binary, "-db", "-f", str(workdir / "haproxy-server.cfg")], log=workdir / "haproxy-server.log")
    client = Proc([binary, "-db", "-f", str(workdir / "haproxy-client.cfg")], log=workdir / "haproxy-client.log")
    pair = Pair(client, server, c_grpc, c_tcp)
    try:
        wait_for(lambda: all(_listening(p) for p in (c_grpc, c_tcp, s_grpc, s_tcp)), timeout=15, what="haproxy")
    except TimeoutError:
        out = server.output() + client.output()
        pair.stop()
        raise RuntimeError("haproxy did not start:\n" + out) from None
    return pair
