"""`weft dev` end to end: it starts, demo traffic flows through the sidecars (their metrics prove it),
an intention change flips a call, `weft top`/`weft status` see the mesh, and Ctrl-C leaves nothing behind.

One `weft dev` for the whole module (it is the expensive part); the Ctrl-C test runs last.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devmesh.state import STATE_FILE
from devmesh.state import running as _running
from tests.support import REPO, WEFT, Proc, free_port, wait_for
from weft.cmd_top import parse_metrics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(360)]  # weft dev starts ~10 processes


@dataclass
class Dev:
    proc: Proc
    state_dir: Path
    state: dict[str, Any]
    env: dict[str, str]
    runtime_dir: Path  # its $XDG_RUNTIME_DIR, where it leaves a pointer to its state directory

    def weft(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*WEFT, *args], env=dict(os.environ, **self.env), capture_output=True, text=True,
                              timeout=timeout, check=False)

    @property
    def frontend(self) -> str:
        return str(self.state["frontend"])

    def admin(self, service: str) -> str:
        return str(self.state["admin"][service])


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    state_dir = tmp_path_factory.mktemp("weft-dev") / ".weft-dev"
    runtime_dir = tmp_path_factory.mktemp("xdg-runtime")
    env = {"CONSUL_HTTP_ADDR": f"127.0.0.1:{free_port()}", "XDG_RUNTIME_DIR": str(runtime_dir)}
    proc = Proc([*WEFT, "dev", "-free-ports", "-state-dir", str(state_dir), "-rps", "5", "-log-level", "info"],
                env=env)
    try:
        wait_for(lambda: "the mesh is up" in proc.output() or not proc.alive(), timeout=240, interval=0.5,
                 what="weft dev to come up")
        assert proc.alive(), "weft dev exited:\n" + proc.output() + _logs(state_dir)
        state = json.loads((state_dir / STATE_FILE).read_text())
        yield Dev(proc, state_dir, state, env, runtime_dir)
    finally:
        if proc.alive():
            proc.signal(signal.SIGINT)
            try:
                proc.popen.wait(30)
            except subprocess.TimeoutExpired:
                pass
        proc.stop()


def _logs(state_dir: Path) -> str:
    out = []
    for log in sorted((state_dir / "logs").glob("*.log")):
        out.append(f"\n--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:]))
    return "".join(out)


def _get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def _requests(admin: str, **labels: str) -> float:
    _, text = _get(admin + "/metrics")
    return sum(s.value for s in parse_metrics(text)
               if s.name == "weft_requests_total" and all(s.labels.get(k) == v for k, v in labels.items()))


def test_demo_traffic_flows_through_the_sidecars(dev: Dev) -> None:
    status, body = _get(dev.frontend + "/hello?name=test")
    assert status == 200, body
    assert json.loads(body)["message"] == "Hello, test!"
    status, body = _get(dev.frontend + "/stream?name=test&count=3")
    assert status == 200, body
    assert len(json.loads(body)["messages"]) == 3
    # the callers' sidecars counted successful calls on both edges (the traffic generator keeps them coming)
    for source, dest, admin in (("frontend", "greeter", dev.admin("frontend")),
                                ("greeter", "store", dev.admin("greeter"))):
        before = _requests(admin, direction="outbound", source=source, destination=dest, status="OK")
        wait_for(lambda admin=admin, source=source, dest=dest, before=before: _requests(  # type: ignore[misc]
            admin, direction="outbound", source=source, destination=dest, status="OK") > before,
                 timeout=30, interval=0.5, what=f"{source} -> {dest} calls in the metrics")
    stream = _requests(dev.admin("frontend"), direction="outbound", method="/weft.demo.v1.Greeter/SayHelloStream")
    assert stream > 0, "server-streaming calls go through the sidecar too"


@pytest.mark.skipif(importlib.util.find_spec("sidecar.h2_traffic") is None,
                    reason="the canary needs the h2 engine's traffic hooks")
def test_the_canary_splits_and_the_header_route_picks_v2(dev: Dev) -> None:
    versions: Counter[str] = Counter()
    for _ in range(200):
        status, body = _get(dev.frontend + "/hello?name=canary")
        assert status == 200, body
        versions[json.loads(body).get("version", "none")] += 1
    assert versions["v1"] + versions["v2"] == 200 and 5 <= versions["v2"] <= 40, versions  # 90/10
    req = urllib.request.Request(dev.frontend + "/hello?name=canary", headers={"x-canary": "1"})
    for _ in range(10):
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert json.loads(resp.read())["version"] == "v2"
    shown = dev.weft("status")
    assert "Traffic management" in shown.stdout and "90% v1.greeter" in shown.stdout, shown.stdout


def test_an_intention_change_flips_a_call(dev: Dev) -> None:
    result = dev.weft("intention", "deny", "frontend", "greeter")
    assert result.returncode == 0, result.stderr
    changed = time.monotonic()

    def denied() -> bool:
        status, body = _get(dev.frontend + "/hello?name=flip")
        return status == 403 and "PERMISSION_DENIED" in body

    try:
        wait_for(denied, timeout=30, interval=0.05, what="frontend -> greeter to be denied")
        print(f"deny took effect {time.monotonic() - changed:.2f}s after `weft intention deny`")
        status, body = _get(dev.frontend + "/hello?name=flip")
        assert status == 403, body
        assert "frontend -> greeter" in json.loads(body)["detail"], "the denial names the pair and its rule"
    finally:
        result = dev.weft("intention", "allow", "frontend", "greeter")
        assert result.returncode == 0, result.stderr
    changed = time.monotonic()
    wait_for(lambda: _get(dev.frontend + "/hello?name=flip")[0] == 200, timeout=30, interval=0.05,
             what="frontend -> greeter to be allowed again")
    print(f"allow took effect {time.monotonic() - changed:.2f}s after `weft intention allow`")
    # greeter -> store was never touched, and store was never allowed to call anyone
    check = dev.weft("intention", "check", "store", "greeter")
    assert check.returncode == 1, check.stdout + check.stderr


def test_top_and_status_see_the_mesh(dev: Dev) -> None:
    top = dev.weft("top", "-once", "-json", "-interval", "3", "-state-dir", str(dev.state_dir))
    assert top.returncode == 0, top.stderr
    edges = {(e["source"], e["destination"]): e for e in json.loads(top.stdout)["edges"]}
    assert edges[("frontend", "greeter")]["rps"] > 0
    assert edges[("greeter", "store")]["rps"] > 0
    assert edges[("frontend", "greeter")]["p99_ms"] is not None

    status = dev.weft("status", "-state-dir", str(dev.state_dir))
    assert status.returncode == 0, status.stderr
    for sid in ("frontend-1", "greeter-1", "store-1"):
        assert sid in status.stdout
        assert f"{sid}-sidecar-proxy" in status.stdout
    assert "trust domain" in status.stdout
    assert "greeter" in status.stdout.split("Policy tables")[1]


def _without_consul_addr(**extra: str) -> dict[str, str]:
    """The environment of a terminal with no CONSUL_HTTP_ADDR, running this checkout's weft from elsewhere."""
    env = {k: v for k, v in os.environ.items() if k not in ("CONSUL_HTTP_ADDR", "XDG_RUNTIME_DIR")}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def test_operator_commands_find_the_dev_agent_without_consul_http_addr(dev: Dev, tmp_path: Path) -> None:
    consul = dev.env["CONSUL_HTTP_ADDR"]
    sub = dev.state_dir.parent / "a" / "subdirectory"
    sub.mkdir(parents=True, exist_ok=True)
    # in a subdirectory of the directory holding .weft-dev
    status = subprocess.run([*WEFT, "status"], cwd=sub, env=_without_consul_addr(), capture_output=True, text=True,
                            timeout=60, check=False)
    assert status.returncode == 0, status.stderr
    assert "frontend-1-sidecar-proxy" in status.stdout
    assert status.stderr.splitlines()[0] == (
        f"weft status: Consul at {consul} (the running weft dev's agent, from {dev.state_dir / STATE_FILE}; "
        "CONSUL_HTTP_ADDR is unset)")
    # anywhere else, through the pointer weft dev left in $XDG_RUNTIME_DIR
    check = subprocess.run([*WEFT, "intention", "check", "frontend", "greeter"], cwd=tmp_path,
                           env=_without_consul_addr(XDG_RUNTIME_DIR=str(dev.runtime_dir)), capture_output=True,
                           text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"weft intention: Consul at {consul} (the running weft dev's agent" in check.stderr
    top = subprocess.run([*WEFT, "top", "-once", "-json", "-interval", "1"], cwd=sub, env=_without_consul_addr(),
                         capture_output=True, text=True, timeout=60, check=False)
    assert top.returncode == 0, top.stderr
    assert len(json.loads(top.stdout)["targets"]) == 4  # frontend, greeter v1 and v2, store


def test_start_up_leaves_no_tcp_series_on_grpc_edges_and_few_warnings(dev: Dev) -> None:
    for service in ("frontend", "greeter", "store"):
        _, text = _get(dev.admin(service) + "/metrics")
        tcp = [(s.labels, s.value) for s in parse_metrics(text)
               if s.name == "weft_requests_total" and s.labels.get("method") == "tcp"]
        assert tcp == [], f"{service}'s sidecar has TCP series on HTTP/gRPC edges: {tcp}"
    for log in sorted((dev.state_dir / "logs").glob("*-sidecar.log")):
        # denials are the intention test's doing (the h2 engine logs them as warnings, rate-limited)
        warnings = [line for line in log.read_text(errors="replace").splitlines()
                    if '"level": "warning"' in line and '"event": "denied"' not in line]
        assert warnings == [], f"{log.name}: {warnings[:5]}"
    frontend = (dev.state_dir / "logs" / "frontend.log").read_text(errors="replace").splitlines()
    # denials are other tests' doing; what start-up may cause is UNAVAILABLE (no endpoint, no connection)
    unavailable = [line for line in frontend if '"event": "greeter call failed"' in line and "UNAVAILABLE" in line]
    assert len(unavailable) <= 3, f"weft dev's first-call probe made {len(unavailable)} failed calls"


def test_config_shows_the_addresses_the_sidecar_is_bound_to(dev: Dev) -> None:
    port = int(dev.admin("greeter").rsplit(":", 1)[1])
    status, body = _get(dev.admin("greeter") + "/config")
    assert status == 200, body
    config = json.loads(body)
    public_port = dev.state["ports"]["greeter.sidecar"]
    assert config["snapshot"]["public_listener"] == f"127.0.0.1:{public_port}"  # weft dev binds --bind 127.0.0.1
    assert config["listeners"] == {"public": f"127.0.0.1:{public_port}", "admin": f"127.0.0.1:{port}"}


def test_ca_roots_into_a_closed_pipe_ends_quietly(dev: Dev) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # `weft ca roots | head` after head has gone
    try:
        proc = subprocess.run([*WEFT, "ca", "roots"], env=dict(os.environ, **dev.env), stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    finally:
        os.close(write_end)
    assert proc.returncode == 141
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_ctrl_c_leaves_no_process_behind(dev: Dev) -> None:
    children = dev.state_dir / STATE_FILE
    recorded = json.loads(children.read_text())["children"]
    assert {c["name"] for c in recorded} >= {"agent", "ca", "policy", "store", "greeter", "frontend",
                                             "store-sidecar", "greeter-sidecar", "frontend-sidecar", "traffic"}
    dev.proc.signal(signal.SIGINT)  # what the terminal sends on Ctrl-C
    dev.proc.popen.wait(60)
    assert dev.proc.popen.returncode == 0, dev.proc.output()
    leftovers = [c["name"] for c in recorded if _running(int(c["pid"]), str(c["started"]))]
    assert leftovers == [], f"still running after Ctrl-C: {leftovers}"
    for c in recorded:  # nothing left in their process groups either
        with pytest.raises(ProcessLookupError):
            os.killpg(int(c["pid"]), 0)
    assert not children.exists()
    assert not (dev.runtime_dir / "weft-dev.json").exists(), "the pointer to the state directory is gone too"
    assert "weft dev: stopped" in dev.proc.output()
