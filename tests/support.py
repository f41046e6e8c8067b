"""Helpers for integration tests: free ports, and real processes that are always stopped.

Every process a test starts goes through `Proc`, which kills its whole process group on stop, so a
failed test never leaves a sidecar or agent behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parent.parent
WEFT = [sys.executable, "-m", "weft.cli"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05,
             what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception as exc:  # the thing we wait for may not be up yet
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f": {last_exc!r}" if last_exc else ""))


class HttpReply(NamedTuple):
    status: int
    headers: dict[str, str]
    body: Any  # bytes, or with decode=True the decoded JSON (the bytes when they are not JSON)


def agent_http(agent: DevAgent, method: str, path: str, body: Any = None, *, token: str | None = None,
               bearer: str | None = None, decode: bool = False) -> HttpReply:
    """One raw HTTP call to a dev agent: a non-bytes `body` is sent as JSON; an HTTP error is an
    answer like any other (its status, headers and body), not an exception."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(agent.url + path, data=data, method=method)
    if token:
        req.add_header("X-Consul-Token", token)
    if bearer:
        req.add_header("Authorization", f"Bearer {bearer}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw, status, headers = resp.read(), int(resp.status), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raw, status, headers = exc.read(), int(exc.code), dict(exc.headers)
    if decode:
        try:
            return HttpReply(status, headers, json.loads(raw))
        except ValueError:
            pass
    return HttpReply(status, headers, raw)


def agent_json(agent: DevAgent, method: str, path: str, body: Any = None, *, token: str | None = None,
               bearer: str | None = None) -> HttpReply:
    """`agent_http` with the answer's body decoded from JSON (left as bytes when it is not JSON)."""
    return agent_http(agent, method, path, body, token=token, bearer=bearer, decode=True)


def http_ok(url: str, token: str | None = None) -> bool:
    req = urllib.request.Request(url)
    if token:
        req.add_header("X-Consul-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=1) as resp:
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


class Proc:
    """A child process in its own process group; output goes to a log file shown on failure."""

    def __init__(self, args: Sequence[str], *, env: dict[str, str] | None = None, log: Path | None = None,
                 cwd: Path | None = None) -> None:
        self.args = list(args)
        self.log_path = log or Path(os.environ.get("TMPDIR", "/tmp")) / f"weft-test-{os.getpid()}-{id(self)}.log"
        self._log = open(self.log_path, "wb")  # closed in stop()
        full_env = dict(os.environ)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        if env:
            full_env.update(env)
        self.popen = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                      cwd=str(cwd or REPO), start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode

    def kill(self) -> None:
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)


class DevAgent:
    """A `weft agent -dev` process on a free loopback port."""

    def __init__(self, *extra: str, data_dir: Path | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.addr}"
        args = [*WEFT, "agent", "-dev", "-http-port", str(self.port), "-log-level", "debug", *extra]
        if data_dir is not None:
            args += ["-data-dir", str(data_dir)]
        self.proc = Proc(args)
        try:
            wait_for(lambda: http_ok(self.url + "/v1/status/leader"), timeout=15, what="dev agent")
        except TimeoutError:
            out = self.proc.output()
            self.proc.stop()
            raise RuntimeError("dev agent did not start:\n" + out) from None

    @property
    def env(self) -> dict[str, str]:
        return {"CONSUL_HTTP_ADDR": self.addr}

    def stop(self) -> None:
        self.proc.stop()
