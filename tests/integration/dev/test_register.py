"""`weft register` against a real dev agent: Consul service definitions in HCL and JSON."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO, WEFT, DevAgent

pytestmark = pytest.mark.integration

DEMO = REPO / "weft" / "demo" / "services"


def _get(agent: DevAgent, path: str) -> Any:
    with urllib.request.urlopen(agent.url + path, timeout=5) as resp:
        return json.loads(resp.read())


def _weft(agent: DevAgent, *args: str) -> subprocess.CompletedProcess[str]:
    import os

    env = dict(os.environ, **agent.env)
    return subprocess.run([*WEFT, *args], env=env, capture_output=True, text=True, timeout=60, check=False)


def test_register_hcl_and_json_definitions_with_their_sidecars(module_agent: DevAgent) -> None:
    files = [str(DEMO / "greeter.hcl"), str(DEMO / "store.json")]
    result = _weft(module_agent, "register", *files)
    assert result.returncode == 0, result.stderr
    assert "registered service greeter (id greeter-1, port 19200)" in result.stdout
    services = _get(module_agent, "/v1/agent/services")
    assert services["greeter-1"]["Service"] == "greeter"
    assert services["greeter-1"]["Meta"] == {"protocol": "grpc", "version": "v1"}
    proxy = services["greeter-1-sidecar-proxy"]
    assert proxy["Kind"] == "connect-proxy"
    assert proxy["Port"] == 21200
    assert proxy["Proxy"]["DestinationServiceName"] == "greeter"
    [upstream] = proxy["Proxy"]["Upstreams"]
    assert (upstream["DestinationName"], upstream["LocalBindPort"]) == ("store", 19201)
    assert "store-1" in services
    checks = _get(module_agent, "/v1/agent/checks")
    assert checks["greeter-grpc"]["ServiceID"] == "greeter-1"

    result = _weft(module_agent, "register", "-deregister", *files)
    assert result.returncode == 0, result.stderr
    services = _get(module_agent, "/v1/agent/services")
    assert not {"greeter-1", "greeter-1-sidecar-proxy", "store-1", "store-1-sidecar-proxy"} & set(services)


def test_a_bad_file_registers_nothing(module_agent: DevAgent, tmp_path: Path) -> None:
    bad = tmp_path / "bad.hcl"
    bad.write_text('service {\n  name = "x"\n  port = 1\n  check { tcp = "127.0.0.1:1" }\n}\n')
    result = _weft(module_agent, "register", str(DEMO / "frontend.hcl"), str(bad))
    assert result.returncode == 1
    assert "bad.hcl: service.check.interval: required for a tcp check" in result.stderr
    assert "frontend-1" not in _get(module_agent, "/v1/agent/services")


def test_a_directory_stands_for_its_definition_files(module_agent: DevAgent, tmp_path: Path) -> None:
    result = _weft(module_agent, "register", str(DEMO))
    assert result.returncode == 0, result.stderr
    services = _get(module_agent, "/v1/agent/services")
    assert {"frontend-1", "greeter-1", "store-1", "frontend-1-sidecar-proxy"} <= set(services)
    result = _weft(module_agent, "register", "-deregister", str(DEMO))
    assert result.returncode == 0, result.stderr
    assert not {"frontend-1", "greeter-1", "store-1"} & set(_get(module_agent, "/v1/agent/services"))
    result = _weft(module_agent, "register", str(tmp_path))  # an empty directory
    assert result.returncode == 1
    assert "no .hcl or .json files in this directory" in result.stderr
