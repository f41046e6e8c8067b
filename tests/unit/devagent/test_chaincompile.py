"""The discovery-chain compiler with plain entries (the sample compilations of Consul's API docs)."""

from __future__ import annotations

from typing import Any

import pytest

from devagent import chaincompile as cc
from devagent import configcheck
from devagent.configentries import ConfigEntryError

TD = "11111111-2222-3333-4444-555555555555.consul"


def _lookup(*entries: dict[str, Any]) -> cc.Lookup:
    table = {(e["Kind"], e["Name"]): configcheck.normalize_and_validate(e) for e in entries}
    return lambda kind, name: table.get((kind, name))


def _compile(service: str, *entries: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return cc.compile_chain(_lookup(*entries), service, trust_domain=TD, **kw).chain


def test_no_entries_is_the_default_chain() -> None:
    chain = _compile("web")
    assert chain == {
        "ServiceName": "web", "Namespace": "default", "Partition": "default", "Datacenter": "dc1", "Default": True,
        "Protocol": "tcp", "StartNode": "resolver:web.default.default.dc1",
        "Nodes": {"resolver:web.default.default.dc1": {
            "Type": "resolver", "Name": "web.default.default.dc1",
            "Resolver": {"Default": True, "ConnectTimeout": "5s", "Target": "web.default.default.dc1"}}},
        "Targets": {"web.default.default.dc1": {
            "ID": "web.default.default.dc1", "Service": "web", "Namespace": "default", "Partition": "default",
            "Datacenter": "dc1", "MeshGateway": {}, "Subset": {}, "TransparentProxy": {}, "ConnectTimeout": "5s",
            "SNI": f"web.default.dc1.internal.{TD}", "Name": f"web.default.dc1.internal.{TD}"}},
    }


def test_multi_datacenter_failover() -> None:
    chain = _compile("web", {"Kind": "service-resolver", "Name": "web", "ConnectTimeout": "15s",
                             "Failover": {"*": {"Datacenters": ["dc3", "dc4"]}}})
    node = chain["Nodes"]["resolver:web.default.default.dc1"]
    assert node["Resolver"] == {"ConnectTimeout": "15s", "Target": "web.default.default.dc1",
                                "Failover": {"Targets": ["web.default.default.dc3", "web.default.default.dc4"]}}
    assert sorted(chain["Targets"]) == ["web.default.default.dc1", "web.default.default.dc3",
                                        "web.default.default.dc4"]
    assert "Default" not in chain


def test_redirect_with_overrides_customizes_the_chain() -> None:
    entries = [{"Kind": "service-resolver", "Name": "web", "Redirect": {"Datacenter": "dc2"}}]
    plain = _compile("web", *entries)
    chain = _compile("web", *entries, overrides=cc.Overrides(protocol="grpc", connect_timeout_ns=7_000_000_000,
                                                              mesh_gateway_mode="remote"))
    assert "CustomizationHash" not in plain and len(chain["CustomizationHash"]) == 8
    assert chain["Protocol"] == "grpc" and chain["StartNode"] == "resolver:web.default.default.dc2"
    assert chain["Nodes"]["resolver:web.default.default.dc2"]["Resolver"] == {
        "ConnectTimeout": "7s", "Target": "web.default.default.dc2"}
    assert chain["Targets"]["web.default.default.dc2"]["MeshGateway"] == {"Mode": "remote"}


def test_version_split_with_default_subset_in_another_datacenter() -> None:
    chain = _compile(
        "web",
        {"Kind": "service-resolver", "Name": "web", "DefaultSubset": "v1",
         "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"Filter": "Service.Meta.version == v2"}}},
        {"Kind": "service-defaults", "Name": "web", "Protocol": "http"},
        {"Kind": "service-splitter", "Name": "web",
         "Splits": [{"Weight": 90, "ServiceSubset": "v1"}, {"Weight": 10, "ServiceSubset": "v2"}]},
        datacenter="dc2")
    assert chain["StartNode"] == "splitter:web.default.default"
    splits = chain["Nodes"]["splitter:web.default.default"]["Splits"]
    assert [(s["Weight"], s["NextNode"]) for s in splits] == [(90, "resolver:v1.web.default.default.dc2"),
                                                               (10, "resolver:v2.web.default.default.dc2")]
    assert chain["Targets"]["v2.web.default.default.dc2"]["Subset"] == {"Filter": "Service.Meta.version == v2"}
    assert chain["Targets"]["v2.web.default.default.dc2"]["SNI"] == f"v2.web.default.dc2.internal.{TD}"
    assert "resolver:web.default.default.dc2" not in chain["Nodes"]  # the default subset replaced it


def test_http_path_routing_adds_the_catch_all_route() -> None:
    chain = _compile(
        "web",
        {"Kind": "service-resolver", "Name": "web", "Subsets": {"canary": {"Filter": "Service.Meta.flavor == canary"}}},
        {"Kind": "proxy-defaults", "Name": "global", "Config": {"protocol": "http"}},
        {"Kind": "service-router", "Name": "web", "Routes": [
            {"Match": {"HTTP": {"PathPrefix": "/admin"}},
             "Destination": {"Service": "admin", "PrefixRewrite": "/", "RequestTimeout": "15s"}},
            {"Match": {"HTTP": {"Header": [{"Name": "x-debug", "Exact": "1"}]}},
             "Destination": {"Service": "web", "ServiceSubset": "canary", "NumRetries": 5,
                             "RetryOnConnectFailure": True, "RetryOnStatusCodes": [401, 409]}}]})
    assert chain["StartNode"] == "router:web.default.default" and chain["Protocol"] == "http"
    routes = chain["Nodes"]["router:web.default.default"]["Routes"]
    assert [r["NextNode"] for r in routes] == ["resolver:admin.default.default.dc1",
                                               "resolver:canary.web.default.default.dc1",
                                               "resolver:web.default.default.dc1"]
    assert routes[0]["Definition"]["Destination"] == {"Service": "admin", "PrefixRewrite": "/",
                                                      "RequestTimeout": "15s"}
    assert routes[1]["Definition"]["Destination"]["RetryOnStatusCodes"] == [401, 409]
    assert routes[2]["Definition"] == {"Match": {"HTTP": {"PathPrefix": "/"}},
                                       "Destination": {"Service": "web", "Namespace": "default",
                                                       "Partition": "default"}}
    assert chain["Nodes"]["resolver:admin.default.default.dc1"]["Resolver"]["Default"] is True
    assert "Default" not in chain["Nodes"]["resolver:web.default.default.dc1"]["Resolver"]


def test_nested_splitters_are_flattened() -> None:
    http = [{"Kind": "service-defaults", "Name": n, "Protocol": "http"} for n in ("web", "api")]
    chain = _compile(
        "web", *http,
        {"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": 50}, {"Weight": 50, "Service": "api"}]},
        {"Kind": "service-splitter", "Name": "api", "Splits": [{"Weight": 25, "ServiceSubset": "b"},
                                                                {"Weight": 75, "ServiceSubset": "a"}]},
        {"Kind": "service-resolver", "Name": "api", "Subsets": {"a": {}, "b": {}}})
    splits = chain["Nodes"]["splitter:web.default.default"]["Splits"]
    assert [(s["Weight"], s["NextNode"]) for s in splits] == [
        (50, "resolver:web.default.default.dc1"), (12.5, "resolver:b.api.default.default.dc1"),
        (37.5, "resolver:a.api.default.default.dc1")]
    assert "splitter:api.default.default" not in chain["Nodes"]


