"""Service/check decoding, validation, sidecar expansion and renderings (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from devagent import checks, registry
from devagent import services as sv
from devagent.codec import SECOND, DecodeError
from devagent.state import Store


def _parent(**kw: Any) -> dict[str, Any]:
    dec = sv.decode_service({"Name": "web", "ID": "web-1", "Port": 8080, "Tags": ["v1"], "Meta": {"a": "b"}, **kw})
    return sv.normalize_service(dec["service"])


def test_snake_and_camel_case_keys_decode_alike() -> None:
    camel = sv.decode_service({"Name": "w", "EnableTagOverride": True, "Check": {"TTL": "10s"},
                               "Connect": {"SidecarService": {"Port": 1}}})
    snake = sv.decode_service({"name": "w", "enable_tag_override": True, "check": {"ttl": "10s"},
                               "connect": {"sidecar_service": {"port": 1}}})
    assert camel["service"] == snake["service"]
    assert camel["checks"][0]["TTL"] == snake["checks"][0]["TTL"] == 10 * SECOND
    assert camel["sidecar"] is not None and snake["sidecar"] is not None


def test_wrong_types_are_decode_errors() -> None:
    with pytest.raises(DecodeError, match="Port"):
        sv.decode_service({"Name": "w", "Port": "eighty"})
    with pytest.raises(DecodeError, match="Interval"):
        sv.decode_service({"Name": "w", "Check": {"HTTP": "http://x", "Interval": "ten"}})


def test_check_ids_single_and_many() -> None:
    one = [sv.decode_check_type({"TTL": "1s"})]
    many = [sv.decode_check_type({"TTL": "1s"}), sv.decode_check_type({"CheckID": "mine", "TTL": "1s"}),
            sv.decode_check_type({"TTL": "1s"})]
    assert sv.service_check_ids("web-1", one) == ["service:web-1"]
    assert sv.service_check_ids("web-1", many) == ["service:web-1:1", "mine", "service:web-1:3"]


@pytest.mark.parametrize(("body", "error"), [
    ({"TTL": "1s", "Interval": "1s"}, "Interval and TTL cannot both be specified"),
    ({"HTTP": "http://x"}, "Interval must be > 0"),
    ({"AliasService": "x", "TTL": "1s"}, "TTL must be not be set for Alias checks"),
    ({"Name": "nothing"}, "TTL must be > 0 for TTL checks"),
])
def test_check_validation_words(body: dict[str, Any], error: str) -> None:
    with pytest.raises(sv.ServiceError, match=error):
        sv.validate_check_type(sv.decode_check_type(body))


def test_check_kinds() -> None:
    kinds = {sv.check_kind(sv.decode_check_type(b)) for b in (
        {"TTL": "1s"}, {"HTTP": "h", "Interval": "1s"}, {"TCP": "a:1", "Interval": "1s"},
        {"GRPC": "a:1", "Interval": "1s"}, {"AliasService": "x"})}
    assert kinds == {"ttl", "http", "tcp", "grpc", "alias"}


def test_sidecar_expansion_as_consul() -> None:
    parent = _parent()
    sc, cts = sv.expand_sidecar(parent, {"Proxy": {"Upstreams": [{"DestinationName": "db", "LocalBindPort": 9191}]}},
                                {"web-1": 8080})
    assert sc["Kind"] == "connect-proxy"
    assert sc["ID"] == "web-1-sidecar-proxy" and sc["Service"] == "web-sidecar-proxy"
    assert sc["Port"] == 21000
    assert sc["Tags"] == ["v1"] and sc["Meta"] == {"a": "b"}
    proxy = sc["Proxy"]
    assert proxy["DestinationServiceName"] == "web" and proxy["DestinationServiceID"] == "web-1"
    assert proxy["LocalServiceAddress"] == "127.0.0.1" and proxy["LocalServicePort"] == 8080
    up = proxy["Upstreams"][0]
    assert up["LocalBindAddress"] == "127.0.0.1" and up["DestinationType"] == "service"
    assert [c["Name"] for c in cts] == ["Connect Sidecar Listening", "Connect Sidecar Aliasing web-1"]
    assert cts[0]["TCP"] == "127.0.0.1:21000" and cts[0]["Interval"] == 10 * SECOND
    assert cts[1]["AliasService"] == "web-1"
    assert sv.service_check_ids(sc["ID"], cts) == ["service:web-1-sidecar-proxy:1", "service:web-1-sidecar-proxy:2"]


def test_sidecar_inherits_address_and_keeps_given_proxy_fields() -> None:
    parent = _parent(Address="10.0.0.7")
    sc, cts = sv.expand_sidecar(parent, {"ID": "ignored", "Proxy": {"LocalServicePort": 9999}}, {})
    assert sc["ID"] == "web-1-sidecar-proxy"  # always derived from the parent
    assert sc["Address"] == "10.0.0.7"
    assert sc["Proxy"]["LocalServicePort"] == 9999 and sc["Proxy"]["LocalServiceAddress"] == "127.0.0.1"
    assert cts[0]["TCP"] == "10.0.0.7:21000"


def test_sidecar_port_allocation_skips_used_and_keeps_its_own() -> None:
    parent = _parent()
    sc, _ = sv.expand_sidecar(parent, {}, {"a": 21000, "b": 21001})
    assert sc["Port"] == 21002
    again, _ = sv.expand_sidecar(parent, {}, {"a": 21000, "web-1-sidecar-proxy": 21005})
    assert again["Port"] == 21005
    given, _ = sv.expand_sidecar(parent, {"Port": 30000, "Checks": [{"TTL": "5s"}]}, {})
    assert given["Port"] == 30000
    full = {str(p): p for p in range(sv.SIDECAR_MIN_PORT, sv.SIDECAR_MAX_PORT + 1)}
    with pytest.raises(sv.NoSidecarPort, match="no port provided for sidecar_service and none left in the "
                                             r"configured range \[21000, 21255\]"):
        sv.expand_sidecar(parent, {}, full)


def test_connect_proxy_validation_words() -> None:
    bad = sv.normalize_service(sv.decode_service({"Name": "p", "Kind": "connect-proxy"})["service"])
    with pytest.raises(sv.ServiceError) as exc:
        sv.validate_service(bad)
    text = str(exc.value)
    assert text.startswith("Validation failed: 2 errors occurred:")
    assert "Proxy.DestinationServiceName must be non-empty for Connect proxy services" in text
    assert "Port or SocketPath must be set for a Connect proxy" in text


def test_renderings() -> None:
    row = {**_parent(), "Node": "n", "CreateIndex": 3, "ModifyIndex": 4, "_Sidecar": False}
    agent_svc = sv.agent_service(row, "dc1")
    assert "Kind" not in agent_svc and "Proxy" not in agent_svc and agent_svc["Datacenter"] == "dc1"
    assert agent_svc["Weights"] == {"Passing": 1, "Warning": 1}
    ns = sv.node_service(row)
    assert ns["Proxy"] == {"MeshGateway": {}, "Expose": {}} and ns["CreateIndex"] == 3
    node = {"ID": "i", "Node": "n", "Address": "1.2.3.4", "Datacenter": "dc1", "Meta": {"m": "1"}}
    sn = sv.service_node(row, node)
    assert sn["ServiceName"] == "web" and sn["Address"] == "1.2.3.4" and sn["NodeMeta"] == {"m": "1"}
    assert not any(k.startswith("_") for k in (*agent_svc, *ns, *sn))


def test_alias_status_follows_worst_check() -> None:
    def chk(cid: str, status: str, sid: str = "web-1", output: str = "") -> dict[str, Any]:
        return {"Node": "n", "CheckID": cid, "Name": cid, "Status": status, "ServiceID": sid, "Output": output}
    assert checks.alias_status([chk("a", "passing")], "n", "web-1", True) == ("passing", "All checks passing.")
    assert checks.alias_status([chk("a", "passing"), chk("b", "warning", output="slow")], "n", "web-1", True) == \
        ("warning", 'Aliased check "b" failing: slow')
    status, _ = checks.alias_status([chk("a", "critical"), chk("b", "warning")], "n", "web-1", True)
    assert status == "critical"
    # node-level checks count; other services' checks do not
    assert checks.alias_status([chk("serf", "critical", sid="")], "n", "web-1", True)[0] == "critical"
    assert checks.alias_status([chk("x", "critical", sid="other")], "n", "web-1", True) == \
        ("passing", "No checks found.")
    assert checks.alias_status([], "n", "web-1", False) == \
        ("critical", "Service web-1 could not be found on node n")


def test_thresholds_as_consul_status_handler() -> None:
    gate = checks._Thresholds({"SuccessBeforePassing": 2, "FailuresBeforeCritical": 3, "FailuresBeforeWarning": 2})
    assert gate.judge("passing") is None
    assert gate.judge("passing") == "passing"
    assert gate.judge("critical") is None
    assert gate.judge("critical") == "warning"
    assert gate.judge("critical") == "critical"
    plain = checks._Thresholds({})
    assert plain.judge("critical") == "critical" and plain.judge("passing") == "passing"


def test_output_truncation_and_ttl_text() -> None:
    assert checks.truncate("abc", 0) == "abc"
    long = checks.truncate("x" * 5000, 0)
    assert long.endswith("(captured 4096 of 5000 bytes)")
    assert checks.ttl_expired_output("") == "TTL expired"
    assert checks.ttl_expired_output("ok") == "TTL expired (last output before timeout follows): ok"


def test_registry_topics_are_per_service() -> None:
    store = Store()
    registry.install(store)
    with store.write() as tx:
        registry.add_service_with_checks(tx, "n", _parent(), [sv.decode_check_type({"TTL": "5s"})])
    web_idx = store.topic_index(("service", "web"))
    with store.write() as tx:
        db = sv.normalize_service(sv.decode_service({"Name": "db", "Port": 1})["service"])
        registry.add_service_with_checks(tx, "n", db, [])
    assert store.topic_index(("service", "web")) == web_idx
    with store.write() as tx:
        registry.set_status(tx, "n", "service:web-1", "passing", "ok")
    assert store.topic_index(("service", "web")) > web_idx
    with store.write() as tx:
        registry.remove_service(tx, "n", "web-1")
    assert store.get("checks", "n/service:web-1") is None


def test_default_tagged_addresses() -> None:
    svc = sv.default_tagged_addresses({"Address": "10.0.0.5", "Port": 80, "TaggedAddresses": {}})
    assert svc["TaggedAddresses"] == {"lan_ipv4": {"Address": "10.0.0.5", "Port": 80},
                                      "wan_ipv4": {"Address": "10.0.0.5", "Port": 80}}
    assert sv.default_tagged_addresses({"Address": "db.local", "Port": 1}) == {"Address": "db.local", "Port": 1}
    v6 = sv.default_tagged_addresses({"Address": "::1", "Port": 2})
    assert set(v6["TaggedAddresses"]) == {"lan_ipv6", "wan_ipv6"}


def test_reaper_honours_the_minimum_and_spares_recovered_services() -> None:
    from devagent.agent import Agent, AgentConfig

    agent = Agent(AgentConfig(node_name="n", check_deregister_interval_min_ns=60 * SECOND))
    registry.install(agent.store)
    agent.ensure_local_node()
    mgr = checks.CheckManager(agent, deregister_min_ns=60 * SECOND)
    with agent.store.write() as tx:
        for name in ("doomed", "healed"):
            svc = sv.normalize_service(sv.decode_service({"Name": name, "Port": 1})["service"])
            registry.add_service_with_checks(tx, "n", svc, [sv.decode_check_type(
                {"TTL": "10s", "DeregisterCriticalServiceAfter": "5s"})])
    assert mgr.reap(1000.0) == []  # first seen critical now
    assert mgr.reap(1030.0) == []  # 30s > 5s, but the 1m minimum applies
    with agent.store.write() as tx:
        registry.set_status(tx, "n", "service:healed", "passing", "")
    assert mgr.reap(1061.0) == ["doomed"]
    assert agent.store.get("services", "n/doomed") is None
    assert agent.store.get("checks", "n/service:doomed") is None
    assert agent.store.get("services", "n/healed") is not None
