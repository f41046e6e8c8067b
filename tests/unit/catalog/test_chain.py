"""The compiled chain's typed parse, with plain JSON (Consul's documented answer) and bad documents."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from catalog.chain import ChainError, parse_chain

# Consul's "HTTP Path Routing" sample compilation (api-docs/discovery-chain), in today's ID format
DOC: dict[str, Any] = {"Chain": {
    "ServiceName": "web", "Namespace": "default", "Partition": "default", "Datacenter": "dc1", "Protocol": "http",
    "StartNode": "router:web.default.default",
    "Nodes": {
        "resolver:admin.default.default.dc1": {
            "Type": "resolver", "Name": "admin.default.default.dc1",
            "Resolver": {"ConnectTimeout": "5s", "Default": True, "Target": "admin.default.default.dc1"}},
        "resolver:canary.web.default.default.dc1": {
            "Type": "resolver", "Name": "canary.web.default.default.dc1",
            "Resolver": {"ConnectTimeout": "5s", "Target": "canary.web.default.default.dc1",
                         "RequestTimeout": 2500000000, "Failover": {"Targets": ["web.default.default.dc1"]}},
            "LoadBalancer": {"Policy": "ring_hash", "HashPolicies": [
                {"Field": "cookie", "FieldValue": "sess", "CookieConfig": {"TTL": "10s", "Path": "/"}}]}},
        "resolver:web.default.default.dc1": {
            "Type": "resolver", "Name": "web.default.default.dc1",
            "Resolver": {"ConnectTimeout": "5s", "Target": "web.default.default.dc1"}},
        "router:web.default.default": {
            "Type": "router", "Name": "web.default.default",
            "Routes": [
                {"Definition": {"Match": {"HTTP": {"PathPrefix": "/admin"}},
                                "Destination": {"RequestTimeout": "15s", "Service": "admin", "PrefixRewrite": "/"}},
                 "NextNode": "resolver:admin.default.default.dc1"},
                {"Definition": {"Match": {"HTTP": {"Header": [{"Name": "X-Debug", "Exact": "1"}],
                                                   "QueryParam": [{"Name": "v", "Regex": "^2"}],
                                                   "Methods": ["get"]}},
                                "Destination": {"Service": "web", "ServiceSubset": "canary", "NumRetries": 5,
                                                "RetryOnConnectFailure": True, "RetryOnStatusCodes": [401, 409],
                                                "RetryOn": ["unavailable"]}},
                 "NextNode": "resolver:canary.web.default.default.dc1"},
                {"Definition": {"Match": {"HTTP": {"PathPrefix": "/"}}, "Destination": {"Service": "web"}},
                 "NextNode": "resolver:web.default.default.dc1"}]}},
    "Targets": {
        "admin.default.default.dc1": {"ID": "admin.default.default.dc1", "Service": "admin", "Datacenter": "dc1",
                                      "MeshGateway": {}, "Subset": {}, "ConnectTimeout": "5s"},
        "canary.web.default.default.dc1": {"ID": "canary.web.default.default.dc1", "Service": "web",
                                           "ServiceSubset": "canary", "Datacenter": "dc1", "MeshGateway": {},
                                           "Subset": {"Filter": "Service.Meta.flavor == canary"},
                                           "SNI": "canary.web.default.dc1.internal.x.consul"},
        "web.default.default.dc1": {"ID": "web.default.default.dc1", "Service": "web", "Datacenter": "dc1",
                                    "MeshGateway": {"Mode": "local"}, "Subset": {}}}}}


def test_parses_routes_resolvers_and_targets() -> None:
    chain = parse_chain(DOC)
    assert chain.service_name == "web" and chain.protocol == "http" and chain.start.type == "router"
    admin, canary, catch_all = chain.start.routes
    assert admin.match.path_prefix == "/admin" and admin.destination.request_timeout == 15.0
    assert admin.destination.prefix_rewrite == "/"
    assert canary.match.headers[0].name == "x-debug" and canary.match.methods == ("GET",)
    assert canary.match.query[0].regex is not None and canary.match.query[0].regex.pattern == "^2"
    assert canary.destination.retry_on_status_codes == (401, 409) and canary.destination.num_retries == 5
    node = chain.resolver_of(canary.next_node)
    assert node.request_timeout == 2.5 and node.failover == ("web.default.default.dc1",)
    assert node.load_balancer is not None and node.load_balancer.hash_policies[0].cookie_ttl == 10.0
    target = chain.targets[node.target]
    assert (target.subset, target.filter) == ("canary", "Service.Meta.flavor == canary")
    assert chain.targets["web.default.default.dc1"].mesh_gateway_mode == "local"
    assert catch_all.next_node == "resolver:web.default.default.dc1"


def _broken(path: list[Any], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(DOC)
    here: Any = doc["Chain"]
    for p in path[:-1]:
        here = here[p]
    if value is KeyError:
        del here[path[-1]]
    else:
        here[path[-1]] = value
    return doc


ROUTER = ["Nodes", "router:web.default.default"]


@pytest.mark.parametrize(("path", "value", "message"), [
    (["StartNode"], "router:nope", "StartNode: 'router:nope' is not in Nodes"),
    ([*ROUTER, "Routes", 0, "NextNode"], "resolver:gone",
     "Nodes['router:web.default.default'].Routes[0].NextNode: 'resolver:gone' is not in Nodes"),
    ([*ROUTER, "Routes", 0, "Definition", "Match", "HTTP", "PathRegex"], "(",
     "Nodes['router:web.default.default'].Routes[0].Definition.Match.HTTP.PathRegex: not a valid regular expression"),
    ([*ROUTER, "Routes", 1, "Definition", "Destination", "NumRetries"], -1,
     "Routes[1].Definition.Destination.NumRetries: expected a whole number >= 0"),
    ([*ROUTER, "Routes", 0, "Definition", "Destination", "RequestTimeout"], "soon",
     "Routes[0].Definition.Destination.RequestTimeout: invalid duration"),
    ([*ROUTER, "Type"], "teleporter", "Type: expected router, splitter or resolver, got 'teleporter'"),
    (["Targets", "admin.default.default.dc1"], KeyError,
     "Nodes['resolver:admin.default.default.dc1'].Resolver: target 'admin.default.default.dc1' is not in Targets"),
    (["Targets", "web.default.default.dc1", "Service"], 7,
     "Targets['web.default.default.dc1'].Service: expected a string"),
    (["Nodes"], [1], "Nodes: expected an object"),
    ([*ROUTER, "Routes"], [{}] * 300, "Routes: more than 256 items"),
])
def test_bad_chains_name_the_field(path: list[Any], value: Any, message: str) -> None:
    with pytest.raises(ChainError) as exc:
        parse_chain(_broken(path, value))
    assert message in str(exc.value)


def test_compiled_by_the_dev_agent_compiler_parses() -> None:
    from devagent import chaincompile, configcheck

    entries = {(e["Kind"], e["Name"]): configcheck.normalize_and_validate(e) for e in [
        {"Kind": "service-defaults", "Name": "greeter", "Protocol": "grpc"},
        {"Kind": "service-resolver", "Name": "greeter", "DefaultSubset": "v1",
         "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"Filter": "Service.Meta.version == v2"}}},
        {"Kind": "service-splitter", "Name": "greeter", "Splits": [{"Weight": 90, "ServiceSubset": "v1"},
                                                                   {"Weight": 10, "ServiceSubset": "v2"}]}]}
    compiled = chaincompile.compile_chain(lambda k, n: entries.get((k, n)), "greeter")
    chain = parse_chain({"Chain": compiled.chain})
    assert [(s.weight, chain.resolver_of(s.next_node).target) for s in chain.start.splits] == [
        (90.0, "v1.greeter.default.default.dc1"), (10.0, "v2.greeter.default.default.dc1")]
