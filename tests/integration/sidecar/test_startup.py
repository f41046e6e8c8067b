"""A sidecar started before its service is registered: the admin API answers at once, /ready says
503 and what is still missing, /config shows no snapshot yet and where the admin listens."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request

import pytest

from tests.support import WEFT, DevAgent, Proc, free_port, wait_for

pytestmark = pytest.mark.integration


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def test_admin_answers_while_the_sidecar_waits_for_its_registration(dev_agent: DevAgent) -> None:
    agent = dev_agent
    port = free_port()
    admin = f"http://127.0.0.1:{port}"
    sidecar = Proc([*WEFT, "sidecar", "--sidecar-for", "web-1", "--admin-port", str(port)], env=agent.env)
    try:
        wait_for(lambda: _get(admin + "/live")[0] == 200, timeout=30, what="the admin API")
        status, body = _get(admin + "/ready")
        assert status == 503
        assert "waiting for service web-1 registered with the local agent" in body
        status, body = _get(admin + "/config")
        config = json.loads(body)
        assert status == 200 and config["snapshot"] is None
        assert config["listeners"] == {"public": None, "admin": f"127.0.0.1:{port}"}

        # registered: the next thing missing is the trust bundle (no CA has run on this agent)
        req = urllib.request.Request(agent.url + "/v1/agent/service/register", method="PUT",
                                     data=json.dumps({"ID": "web-1", "Name": "web", "Port": 8080}).encode())
        urllib.request.urlopen(req, timeout=5).close()
        wait_for(lambda: "trust bundle in KV weft/ca/roots" in _get(admin + "/ready")[1], timeout=15,
                 what="/ready to name the trust bundle")
        assert _get(admin + "/ready")[0] == 503
        assert '"event": "waiting"' in sidecar.output()

        sidecar.signal(signal.SIGTERM)
        assert sidecar.popen.wait(15) == 0
    finally:
        sidecar.stop()
