"""Config entries as Consul's Normalize/Validate and its discovery-chain compiler see them (plain values)."""

from __future__ import annotations

from typing import Any

import pytest

from devagent import configcheck as check
from devagent import configentries as ce
from devagent import discoverychain as chain
from devagent.codec import DecodeError
from devagent.configentries import ConfigEntryError


def norm(body: dict[str, Any]) -> dict[str, Any]:
    return check.normalize_and_validate(ce.decode(body))


def refused(body: dict[str, Any]) -> str:
    with pytest.raises(ConfigEntryError) as info:
        norm(body)
    return str(info.value)


def test_every_ce_kind_decodes_and_unknown_kinds_and_fields_do_not() -> None:
    for kind in ce.KINDS:
        assert ce.decode({"kind": kind, "name": "x"})["Kind"] == kind
    with pytest.raises(DecodeError, match="invalid config entry kind: nope"):
        ce.decode({"Kind": "nope", "Name": "x"})
    with pytest.raises(DecodeError, match='invalid config key "Bogus"'):
        ce.decode({"Kind": "service-defaults", "Name": "x", "Bogus": 1})
    with pytest.raises(DecodeError, match="Payload does not contain a kind"):
        ce.decode({"Name": "x"})
    with pytest.raises(DecodeError, match="expected a list"):
        ce.decode({"Kind": "service-splitter", "Name": "x", "Splits": {"Weight": 1}})
    with pytest.raises(DecodeError, match="expected a number"):
        norm({"Kind": "service-splitter", "Name": "x", "Splits": [{"Weight": "100"}]})


def test_service_and_proxy_defaults() -> None:
    e = norm({"Kind": "service-defaults", "Name": "web", "protocol": "HTTP"})
    assert e["Protocol"] == "http" and e["TransparentProxy"] == {} and e["MeshGateway"] == {}
    assert norm({"Kind": "service-defaults", "Name": "web", "Protocol": "redis"})["Protocol"] == "redis"
    assert refused({"Kind": "service-defaults", "Name": ""}) == "Name is required"
    assert refused({"Kind": "service-defaults", "Name": "*"}) == \
        "service-defaults name must be the name of a service, and not a wildcard"
    assert refused({"Kind": "service-defaults", "Name": "w", "BalanceInboundConnections": "x"}) == \
        "1 error occurred:\n\t* invalid value for balance_inbound_connections: x\n\n"
    assert refused({"Kind": "proxy-defaults", "Name": "x"}) == 'invalid name ("x"), only "global" is supported'
    assert norm({"Kind": "proxy-defaults", "Name": "global", "Config": {"protocol": "http"}})["AccessLogs"] == {}


def test_router_rules() -> None:
    ok = norm({"Kind": "service-router", "Name": "web", "Routes": [
        {"Match": {"HTTP": {"path_prefix": "/a", "Methods": ["get"]}},
         "Destination": {"Service": "api", "RequestTimeout": "1500ms", "PrefixRewrite": "/"}}]})
    route = ok["Routes"][0]
    assert route["Match"]["HTTP"]["Methods"] == ["GET"] and route["Destination"]["RequestTimeout"] == "1.5s"
    base: dict[str, Any] = {"Kind": "service-router", "Name": "web"}
    assert refused({**base, "Routes": [{"Match": {"HTTP": {"PathExact": "a"}}}]}) == \
        "Route[0] PathExact doesn't start with '/': \"a\""
    assert refused({**base, "Routes": [{"Match": {"HTTP": {"PathExact": "/a", "PathPrefix": "/b"}}}]}) == \
        "Route[0] should only contain at most one of PathExact, PathPrefix, or PathRegex"
    assert refused({**base, "Routes": [{"Match": {"HTTP": {"Header": [{"Name": "x"}]}}}]}) == \
        "Route[0] Header[0] should only contain one of Present, Exact, Prefix, Suffix, or Regex"
    assert refused({**base, "Routes": [{"Match": {"HTTP": {"Methods": ["GET", "get"]}}}]}) == \
        'Route[0] Methods contains "GET" more than once'
    assert refused({**base, "Routes": [{"Destination": {"PrefixRewrite": "/x"}}]}) == \
        "Route[0] cannot make use of PrefixRewrite without configuring either PathExact or PathPrefix"
    assert refused({**base, "Routes": [{"Destination": {"RetryOn": ["sometimes"]}}]}) == \
        'Route[0] contains an invalid retry condition: "sometimes"'


