"""The CA against a dev agent with ACLs on: who gets which identity, discovery through Consul service
`weft-ca`, and `weft ca sign` / `weft ca rotate` refusals naming their reason."""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ca.client import CARefused, GrpcCA
from ca.csr import make_csr, new_key
from ca.identity import SpiffeId
from ca.provider import TrustBundle
from catalog.client import ConsulClient
from tests.support import WEFT, DevAgent, Proc, free_port, wait_for
from weft.cmd_ca import consul_resolver

pytestmark = pytest.mark.integration

MGMT = "b3a5c9e1-0000-4000-8000-00000000beef"
KEK = base64.b64encode(bytes(range(32))).decode()


def call(agent: DevAgent, method: str, path: str, body: Any = None, token: str = MGMT) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(agent.url + path, data=data, method=method, headers={"X-Consul-Token": token})
    with urllib.request.urlopen(req, timeout=5) as resp:
        raw = resp.read()
    return json.loads(raw) if raw.strip() else None


@pytest.fixture(scope="module")
def acl_ca() -> Iterator[tuple[DevAgent, Proc, dict[str, str]]]:
    agent = DevAgent("-acl-enabled", "-acl-initial-management", MGMT)
    # what a caller needs: write on its service; to find the CA and its roots, read on weft-ca, the nodes,
    # and the bundle in KV
    call(agent, "PUT", "/v1/acl/policy", {"Name": "web-write", "Rules": 'service "web" { policy = "write" }\n'
                                          'service "weft-ca" { policy = "read" }\n'
                                          'node_prefix "" { policy = "read" }\n'
                                          'key "weft/ca/roots" { policy = "read" }'})
    call(agent, "PUT", "/v1/acl/policy", {"Name": "read-all", "Rules": 'service_prefix "" { policy = "read" }'})
    tokens = {
        "web": call(agent, "PUT", "/v1/acl/token", {"Policies": [{"Name": "web-write"}]})["SecretID"],
        "reader": call(agent, "PUT", "/v1/acl/token", {"Policies": [{"Name": "read-all"}]})["SecretID"],
        "api-identity": call(agent, "PUT", "/v1/acl/token",
                             {"ServiceIdentities": [{"ServiceName": "api"}]})["SecretID"],
    }
    port = free_port()
    ca = Proc([*WEFT, "ca", "serve", "--listen", f"127.0.0.1:{port}", "--check-ttl", "5s"],
              env={**agent.env, "CONSUL_HTTP_TOKEN": MGMT, "WEFT_CA_KEK": KEK})
    try:
        def registered() -> bool:
            entries = call(agent, "GET", "/v1/health/service/weft-ca?passing") or []
            return any(c.get("Output") == "active" for e in entries for c in e["Checks"])

        wait_for(registered, timeout=60, interval=0.3, what="weft-ca registered, passing and active")
        yield agent, ca, tokens
    finally:
        print(ca.output()[-4000:])
        ca.stop()
        agent.stop()


def bundle_of(agent: DevAgent) -> TrustBundle:
    raw = call(agent, "GET", "/v1/kv/weft/ca/roots")
    return TrustBundle.from_json(base64.b64decode(raw[0]["Value"]))


async def test_token_rights_decide_identity(acl_ca: tuple[DevAgent, Proc, dict[str, str]]) -> None:
    agent, _, tokens = acl_ca
    bundle = bundle_of(agent)
    async with ConsulClient.from_env({"CONSUL_HTTP_ADDR": agent.addr, "CONSUL_HTTP_TOKEN": MGMT}) as consul:
        ca = GrpcCA(consul_resolver(consul))  # found through Consul service weft-ca
        try:
            async def sign(service: str, token: str) -> str:
                sid = SpiffeId.for_service(bundle.trust_domain, service)
                r = await ca.sign(make_csr(new_key(), sid), token=token, current_chain=b"", proof=b"",
                                  ttl_seconds=600, bundle=bundle)
                return r.cert_pem

            assert await sign("web", tokens["web"])
            assert await sign("api", tokens["api-identity"])
            assert await sign("api-sidecar-proxy", tokens["api-identity"])
            for service, token, reason in (
                ("api", tokens["web"], "lacks service:write on 'api'"),
                ("web", tokens["reader"], "gives read"),
                ("web", "00000000-dead-beef-0000-000000000000", "not known"),
                ("web", "", "no ACL token"),
            ):
                with pytest.raises(CARefused) as info:
                    await sign(service, token)
                assert info.value.code.name == "PERMISSION_DENIED"
                assert reason in info.value.message, info.value.message
            with pytest.raises(CARefused) as info:
                await ca.rotate(tokens["web"], bundle)
            assert info.value.code.name == "PERMISSION_DENIED" and "operator:write" in info.value.message
        finally:
            await ca.close()


def test_cli_sign_discovers_the_ca(acl_ca: tuple[DevAgent, Proc, dict[str, str]], tmp_path: Path) -> None:
    agent, _, tokens = acl_ca
    env = {**agent.env}
    ok = subprocess.run([*WEFT, "ca", "sign", "--service", "web", "--out", str(tmp_path), "--token", tokens["web"]],
                        env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "key.pem").stat().st_mode & 0o777 == 0o600
    bad = subprocess.run([*WEFT, "ca", "sign", "--service", "api", "--out", str(tmp_path / "x"),
                          "--token", tokens["web"]], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "PERMISSION_DENIED" in bad.stderr and "lacks service:write on 'api'" in bad.stderr
    assert not (tmp_path / "x").exists()
