"""Consul-compatibility details of the catalog model (pure): the consul service and serfHealth are the
server's, not the agent's; re-registered checks keep their state; Locality; script check results."""

from __future__ import annotations

import asyncio
import sys

import pytest

from devagent import checks, registry
from devagent import services as sv
from devagent.agent import Agent, AgentConfig
from devagent.codec import SECOND, DecodeError
from devagent.state import Store


def _agent() -> Agent:
    agent = Agent(AgentConfig(node_name="n1"))
    registry.install(agent.store)
    agent.ensure_local_node()
    return agent


def test_local_node_carries_the_consul_service_and_serf_health_as_a_server() -> None:
    agent = _agent()
    svc = agent.store.get("services", "n1/consul")
    assert svc is not None
    assert (svc["ID"], svc["Service"], svc["Port"], svc["Address"], svc["Tags"]) == ("consul", "consul", 8300, "", [])
    assert svc["Meta"]["raft_version"] == "3" and svc["Meta"]["read_replica"] == "false"
    assert svc["Weights"] == {"Passing": 1, "Warning": 1}
    serf = agent.store.get("checks", "n1/serfHealth")
    assert serf is not None and serf["Status"] == "passing" and serf["ServiceID"] == ""
    # written by the "leader", not held by the agent
    assert not registry.is_agent_local(svc) and not registry.is_agent_local(serf)
    # idempotent: a second start writes nothing
    before = agent.store.index
    agent.ensure_local_node()
    assert agent.store.index == before
    # and it renders as Consul's catalog does
    node = agent.store.get("nodes", "n1")
    assert node is not None
    entry = sv.service_node(svc, node)
    assert entry["ServiceID"] == "consul" and entry["ServicePort"] == 8300 and "_Server" not in entry
    assert "_Server" not in sv.node_service(svc)


def test_a_re_registered_check_keeps_its_state_even_with_a_status() -> None:
    store = Store()
    registry.install(store)
    svc = sv.normalize_service({**sv.decode_service({"Name": "web", "ID": "w1"})["service"]})
    cts = [sv.decode_check_type({"TTL": "10s"}), sv.decode_check_type({"TTL": "10s", "Status": "passing"}),
           sv.decode_check_type({"TTL": "10s", "Status": "warning"})]
    with store.write() as tx:
        registry.add_service_with_checks(tx, "n1", svc, cts)
    statuses = [store.get("checks", f"n1/service:w1:{i}")["Status"] for i in (1, 2, 3)]  # type: ignore[index]
    assert statuses == ["critical", "passing", "warning"]
    with store.write() as tx:
        registry.set_status(tx, "n1", "service:w1:1", "passing", "fine")
    again = [sv.decode_check_type({"TTL": "10s", "Status": "critical"}) for _ in range(3)]
    with store.write() as tx:
        registry.add_service_with_checks(tx, "n1", svc, again)
    chk = store.get("checks", "n1/service:w1:1")
    assert chk is not None and (chk["Status"], chk["Output"]) == ("passing", "fine")
    assert store.get("checks", "n1/service:w1:3")["Status"] == "warning"  # type: ignore[index]


def test_locality_is_decoded_stored_and_rendered() -> None:
    dec = sv.decode_service({"Name": "web", "locality": {"region": "us-east-1", "zone": "us-east-1a"}})
    svc = sv.normalize_service(dec["service"])
    assert svc["Locality"] == {"Region": "us-east-1", "Zone": "us-east-1a"}
    assert sv.agent_service(svc, "dc1")["Locality"] == {"Region": "us-east-1", "Zone": "us-east-1a"}
    assert sv.node_service({**svc, "Node": "n"})["Locality"]["Zone"] == "us-east-1a"
    assert sv.service_node(svc, {"Node": "n"})["ServiceLocality"]["Region"] == "us-east-1"
    plain = sv.normalize_service(sv.decode_service({"Name": "web"})["service"])
    assert "Locality" not in sv.agent_service(plain, "dc1") and "ServiceLocality" not in sv.service_node(plain, {})
    assert sv.decode_locality({"Region": "", "Zone": ""}) is None
    with pytest.raises(DecodeError, match=r"Locality\.Zone"):
        sv.decode_service({"Name": "web", "Locality": {"Zone": 3}})
    with pytest.raises(DecodeError, match="Locality"):
        sv.decode_service({"Name": "web", "Locality": "us-east-1"})


def test_script_results_as_consul_check_monitor() -> None:
    assert [checks.script_status(c) for c in (0, 1, 2, 127, -9)] == [
        "passing", "warning", "critical", "critical", "critical"]
    tail = checks.OutputTail(8)
    tail.write(b"0123")
    assert tail.text() == "0123"
    tail.write(b"456789ab")
    assert tail.text() == "Captured 8 of 12 bytes\n...\n456789ab"
    assert checks.script_timeout_output(2 * SECOND, "") == "Timed out (2s) running check"
    assert checks.script_timeout_output(SECOND, "partial") == "Timed out (1s) running check\n\npartial"


def _run(args: list[str], timeout_ns: int = 5 * SECOND, max_out: int = 0) -> tuple[str, str]:
    return asyncio.run(checks.run_script(args, timeout_ns, max_out))


def test_run_script_exit_codes_output_and_limits() -> None:
    py = sys.executable
    assert _run([py, "-c", "print('ok')"]) == ("passing", "ok\n")
    assert _run([py, "-c", "import sys; sys.stderr.write('meh'); sys.exit(1)"]) == ("warning", "meh")
    assert _run([py, "-c", "import sys; sys.exit(3)"])[0] == "critical"
    status, out = _run([py, "-c", "print('x' * 100000)"], max_out=64)
    assert status == "passing" and out.startswith("Captured 64 of 100001 bytes\n...\n") and len(out) < 200
    status, out = _run([py, "-c", "import time; print('started', flush=True); time.sleep(30)"],
                       timeout_ns=SECOND // 2)
    assert status == "critical" and out == "Timed out (500ms) running check\n\nstarted\n"
    assert _run(["no-such-program-weft"]) == (
        "critical", 'exec: "no-such-program-weft": executable file not found in $PATH')
    assert _run(["/no/such/program"]) == ("critical", "fork/exec /no/such/program: no such file or directory")
