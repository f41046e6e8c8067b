"""The Consul ACL policies of the VM guide (deploy/acl/*.hcl) are enough for each process, and no more
than that: on a dev agent with ACLs on (default deny), the CA, the policy service and a sidecar run
with tokens made only from them and come up; the operator's token writes intentions; a sidecar's token
cannot take another service's identity or methods table."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import REPO, WEFT, DevAgent, Proc, free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MGMT = "c0ffee00-0000-4000-8000-00000000acl0"
ACL = REPO / "deploy" / "acl"


def call(agent: DevAgent, method: str, path: str, body: Any = None, token: str = MGMT) -> Any:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(agent.url + path, data=data, method=method, headers={"X-Consul-Token": token})
    with urllib.request.urlopen(req, timeout=5) as resp:
        raw = resp.read()
    return json.loads(raw) if raw.strip() else None


def status_of(agent: DevAgent, method: str, path: str, body: Any, token: str) -> int:
    try:
        call(agent, method, path, body, token)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    return 200


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


@pytest.fixture(scope="module")
def agent() -> Iterator[DevAgent]:
    a = DevAgent("-acl-enabled", "-acl-initial-management", MGMT, "-session-ttl-min", "1s")
    try:
        for name in ("weft-ca", "weft-policy", "weft-sidecar", "weft-operator"):
            call(a, "PUT", "/v1/acl/policy", {"Name": name, "Rules": (ACL / f"{name}.hcl").read_text()})
        call(a, "PUT", "/v1/acl/policy", {"Name": "weft-methods-web",
                                          "Rules": 'key "weft/methods/web" { policy = "write" }'})
        yield a
    finally:
        a.stop()


def token(agent: DevAgent, *policies: str, service: str = "") -> str:
    body: dict[str, Any] = {"Policies": [{"Name": p} for p in policies]}
    if service:
        body["ServiceIdentities"] = [{"ServiceName": service}]
    return str(call(agent, "PUT", "/v1/acl/token", body)["SecretID"])


def test_each_process_runs_with_the_guides_policy_alone(agent: DevAgent) -> None:
    ca_port, policy_port, admin_port = free_port(), free_port(), free_port()
    env = {**agent.env, "CONSUL_HTTP_TOKEN": token(agent, "weft-ca"), "WEFT_CA_KEK": "0123456789abcdef0123456789"}
    ca = Proc([*WEFT, "ca", "serve", "--listen", f"127.0.0.1:{ca_port}", "--check-ttl", "5s"], env=env)
    policy = Proc([*WEFT, "policy", "serve", "-grpc-addr", f"127.0.0.1:{policy_port}", "-lock-ttl", "10s"],
                  env={**agent.env, "CONSUL_HTTP_TOKEN": token(agent, "weft-policy")})
    sidecar: Proc | None = None
    try:
        # the service, registered by its owner; its sidecar runs with the sidecar's token
        call(agent, "PUT", "/v1/agent/service/register", {"ID": "web-1", "Name": "web", "Port": free_port(),
                                                          "Meta": {"protocol": "tcp"}})
        web = token(agent, "weft-sidecar", "weft-methods-web", service="web")
        sidecar = Proc([*WEFT, "sidecar", "--sidecar-for", "web-1", "--admin-port", str(admin_port),
                        "--bind", "127.0.0.1"], env={**agent.env, "CONSUL_HTTP_TOKEN": web})
        operator = token(agent, "weft-operator")
        allow = Proc([*WEFT, "intention", "allow", "api", "web"], env={**agent.env, "CONSUL_HTTP_TOKEN": operator})
        assert allow.popen.wait(60) == 0, allow.output()

        wait_for(lambda: http_status(f"http://127.0.0.1:{admin_port}/ready") == 200, timeout=120, interval=0.5,
                 what="the sidecar ready: leaf from the CA, table from the policy service, registered")
        entries = call(agent, "GET", "/v1/health/connect/web?passing")
        assert [e["Service"]["ID"] for e in entries] == ["web-1-sidecar-proxy"]
        config = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/config", timeout=5).read())
        assert config["snapshot"]["policy_version"] != "none (deny all)"  # the policy service published

        # and not more: the sidecar's token cannot write another service's methods or register another service
        assert status_of(agent, "PUT", "/v1/kv/weft/methods/web", b"{}", web) == 200
        assert status_of(agent, "PUT", "/v1/kv/weft/methods/api", b"{}", web) == 403
        assert status_of(agent, "PUT", "/v1/kv/weft/ca/roots", b"{}", web) == 403
        assert status_of(agent, "PUT", "/v1/agent/service/register", {"Name": "api", "Port": 1}, web) == 403
    finally:
        for proc in (sidecar, policy, ca):
            if proc is not None:
                out = proc.output()
                proc.stop()
                print(out[-3000:])
