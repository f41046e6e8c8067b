"""`weft dev`'s pure planning: demo services from their definitions, port rewriting, commands, summary."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from catalog.servicedef import parse
from devmesh.plan import (
    ADMIN_PORTS,
    DevError,
    Plan,
    app_command,
    consul_address,
    demo_services,
    make_plan,
    rewrite_ports,
    summary,
)
from weft.cmd_dev import DEMO

DEMO_SERVICES = DEMO.services


def demo_payloads() -> list[dict[str, object]]:
    out = []
    for path in sorted(DEMO_SERVICES.iterdir()):
        if path.suffix in (".hcl", ".json"):
            out.extend(parse(path.read_text(), source=str(path)))
    return out


def test_fixed_plan_follows_the_definition_files() -> None:
    plan = make_plan(demo_payloads(), consul_host="127.0.0.1", consul_port=8500)
    assert [s.key for s in plan.services] == ["store", "greeter", "greeter-v2", "frontend"]
    assert [s.name for s in plan.services] == ["store", "greeter", "greeter", "frontend"]
    greeter = plan.service("greeter")
    assert (greeter.id, greeter.port, greeter.sidecar_port, greeter.version) == ("greeter-1", 19200, 21200, "v1")
    assert greeter.upstreams == (("store", 19201),)
    canary = plan.service("greeter-v2")
    assert (canary.id, canary.port, canary.sidecar_port, canary.version) == ("greeter-2", 19210, 21210, "v2")
    assert app_command("python", canary, "info")[-2:] == ["-version", "v2"]
    assert plan.service("frontend").upstreams == (("greeter", 19101),)
    assert plan.service("store").upstreams == ()
    ports = plan.ports()
    assert len(set(ports.values())) == len(ports), "no two roles share a port"
    assert ports["store.admin"] == ADMIN_PORTS["store"]


def test_free_port_plan_rewrites_every_port_consistently() -> None:
    counter = itertools.count(40000)
    plan = make_plan(demo_payloads(), consul_host="127.0.0.1", consul_port=18500, free_port=lambda: next(counter))
    ports = plan.ports()
    assert ports["consul"] == 18500
    assert all(p >= 40000 for role, p in ports.items() if role != "consul")
    assert len(set(ports.values())) == len(ports)
    for s in plan.services:
        payload = s.payload
        assert payload["Port"] == s.port
        sidecar = payload["Connect"]["SidecarService"]  # type: ignore[index]
        assert sidecar["Port"] == s.sidecar_port
        check = payload["Checks"][0]  # type: ignore[index]
        target = check.get("GRPC") or check.get("HTTP")
        assert f":{s.port}" in target, f"{s.name}'s check follows its new port: {target}"
    frontend = plan.service("frontend")
    assert frontend.payload["Checks"][0]["HTTP"] == f"http://127.0.0.1:{frontend.port}/healthz"  # type: ignore[index]


def test_rewrite_ports_leaves_the_original_alone() -> None:
    payload = {"Name": "a", "Port": 1, "Checks": [{"TCP": "127.0.0.1:1", "Interval": "1s"},
                                                  {"HTTP": "http://h:1/x:1", "Interval": "1s"}],
               "Connect": {"SidecarService": {"Port": 2, "Proxy": {"Upstreams": [
                   {"DestinationName": "b", "LocalBindPort": 3}]}}}}
    out = rewrite_ports(payload, {1: 11, 2: 12, 3: 13})
    assert out["Port"] == 11
    assert out["Checks"][0]["TCP"] == "127.0.0.1:11"
    assert out["Checks"][1]["HTTP"] == "http://h:11/x:1"  # only the authority's port
    assert out["Connect"]["SidecarService"]["Port"] == 12
    assert out["Connect"]["SidecarService"]["Proxy"]["Upstreams"][0]["LocalBindPort"] == 13
    assert payload["Port"] == 1 and payload["Connect"]["SidecarService"]["Port"] == 2  # type: ignore[index]


def test_incomplete_demo_definitions_are_refused() -> None:
    payloads = [p for p in demo_payloads() if p["Name"] != "store"]
    with pytest.raises(DevError, match="lack store"):
        demo_services(payloads, ADMIN_PORTS)
    with pytest.raises(DevError, match=r"lack store-1 \(in /defs\)"):
        demo_services(payloads, ADMIN_PORTS, source=Path("/defs"))
    no_sidecar = [dict(p) for p in demo_payloads()]
    for p in no_sidecar:
        p.pop("Connect", None)
    with pytest.raises(DevError, match=r"needs connect\.sidecar_service"):
        demo_services(no_sidecar, ADMIN_PORTS)


def test_app_command_points_apps_at_their_upstream_ports() -> None:
    plan = make_plan(demo_payloads(), consul_host="127.0.0.1", consul_port=8500)
    cmd = app_command("/py", plan.service("greeter"), "info")
    assert cmd[:3] == ["/py", "-m", "weft.demo.greeter"]
    assert cmd[cmd.index("-port") + 1] == "19200"
    assert cmd[cmd.index("-store-addr") + 1] == "127.0.0.1:19201"
    assert "-greeter-addr" in app_command("/py", plan.service("frontend"), "info")


@pytest.mark.parametrize(("env", "expected"), [
    ({}, ("127.0.0.1", 8500, True)),
    ({"CONSUL_HTTP_ADDR": "127.0.0.1:18500"}, ("127.0.0.1", 18500, False)),
    ({"CONSUL_HTTP_ADDR": "http://localhost:9"}, ("localhost", 9, False)),
])
def test_consul_address(env: dict[str, str], expected: tuple[str, int, bool]) -> None:
    assert consul_address(env) == expected


@pytest.mark.parametrize("addr", ["unix:///tmp/consul.sock", "https://c:8501"])
def test_consul_address_refuses_what_the_dev_agent_cannot_be(addr: str) -> None:
    with pytest.raises(DevError, match="plain http"):
        consul_address({"CONSUL_HTTP_ADDR": addr})


def test_summary_says_where_to_look() -> None:
    plan = make_plan(demo_payloads(), consul_host="127.0.0.1", consul_port=18500)
    text = summary(plan, started_agent=True, state_dir=Path("/tmp/x"), traffic_rps=2.0, default_consul=False,
                   demo_config=DEMO.config)
    assert "export CONSUL_HTTP_ADDR=127.0.0.1:18500" in text
    assert "weft intention deny frontend greeter" in text
    assert "weft top" in text
    assert "http://127.0.0.1:19102" in text  # frontend's admin
    assert "curl 'http://127.0.0.1:19100/hello?name=ada'" in text
    assert "2 requests/s" in text
    default = make_plan(demo_payloads(), consul_host="127.0.0.1", consul_port=8500)
    quiet = summary(default, started_agent=False, state_dir=Path("/tmp/x"), traffic_rps=None, default_consul=True,
                    demo_config=DEMO.config)
    assert "export CONSUL_HTTP_ADDR" not in quiet and "requests/s" not in quiet
    assert "(already running)" in quiet


def test_free_ports_summary_says_which_consul_address_to_export() -> None:
    """`weft dev -free-ports` without CONSUL_HTTP_ADDR moves the dev agent off 8500: say where it is."""
    plan = make_plan(demo_payloads(), consul_host="127.0.0.1", consul_port=8500)
    moved = Plan("127.0.0.1", 41234, plan.ca_port, plan.policy_port, plan.services)
    text = summary(moved, started_agent=True, state_dir=Path("/tmp/x"), traffic_rps=2.0, default_consul=True,
                   demo_config=DEMO.config)
    assert "export CONSUL_HTTP_ADDR=127.0.0.1:41234" in text