def test_splitter_rules() -> None:
    e = norm({"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": 33.333}, {"Weight": 66.667,
                                                                                      "Service": "b"}]})
    assert [s["Weight"] for s in e["Splits"]] == [33.33, 66.67]
    assert refused({"Kind": "service-splitter", "Name": "web", "Splits": []}) == "no splits configured"
    assert refused({"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": 50}]}) == \
        "the sum of all split weights must be 100, not 50.000000"
    assert refused({"Kind": "service-splitter", "Name": "web",
                    "Splits": [{"Weight": 50}, {"Weight": 50, "Service": "web"}]}) == \
        'split destination occurs more than once: service="web", subset="", namespace="", partition=""'


def test_resolver_rules() -> None:
    e = norm({"Kind": "service-resolver", "Name": "web", "ConnectTimeout": "15s", "DefaultSubset": "v1",
              "Subsets": {"v1": {"Filter": 'Service.Meta.version == "1"'}, "v2": {"only_passing": True}},
              "Failover": {"*": {"Datacenters": ["dc2"]}}})
    assert e["ConnectTimeout"] == "15s" and e["Subsets"]["v2"] == {"OnlyPassing": True}
    base: dict[str, Any] = {"Kind": "service-resolver", "Name": "web"}
    assert refused({**base, "DefaultSubset": "v9"}) == 'DefaultSubset "v9" is not a valid subset'
    assert refused({**base, "Subsets": {"V1": {}}}).startswith('Subset "V1" is invalid')
    assert refused({**base, "Subsets": {"v1": {"Filter": "Service.Meta =="}}}).startswith(
        'Filter for subset "v1" is not a valid expression')
    assert refused({**base, "Redirect": {}}) == "Redirect is empty"
    assert refused({**base, "Redirect": {"Service": "a"}, "Failover": {"*": {"Service": "b"}}}) == \
        "Redirect and Failover cannot both be set"
    assert refused({**base, "Redirect": {"ServiceSubset": "v1"}}) == \
        "Redirect.ServiceSubset defined without Redirect.Service"
    assert refused({**base, "Failover": {"v1": {"Service": "b"}}}) == 'Bad Failover["v1"]: not a valid subset subset'
    assert refused({**base, "Failover": {"*": {}}}).startswith('Bad Failover["*"]: one of Service')
    assert refused({**base, "Failover": {"*": {"Datacenters": [""]}}}) == \
        'Bad Failover["*"].Datacenters: found empty datacenter'
    assert refused({**base, "ConnectTimeout": "-1s"}) == "Bad ConnectTimeout '-1s', must be >= 0"
    assert refused({**base, "LoadBalancer": {"Policy": "fastest"}}) == \
        'Bad LoadBalancer policy: "fastest" is not supported'
    assert refused({**base, "LoadBalancer": {"Policy": "round_robin", "HashPolicies": [{"Field": "header"}]}}) == \
        'Bad LoadBalancer configuration: HashPolicies specified for non-hash-based Policy: "round_robin"'


def test_gateways_and_other_kinds() -> None:
    ing = norm({"Kind": "ingress-gateway", "Name": "ing", "Listeners": [
        {"Port": 8080, "Protocol": "HTTP", "Services": [{"Name": "web", "Hosts": ["web.example.com"]}]},
        {"Port": 9090, "Services": [{"Name": "db"}]}]})
    assert [lis["Protocol"] for lis in ing["Listeners"]] == ["http", "tcp"]
    base: dict[str, Any] = {"Kind": "ingress-gateway", "Name": "ing"}
    assert refused({**base, "Listeners": [{"Port": 1, "Services": [{"Name": "a"}]},
                                          {"Port": 1, "Services": [{"Name": "b"}]}]}) == \
        "port 1 declared on two listeners"
    assert refused({**base, "Listeners": [{"Port": 1, "Protocol": "udp", "Services": [{"Name": "a"}]}]}) == \
        "protocol must be 'tcp', 'http', 'http2', or 'grpc'. 'udp' is an unsupported protocol"
    assert refused({**base, "Listeners": [{"Port": 1, "Services": [{"Name": "*"}]}]}) == \
        "Wildcard service name is only valid for protocol = 'http' (listener on port 1)"
    assert refused({**base, "Listeners": [{"Port": 1, "Services": []}]}) == \
        "No service declared for listener with port 1"
    assert refused({"Kind": "terminating-gateway", "Name": "t", "Services": [{"Name": "a", "CertFile": "c"}]}) == \
        'Service "a" must have a CertFile, CAFile, and KeyFile specified for TLS origination'
    assert refused({"Kind": "api-gateway", "Name": "g", "Listeners": [{"Name": "l", "Port": 0, "Protocol": "tcp"}]}) \
        == "listener port 0 not in the range 1-65535"
    assert refused({"Kind": "tcp-route", "Name": "r"}) == "route must have at least one parent"
    assert refused({"Kind": "jwt-provider", "Name": "j"}) == "JSONWebKeySet is required"
    assert refused({"Kind": "exported-services", "Name": "other"}) == 'exported-services Name must be "default"'
    assert refused({"Kind": "sameness-group", "Name": "s"}) == "sameness-groups are an enterprise-only feature"
    mesh = norm({"Kind": "mesh", "Name": "whatever"})
    assert mesh["Name"] == "mesh" and "Name" not in ce.public_entry(mesh)


