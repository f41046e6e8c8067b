"""catalog.models: parsing Consul's JSON, writing registrations, durations, settings (no sockets)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from catalog.models import (
    AclToken,
    AgentSelf,
    CheckDefinition,
    ConsulSettings,
    KVEntry,
    KVTxnOp,
    ServiceInstance,
    ServiceRegistration,
    Session,
    Upstream,
    aggregate_status,
    format_duration,
    parse_catalog_services,
    parse_duration,
    parse_http_addr,
    parse_instances,
    parse_kv_entries,
    parse_txn_errors,
    parse_txn_results,
)

NODE = {"ID": "n1", "Node": "node1", "Address": "10.0.0.9", "Datacenter": "dc1"}


def entry(service: dict[str, Any], checks: list[Any] | None = None) -> dict[str, Any]:
    return {"Node": NODE, "Service": service, "Checks": checks or []}


def check(status: str, cid: str = "c", service_id: str = "") -> dict[str, Any]:
    return {"Node": "node1", "CheckID": cid, "Name": cid, "Status": status, "Output": "", "ServiceID": service_id}


def test_instance_address_falls_back_to_node_address() -> None:
    inst = ServiceInstance.from_api(entry({"ID": "api-1", "Service": "api", "Address": "", "Port": 8080,
                                           "Tags": ["v1"], "Meta": {"version": "1"},
                                           "Weights": {"Passing": 3, "Warning": 1}}))
    assert inst.address == "10.0.0.9"
    assert inst.node == "node1" and inst.datacenter == "dc1"
    assert (inst.service_id, inst.service, inst.port, inst.tags) == ("api-1", "api", 8080, ("v1",))
    assert inst.meta_dict() == {"version": "1"}
    assert inst.weights.passing == 3
    assert inst.kind == "" and inst.proxy is None
    assert inst.status == "passing"


def test_instance_service_address_wins_and_sidecar_proxy_parsed() -> None:
    svc = {"Kind": "connect-proxy", "ID": "api-1-sidecar-proxy", "Service": "api-sidecar-proxy",
           "Address": "10.0.0.5", "Port": 21000,
           "Proxy": {"DestinationServiceName": "api", "DestinationServiceID": "api-1",
                     "LocalServiceAddress": "127.0.0.1", "LocalServicePort": 8080,
                     "Upstreams": [{"DestinationName": "db", "LocalBindPort": 9191}]}}
    inst = ServiceInstance.from_api(entry(svc, [check("passing", "serfHealth"), check("warning", "ttl")]))
    assert inst.address == "10.0.0.5" and inst.port == 21000
    assert inst.kind == "connect-proxy"
    assert inst.destination == "api"
    assert inst.proxy is not None and inst.proxy.local_service_port == 8080
    up = inst.proxy.upstreams[0]
    assert (up.destination_name, up.local_bind_port, up.local_bind_address, up.destination_type) == \
        ("db", 9191, "127.0.0.1", "service")
    assert inst.status == "warning"


def test_typical_service_with_empty_proxy_block_has_no_proxy() -> None:
    inst = ServiceInstance.from_api(entry({"ID": "a", "Service": "a", "Port": 1,
                                           "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}}}))
    assert inst.proxy is None


def test_instances_are_comparable_values() -> None:
    body = [entry({"ID": "a", "Service": "a", "Port": 1, "Meta": {"x": "1", "a": "2"}})]
    assert parse_instances(body) == parse_instances([dict(body[0])])
    assert parse_instances(None) == ()
    hash(parse_instances(body))


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda e: e["Service"].update(Port="80"), "entries[0].Service.Port"),
    (lambda e: e["Service"].update(Port=70000), "entries[0].Service.Port"),
    (lambda e: e["Service"].pop("ID"), "entries[0].Service.ID"),
    (lambda e: e.pop("Node"), "entries[0].Node"),
    (lambda e: e["Service"].update(Tags="v1"), "entries[0].Service.Tags"),
    (lambda e: e["Checks"].append({"CheckID": "x", "Status": "bogus"}), "entries[0].Checks[0].Status"),
    (lambda e: e["Service"].update(Proxy={"Upstreams": [{"DestinationName": "db"}]}),
     "entries[0].Service.Proxy.Upstreams[0].LocalBindPort"),
])
def test_bad_instance_names_the_field(mutate, field) -> None:  # type: ignore[no-untyped-def]
    e = entry({"ID": "a", "Service": "a", "Port": 1})
    mutate(e)
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        parse_instances([e])


def test_not_a_list() -> None:
    with pytest.raises(ValueError, match="entries: expected a list"):
        parse_instances({"a": 1})


def test_aggregate_status() -> None:
    assert aggregate_status(["warning", "critical", "passing"]) == "critical"  # re-exported from consulkit


def test_agent_service_response_parses_as_registration() -> None:
    body = {"Kind": "connect-proxy", "ID": "web-1-sidecar-proxy", "Service": "web-sidecar-proxy", "Tags": [],
            "Meta": {}, "Port": 21000, "Address": "", "ContentHash": "abc", "Datacenter": "dc1",
            "Weights": {"Passing": 1, "Warning": 1},
            "Proxy": {"DestinationServiceName": "web", "DestinationServiceID": "web-1",
                      "LocalServiceAddress": "127.0.0.1", "LocalServicePort": 8080,
                      "Upstreams": [{"DestinationType": "service", "DestinationName": "api",
                                     "LocalBindAddress": "127.0.0.2", "LocalBindPort": 9191,
                                     "Config": {"protocol": "grpc"}}]}}
    reg = ServiceRegistration.from_api(body)
    assert reg.name == "web-sidecar-proxy" and reg.service_id == "web-1-sidecar-proxy"
    assert reg.kind == "connect-proxy" and reg.content_hash == "abc"
    assert reg.proxy is not None and reg.proxy.destination_service_id == "web-1"
    assert reg.proxy.upstreams[0].local_bind_address == "127.0.0.2"
    assert reg.proxy.upstreams[0].config_dict() == {"protocol": "grpc"}


def test_connect_proxy_without_destination_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"Service\.Proxy\.DestinationServiceName"):
        ServiceRegistration.from_api({"Kind": "connect-proxy", "Service": "x", "Proxy": {}})


def test_registration_definition_snake_case_and_sidecar_service_round_trip() -> None:
    definition = {"name": "web", "id": "web-1", "port": 8080, "meta": {"protocol": "grpc"},
                  "check": {"name": "ttl", "ttl": "15s", "deregister_critical_service_after": "1m"},
                  "connect": {"sidecar_service": {"proxy": {"upstreams": [
                      {"destination_name": "api", "local_bind_port": 9191}]}}}}
    reg = ServiceRegistration.from_api(definition)
    assert reg.sidecar_service is not None and reg.sidecar_service.name == ""
    assert reg.sidecar_service.proxy is not None
    assert reg.sidecar_service.proxy.upstreams == (Upstream("api", 9191),)
    assert reg.checks[0].ttl == "15s"
    api = reg.to_api()
    assert api["Name"] == "web" and api["ID"] == "web-1" and api["Meta"] == {"protocol": "grpc"}
    assert api["Connect"]["SidecarService"]["Proxy"]["Upstreams"] == [
        {"DestinationType": "service", "DestinationName": "api", "LocalBindAddress": "127.0.0.1",
         "LocalBindPort": 9191}]
    assert api["Checks"] == [{"Name": "ttl", "TTL": "15s", "DeregisterCriticalServiceAfter": "1m"}]
    assert ServiceRegistration.from_api(api) == reg


def test_check_definition_validation() -> None:
    with pytest.raises(ValueError, match="interval"):
        CheckDefinition(name="h", http="http://127.0.0.1/")
    with pytest.raises(ValueError, match="ttl"):
        CheckDefinition(name="t", ttl="soon")
    with pytest.raises(ValueError, match=r"Checks\[0\]"):
        ServiceRegistration.from_api({"Name": "x", "Checks": [{"Name": "t", "TTL": 5}]} | {"Checks": [1]})
    c = CheckDefinition(name="g", grpc="127.0.0.1:9090", interval="10s")
    assert c.to_api() == {"Name": "g", "GRPC": "127.0.0.1:9090", "Interval": "10s", "GRPCUseTLS": False}


def test_kv_entries() -> None:
    raw = [{"Key": "a/b", "Value": base64.b64encode(b"\x00bin").decode(), "Flags": 7, "CreateIndex": 3,
            "ModifyIndex": 5, "LockIndex": 1, "Session": "s1"},
           {"Key": "a/", "Value": None, "Flags": 0, "CreateIndex": 2, "ModifyIndex": 2, "LockIndex": 0}]
    a, b = parse_kv_entries(raw)
    assert a == KVEntry("a/b", b"\x00bin", 7, 3, 5, 1, "s1")
    assert b.value is None and b.text() == ""
    with pytest.raises(ValueError, match=r"KV\[0\]\.Value: not valid base64"):
        parse_kv_entries([{"Key": "k", "Value": "!!!"}])
    with pytest.raises(ValueError, match=r"KV\[0\]\.Key"):
        parse_kv_entries([{"Value": None}])


def test_session_lock_delay_nanoseconds_and_ttl() -> None:
    s = Session.from_api({"ID": "s", "Name": "n", "Node": "node1", "LockDelay": 15_000_000_000,
                          "Behavior": "delete", "TTL": "10s", "NodeChecks": ["serfHealth"],
                          "ServiceChecks": [{"ID": "svc:1", "Namespace": ""}], "CreateIndex": 4, "ModifyIndex": 4})
    assert s.lock_delay == 15.0 and s.ttl == 10.0 and s.behavior == "delete"
    assert s.service_checks == ("svc:1",)
    with pytest.raises(ValueError, match=r"Session\.Behavior"):
        Session.from_api({"ID": "s", "Behavior": "explode"})


def test_txn_ops_and_results() -> None:
    op = KVTxnOp("cas", "k", b"v", index=4)
    assert op.to_api() == {"KV": {"Verb": "cas", "Key": "k", "Value": "dg==", "Index": 4}}
    with pytest.raises(ValueError, match="index is required"):
        KVTxnOp("cas", "k", b"v")
    with pytest.raises(ValueError, match="verb"):
        KVTxnOp("frobnicate", "k")
    res = parse_txn_results({"Results": [{"KV": {"Key": "k", "Value": None, "ModifyIndex": 9}}], "Errors": None})
    assert res[0] is not None and res[0].modify_index == 9
    errs = parse_txn_errors({"Results": None, "Errors": [{"OpIndex": 1, "What": "failed index check"}]})
    assert errs[0].op_index == 1 and "index" in errs[0].what


def test_agent_self_acl_token_catalog_services() -> None:
    a = AgentSelf.from_api({"Config": {"Datacenter": "dc1", "NodeName": "n", "Version": "1.22.0"}, "Member": {}})
    assert (a.datacenter, a.node_name, a.version) == ("dc1", "n", "1.22.0")
    t = AclToken.from_api({"AccessorID": "acc", "SecretID": "secret", "Policies": [{"ID": "p1", "Name": "ops"}],
                           "ServiceIdentities": [{"ServiceName": "web"}]})
    assert t.policies == ("ops",) and t.service_identities == ("web",)
    assert "secret" not in repr(t)
    assert parse_catalog_services({"consul": [], "web": ["v1"]}) == {"consul": (), "web": ("v1",)}
    with pytest.raises(ValueError, match=r"services\.web"):
        parse_catalog_services({"web": "v1"})


@pytest.mark.parametrize(("text", "seconds"), [("15s", 15.0), ("1m30s", 90.0), ("250ms", 0.25), ("0", 0.0),
                                                ("1h", 3600.0), ("1.5s", 1.5), (7, 7.0)])
def test_parse_duration(text, seconds) -> None:  # type: ignore[no-untyped-def]
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "15", "s", "-1s", "1d", True, -3])
def test_parse_duration_rejects(bad) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="ttl"):
        parse_duration(bad, "ttl")


def test_format_duration() -> None:
    assert format_duration(15) == "15s"
    assert format_duration(1.5) == "1500ms"
    assert format_duration(0.0004) == "1ms"
    assert parse_duration(format_duration(2.25)) == 2.25


@pytest.mark.parametrize(("addr", "ssl", "want"), [
    ("", None, ("http", "127.0.0.1", 8500, "")),
    ("127.0.0.1:18500", None, ("http", "127.0.0.1", 18500, "")),
    ("consul.service:8501", True, ("https", "consul.service", 8501, "")),
    ("http://10.0.0.1:8500", None, ("http", "10.0.0.1", 8500, "")),
    ("https://consul.example.com", None, ("https", "consul.example.com", 443, "")),
    ("http://consul.local:8500", True, ("https", "consul.local", 8500, "")),
    ("[::1]:8500", None, ("http", "::1", 8500, "")),
    ("unix:///var/run/consul.sock", None, ("unix", "", 0, "/var/run/consul.sock")),
    ("localhost", None, ("http", "localhost", 8500, "")),
])
def test_parse_http_addr(addr, ssl, want) -> None:  # type: ignore[no-untyped-def]
    assert parse_http_addr(addr, ssl=ssl) == want


@pytest.mark.parametrize("bad", ["ftp://x:1", "host:port", "host:0", "host:99999", "unix://", "http://:80", "a/b"])
def test_parse_http_addr_rejects(bad) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="CONSUL_HTTP_ADDR"):
        parse_http_addr(bad)


def test_settings_from_env_token_not_in_repr() -> None:
    s = ConsulSettings.from_env({"CONSUL_HTTP_ADDR": "127.0.0.1:9", "CONSUL_HTTP_TOKEN": "sekrit",
                                 "CONSUL_HTTP_SSL": "true", "CONSUL_CACERT": "/ca.pem"})
    assert (s.scheme, s.host, s.port, s.token, s.ca_file) == ("https", "127.0.0.1", 9, "sekrit", "/ca.pem")
    assert s.base_url == "https://127.0.0.1:9"
    assert "sekrit" not in repr(s)
    with pytest.raises(ValueError, match="CONSUL_HTTP_SSL"):
        ConsulSettings.from_env({"CONSUL_HTTP_SSL": "maybe"})
