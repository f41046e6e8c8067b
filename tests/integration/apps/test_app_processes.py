"""The three apps as the processes tests and benchmarks start: `python -m tests.apps.<app> --port 0`."""

from __future__ import annotations

import json
import socket
import sys
import urllib.request

import grpc
import pytest

from tests.apps.echo import echo_pb2, echo_pb2_grpc
from tests.support import Proc, wait_for

pytestmark = pytest.mark.integration


def _port(proc: Proc) -> int:
    found: list[int] = []

    def listening() -> bool:
        for line in proc.output().splitlines():
            if line.startswith("{") and '"listening"' in line:
                found.append(int(json.loads(line)["port"]))
                return True
        if not proc.alive():
            raise RuntimeError(proc.output())
        return False

    wait_for(listening, timeout=30, what="listening line")
    return found[0]


def test_apps_run_as_processes() -> None:
    procs = [Proc([sys.executable, "-m", "tests.apps.echo", "--port", "0", "--name", "proc-echo"]),
             Proc([sys.executable, "-m", "tests.apps.httpecho", "--port", "0", "--name", "proc-http"]),
             Proc([sys.executable, "-m", "tests.apps.tcpecho", "--port", "0", "--banner", "proc-tcp"])]
    try:
        grpc_port, http_port, tcp_port = (_port(p) for p in procs)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
            assert stub.Unary(echo_pb2.EchoRequest(text="hi"), timeout=10).instance == "proc-echo"
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/x", timeout=10) as resp:
            assert json.loads(resp.read())["instance"] == "proc-http"
        with socket.create_connection(("127.0.0.1", tcp_port), timeout=10) as s:
            s.sendall(b"ping")
            data = b""
            while len(data) < len(b"proc-tcp\nping"):
                data += s.recv(100)
            assert data == b"proc-tcp\nping"
        procs[0].signal(15)
        wait_for(lambda: not procs[0].alive(), timeout=15, what="echo exits on SIGTERM")
        assert procs[0].popen.returncode == 0
    finally:
        for p in procs:
            p.stop()