def graph(*entries: dict[str, Any], written: dict[str, Any]) -> None:
    table = {(e["Kind"], e["Name"]): norm(e) for e in entries}
    new = norm(written)
    table[(new["Kind"], new["Name"])] = new
    chain.check(lambda k, n: table.get((k, n)), list(table.values()), written_kind=new["Kind"],
                affected=chain.affected_services(new["Kind"], [new]))


def test_discovery_chain_needs_an_http_like_protocol_and_existing_subsets() -> None:
    splitter = {"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": 90}, {"Weight": 10, "Service": "b"}]}
    with pytest.raises(ConfigEntryError, match='discovery chain "web" uses a protocol "tcp" that does not permit '
                                               "advanced routing or splitting behavior"):
        graph(written=splitter)
    http_web = {"Kind": "service-defaults", "Name": "web", "Protocol": "http"}
    with pytest.raises(ConfigEntryError, match='inconsistent protocols; service "b" has "tcp" which is not "http"'):
        graph(http_web, written=splitter)
    graph({"Kind": "proxy-defaults", "Name": "global", "Config": {"protocol": "http"}}, written=splitter)
    sub = {"Kind": "service-splitter", "Name": "web", "Splits": [{"Weight": 100, "ServiceSubset": "v2"}]}
    with pytest.raises(ConfigEntryError, match='service "web" does not have a subset named "v2"'):
        graph(http_web, written=sub)
    graph(http_web, {"Kind": "service-resolver", "Name": "web", "Subsets": {"v2": {}}}, written=sub)
    with pytest.raises(ConfigEntryError, match="detected circular resolver redirect"):
        graph({"Kind": "service-resolver", "Name": "a", "Redirect": {"Service": "b"}},
              written={"Kind": "service-resolver", "Name": "b", "Redirect": {"Service": "a"}})
    with pytest.raises(ConfigEntryError, match="detected circular reference"):
        graph({"Kind": "proxy-defaults", "Name": "global", "Config": {"protocol": "http"}},
              {"Kind": "service-splitter", "Name": "a", "Splits": [{"Weight": 100, "Service": "b"}]},
              written={"Kind": "service-splitter", "Name": "b", "Splits": [{"Weight": 100, "Service": "a"}]})


def test_ingress_listener_protocol_and_l7_intentions_follow_the_service_protocol() -> None:
    ing = {"Kind": "ingress-gateway", "Name": "ing",
           "Listeners": [{"Port": 80, "Protocol": "http", "Services": [{"Name": "web"}]}]}
    with pytest.raises(ConfigEntryError, match='service "web" has protocol "tcp", which does not match defined '
                                               'listener protocol "http"'):
        graph(written=ing)
    graph({"Kind": "service-defaults", "Name": "web", "Protocol": "http"}, written=ing)
    l7 = {"Kind": "service-intentions", "Name": "web",
          "Sources": [{"Name": "ui", "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]}]}
    with pytest.raises(ConfigEntryError, match="incompatible with L7 intentions permissions"):
        graph(written=l7)
    graph({"Kind": "service-defaults", "Name": "web", "Protocol": "grpc"}, written=l7)
