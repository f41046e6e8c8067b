"""The agent stops on SIGTERM whatever its clients did: blocking-query clients SIGKILLed (aiohttp and
py-consul), half-closed sockets, partial request lines and bodies, and alias checks (a Connect
sidecar registration adds one) running beside them.

Regression: after ``weft dev`` was SIGKILLed, its agent received SIGTERM (PR_SET_PDEATHSIG), began
to shut down and then spun at 100% CPU, deaf to further signals: once the store was closing, every
watch returned an already-resolved future, and an alias check's ``while True: await fut`` never
suspended, so the event loop (and the signal handling it does) never ran again.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import consul
import pytest

from tests.support import DevAgent, Proc, wait_for

pytestmark = pytest.mark.integration

STOP_BOUND = 10.0  # seconds; the agent's own shutdown bound is 2 s, the slack is for a loaded machine

CLIENT = textwrap.dedent('''
    import asyncio, sys
    import aiohttp
    import consul.aio

    BASE = "http://127.0.0.1:" + sys.argv[1]

    async def follow(s, path, params):
        while True:
            try:
                async with s.get(BASE + path, params=params) as resp:
                    await resp.read()
                    h, i = resp.headers.get("X-Consul-ContentHash"), resp.headers.get("X-Consul-Index")
                    params = {**params, "wait": "5m", **({"hash": h} if h else {"index": i})}
            except Exception:
                await asyncio.sleep(0.1)

    async def pyconsul(c, kind):
        index = None
        while True:
            if kind == "kv":
                index, _ = await c.kv.get("robust/key", index=index, wait="5m")
            else:
                index, _ = await c.health.service("web", index=index, wait="5m")

    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            tasks = []
            for _ in range(20):
                tasks.append(follow(s, "/v1/kv/robust/key", {"index": "1"}))
                tasks.append(follow(s, "/v1/kv/robust/", {"index": "1", "recurse": ""}))
                tasks.append(follow(s, "/v1/health/service/web", {"index": "1"}))
                tasks.append(follow(s, "/v1/catalog/services", {"index": "1"}))
                tasks.append(follow(s, "/v1/agent/service/web", {}))
            c = consul.aio.Consul(host="127.0.0.1", port=int(sys.argv[1]))
            for _ in range(10):
                tasks.append(pyconsul(c, "kv"))
                tasks.append(pyconsul(c, "health"))
            await asyncio.sleep(0.5)
            print("READY", flush=True)
            await asyncio.gather(*tasks)

    asyncio.run(main())
''')


def _watchers(agent: DevAgent) -> int:
    """Blocking queries now parked in the agent (the debug endpoint is not Consul's; use a proxy):
    the number of open TCP connections to the agent's port."""
    n = 0
    with open("/proc/net/tcp") as fh:
        for line in fh.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "01" and int(local.split(":")[1], 16) == agent.port:
                n += 1
    return n


def _misbehaving_sockets(port: int) -> list[socket.socket]:
    """Sockets that leave requests half done: half-closed after a blocking GET, a partial request
    line, headers without their end, a body shorter than its Content-Length."""
    out = []
    requests = [
        (b"GET /v1/kv/robust/key?index=999999&wait=5m HTTP/1.1\r\nHost: x\r\n\r\n", True),
        (b"GET /v1/health/service/web?ind", False),
        (b"PUT /v1/kv/robust/partial HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n", False),
        (b"PUT /v1/kv/robust/partial HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nshort", False),
        (b"PUT /v1/txn HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n[{\"KV\":", True),
    ]
    for data, half_close in requests:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out.append(s)
    return out


def _register_with_sidecar(agent: DevAgent, name: str, port: int) -> None:
    """A Connect sidecar registration: the sidecar gets an alias check ("Connect Sidecar Aliasing")."""
    body = json.dumps({"Name": name, "ID": name, "Port": port, "Check": {"TTL": "60s"},
                       "Connect": {"SidecarService": {}}}).encode()
    req = urllib.request.Request(agent.url + "/v1/agent/service/register", data=body, method="PUT")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def _stops_on_sigterm(agent: DevAgent) -> bool:
    agent.proc.popen.send_signal(signal.SIGTERM)
    try:
        agent.proc.popen.wait(STOP_BOUND)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_sigterm_stops_the_agent_after_clients_die_mid_query() -> None:
    agent = DevAgent()
    client: Proc | None = None
    socks: list[socket.socket] = []
    try:
        c = consul.Consul(host="127.0.0.1", port=agent.port)
        c.kv.put("robust/key", "v1")
        _register_with_sidecar(agent, "web", 8080)
        assert any(ch.get("Type") == "alias" for ch in c.agent.checks().values())

        client = Proc([sys.executable, "-c", CLIENT, str(agent.port)])
        wait_for(lambda: "READY" in client.output(), timeout=30, what="client ready")  # type: ignore[union-attr]
        socks = _misbehaving_sockets(agent.port)
        wait_for(lambda: _watchers(agent) >= 100, timeout=20, what="blocking queries parked")
        client.kill()  # SIGKILL: its connections die with it, its queries stay parked until written to
        c.kv.put("robust/key", "v2")  # wakes waiters whose clients are gone
        time.sleep(0.3)
        assert c.kv.get("robust/key")[1]["Value"] == b"v2"  # still serving
        assert _stops_on_sigterm(agent), f"agent ignored SIGTERM for {STOP_BOUND}s:\n{agent.proc.output()[-2000:]}"
        assert agent.proc.popen.returncode == 0
    finally:
        for s in socks:
            s.close()
        if client is not None:
            client.kill()
        agent.proc.kill()
        agent.stop()


def test_sigterm_stops_an_agent_with_a_connect_sidecar() -> None:
    """The orphan of ``weft dev``: sidecar registrations (alias check) and a SIGTERM."""
    agent = DevAgent()
    try:
        c = consul.Consul(host="127.0.0.1", port=agent.port)
        _register_with_sidecar(agent, "api", 9090)
        assert any(ch.get("Type") == "alias" for ch in c.agent.checks().values())
        assert _stops_on_sigterm(agent), f"agent ignored SIGTERM for {STOP_BOUND}s:\n{agent.proc.output()[-2000:]}"
        assert agent.proc.popen.returncode == 0
    finally:
        agent.proc.kill()
        agent.stop()


def test_a_shutdown_that_hangs_is_cut_short() -> None:
    """The watchdog: an event loop that never turns again (as the alias runner made it) cannot keep
    the process alive past the stop deadline."""
    code = ("from devagent import server; server._shutdown_watchdog(0.5)\n"
            "while True:\n    pass\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=False)
    assert proc.returncode == 70
    assert b"shutdown did not finish in time" in proc.stdout + proc.stderr