def test_failover_to_a_subset_and_load_balancer() -> None:
    chain = _compile("web", {
        "Kind": "service-resolver", "Name": "web", "DefaultSubset": "v1",
        "Subsets": {"v1": {"Filter": "Service.Meta.v == 1", "OnlyPassing": True}, "v2": {}},
        "Failover": {"v1": {"ServiceSubset": "v2"}},
        "LoadBalancer": {"Policy": "ring_hash", "HashPolicies": [{"Field": "header", "FieldValue": "x-user"}]}})
    node = chain["Nodes"]["resolver:v1.web.default.default.dc1"]
    assert node["Resolver"]["Failover"] == {"Targets": ["v2.web.default.default.dc1"]}
    assert node["LoadBalancer"] == {"Policy": "ring_hash", "HashPolicies": [{"Field": "header",
                                                                             "FieldValue": "x-user"}]}
    assert chain["Targets"]["v1.web.default.default.dc1"]["Subset"] == {"Filter": "Service.Meta.v == 1",
                                                                         "OnlyPassing": True}
    assert "v2.web.default.default.dc1" in chain["Targets"]


def test_tcp_override_drops_routers_and_splitters() -> None:
    entries = [{"Kind": "service-defaults", "Name": "web", "Protocol": "http"},
               {"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": 100}]}]
    chain = _compile("web", *entries, overrides=cc.Overrides(protocol="tcp"))
    assert chain["StartNode"] == "resolver:web.default.default.dc1" and chain["Protocol"] == "tcp"
    assert "CustomizationHash" in chain


def test_errors_are_consuls() -> None:
    with pytest.raises(ConfigEntryError, match='uses a protocol "tcp" that does not permit advanced routing'):
        _compile("web", {"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": 100}]})
    with pytest.raises(ConfigEntryError, match="detected circular resolver redirect"):
        _compile("a", {"Kind": "service-resolver", "Name": "a", "Redirect": {"Service": "b"}},
                 {"Kind": "service-resolver", "Name": "b", "Redirect": {"Service": "a"}})
    with pytest.raises(ConfigEntryError, match='service "web" does not have a subset named "v9"'):
        _compile("web", {"Kind": "service-defaults", "Name": "web", "Protocol": "http"},
                 {"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": 100, "ServiceSubset": "v9"}]})
    with pytest.raises(ConfigEntryError, match="uses inconsistent protocols"):
        _compile("web", {"Kind": "service-defaults", "Name": "web", "Protocol": "http"},
                 {"Kind": "service-defaults", "Name": "api", "Protocol": "grpc"},
                 {"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": 50, "Service": "api"},
                                                                         {"Weight": 50}]})


def test_service_meta_and_external_sni() -> None:
    chain = _compile("web", {"Kind": "service-defaults", "Name": "web", "Meta": {"team": "a"},
                             "ExternalSNI": "web.example.com"})
    assert chain["ServiceMeta"] == {"team": "a"}
    target = chain["Targets"]["web.default.default.dc1"]
    assert target["SNI"] == "web.example.com" and target["External"] is True
