"""`weft config write|read|list|delete` against a running dev agent, as `consul config` behaves."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.integration.devagent.b_http import call
from tests.support import REPO, WEFT, DevAgent

pytestmark = pytest.mark.integration


def _weft(agent: DevAgent, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*WEFT, "config", *args], input=stdin, capture_output=True, text=True, timeout=60,
                          env={**agent.env, "PATH": "/usr/bin:/bin"}, cwd=REPO)


def test_write_read_list_delete_with_hcl_json_and_cas(module_agent: DevAgent, tmp_path: Path) -> None:
    defaults = tmp_path / "defaults.hcl"
    defaults.write_text('Kind = "service-defaults"\nName = "web"\nprotocol = "http"\n')
    r = _weft(module_agent, "write", str(defaults))
    assert (r.returncode, r.stdout.strip()) == (0, "Config entry written: service-defaults/web"), r.stderr
    resolver = tmp_path / "resolver.hcl"
    resolver.write_text('kind = "service-resolver"\nname = "web"\n'
                        'subsets = { v2 = { filter = "Service.Meta.v == 2" } }\n')
    assert _weft(module_agent, "write", str(resolver)).returncode == 0
    router = {"Kind": "service-router", "Name": "web", "Routes": [
        {"Match": {"HTTP": {"PathPrefix": "/canary"}}, "Destination": {"ServiceSubset": "v2"}}]}
    r = _weft(module_agent, "write", "-", stdin=json.dumps(router))
    assert (r.returncode, r.stdout.strip()) == (0, "Config entry written: service-router/web"), r.stderr
    r = _weft(module_agent, "read", "-kind", "service-defaults", "-name", "web")
    entry = json.loads(r.stdout)
    assert r.returncode == 0 and entry["Protocol"] == "http" and r.stdout.startswith('{\n    "Kind"')
    r = _weft(module_agent, "list", "-kind", "service-router")
    assert (r.returncode, r.stdout) == (0, "web\n")
    # -cas: a stale index is refused, the current one accepted
    stale = str(entry["ModifyIndex"] - 1)
    r = _weft(module_agent, "write", "-cas", "-modify-index", stale, str(defaults))
    assert (r.returncode, r.stderr.strip()) == (1, "Config entry not updated: service-defaults/web")
    r = _weft(module_agent, "write", "-cas", "-modify-index", str(entry["ModifyIndex"]), str(defaults))
    assert r.returncode == 0, r.stderr
    # the chain compiles from what was written
    status, body, _ = call(module_agent.url, "GET", "/v1/discovery-chain/web")
    assert status == 200 and body["Chain"]["StartNode"] == "router:web.default.default"
    # deleting what the router needs is refused with Consul's words; nothing changes
    r = _weft(module_agent, "delete", "-kind", "service-resolver", "-name", "web")
    assert r.returncode == 1 and 'does not have a subset named "v2"' in r.stderr
    r = _weft(module_agent, "delete", "-filename", "-", stdin=json.dumps(router))
    assert (r.returncode, r.stdout.strip()) == (0, "Config entry deleted: service-router/web"), r.stderr
    r = _weft(module_agent, "delete", "-kind", "service-resolver", "-name", "web", "-cas", "-modify-index", "1")
    assert (r.returncode, r.stderr.strip()) == (1, "Config entry not deleted: service-resolver/web")
    assert _weft(module_agent, "delete", "-kind", "service-resolver", "-name", "web").returncode == 0


def test_clear_errors(module_agent: DevAgent, tmp_path: Path) -> None:
    bad = tmp_path / "bad.hcl"
    bad.write_text('kind = "service-splitter"\nname = "db"\nsplits = [ { weight = 60 } ]\n')
    r = _weft(module_agent, "write", str(bad))
    assert r.returncode == 1
    assert r.stderr.strip() == "Error writing config entry service-splitter/db: the sum of all split weights must be " \
                               "100, not 60.000000"
    r = _weft(module_agent, "write", str(tmp_path / "missing.hcl"))
    assert r.returncode == 1 and r.stderr.startswith("Failed to load data: ")
    r = _weft(module_agent, "write", "-", stdin='name = "x"')
    assert r.returncode == 1 and "Payload does not contain a kind/Kind key" in r.stderr
    r = _weft(module_agent, "write", "-", stdin='{"Kind": "service-defaults", "Name": "x", "Bogus": 1}')
    assert r.returncode == 1 and 'invalid config key "Bogus"' in r.stderr
    r = _weft(module_agent, "read", "-kind", "service-defaults")
    assert (r.returncode, r.stderr.strip()) == (1, "Must specify the -name parameter")
    r = _weft(module_agent, "read", "-kind", "service-defaults", "-name", "nope")
    assert r.returncode == 1 and "Config entry not found" in r.stderr
    r = _weft(module_agent, "write", "-cas", str(bad))
    assert r.returncode == 1 and "-cas needs -modify-index" in r.stderr
