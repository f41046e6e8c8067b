"""Consul service definitions (HCL and JSON) into register payloads: catalog.servicedef."""

from __future__ import annotations

import json

import pytest

from catalog.servicedef import ServiceDefinitionError, parse, parse_data, upstreams_of
from tests.support import REPO

DEMO = REPO / "weft" / "demo" / "services"


def test_demo_greeter_definition_becomes_the_register_payload() -> None:
    [payload] = parse((DEMO / "greeter.hcl").read_text(), source="greeter.hcl")
    assert payload == {
        "Name": "greeter", "ID": "greeter-1", "Port": 19200, "Tags": ["demo", "grpc"],
        "Meta": {"protocol": "grpc", "version": "v1"},
        "Checks": [{"CheckID": "greeter-grpc", "Name": "greeter gRPC health", "GRPC": "127.0.0.1:19200",
                    "GRPCUseTLS": False, "Interval": "2s", "Timeout": "1s"}],
        "Connect": {"SidecarService": {"Port": 21200, "Proxy": {
            "Upstreams": [{"DestinationName": "store", "LocalBindPort": 19201}]}}},
    }


@pytest.mark.parametrize("name", ["frontend.hcl", "greeter.hcl", "store.json"])
def test_every_demo_definition_parses(name: str) -> None:
    [payload] = parse((DEMO / name).read_text(), source=name)
    assert payload["Name"] == name.split(".")[0]
    assert payload["Checks"], "each demo service has a health check"


HCL_BLOCKS = """
service {
  name = "web"
  port = 8080
  connect {
    sidecar_service {
      proxy {
        upstreams {
          destination_name = "api"
          local_bind_port  = 9191
        }
        upstreams {
          destination_name = "db"
          local_bind_port  = 9192
          local_bind_address = "127.0.0.2"
        }
      }
    }
  }
}
"""

HCL_ATTRS = """
service {
  name = "web"
  port = 8080
  connect {
    sidecar_service {
      proxy {
        upstreams = [
          { destination_name = "api", local_bind_port = 9191 },
          { destination_name = "db", local_bind_port = 9192, local_bind_address = "127.0.0.2" },
        ]
      }
    }
  }
}
"""


def test_upstreams_as_repeated_blocks_or_a_list_are_the_same() -> None:
    a = parse(HCL_BLOCKS, fmt="hcl")
    b = parse(HCL_ATTRS, fmt="hcl")
    assert a == b
    assert [u["DestinationName"] for u in upstreams_of(a[0])] == ["api", "db"]
    assert upstreams_of(a[0])[1]["LocalBindAddress"] == "127.0.0.2"


def test_json_with_camel_case_keys_as_the_http_api_takes_them() -> None:
    text = json.dumps({"Service": {"Name": "api", "ID": "api-2", "Port": 9000, "Tags": ["v2"],
                                   "Weights": {"Passing": 3},
                                   "Checks": [{"Name": "ttl", "TTL": "15s", "DeregisterCriticalServiceAfter": "1m"},
                                              {"Name": "tcp", "TCP": "127.0.0.1:9000", "Interval": "10s"}]}})
    [payload] = parse(text, source="api.json")
    assert payload["Weights"] == {"Passing": 3, "Warning": 1}
    assert payload["Checks"][0] == {"Name": "ttl", "TTL": "15s", "DeregisterCriticalServiceAfter": "1m"}
    assert payload["Checks"][1]["TCP"] == "127.0.0.1:9000"


def test_services_list_in_hcl_and_json() -> None:
    hcl = 'services { name = "a"\n port = 1 }\nservices { name = "b"\n port = 2 }\n'
    js = '{"services": [{"name": "a", "port": 1}, {"name": "b", "port": 2}]}'
    assert parse(hcl, fmt="hcl") == parse(js, fmt="json") == [{"Name": "a", "Port": 1}, {"Name": "b", "Port": 2}]


def test_format_is_guessed_from_the_file_name_or_the_text() -> None:
    assert parse('{"service": {"name": "a"}}') == [{"Name": "a"}]
    assert parse('service { name = "a" }') == [{"Name": "a"}]
    assert parse('service { name = "a" }', source="x.hcl") == [{"Name": "a"}]


def test_check_header_method_and_tagged_addresses() -> None:
    [p] = parse_data({"service": {
        "name": "w", "port": 80, "tagged_addresses": {"lan": {"address": "10.0.0.1", "port": 80}},
        "check": {"http": "http://127.0.0.1/h", "method": "post", "interval": "5s",
                  "header": {"X-A": ["1", "2"], "X-B": "3"}}}})
    assert p["TaggedAddresses"] == {"lan": {"Address": "10.0.0.1", "Port": 80}}
    assert p["Checks"][0]["Method"] == "POST"
    assert p["Checks"][0]["Header"] == {"X-A": ["1", "2"], "X-B": ["3"]}


def test_a_standalone_connect_proxy_registration() -> None:
    [p] = parse_data({"service": {"kind": "connect-proxy", "name": "web-sidecar-proxy", "port": 21000,
                                  "proxy": {"destination_service_name": "web", "local_service_port": 8080,
                                            "upstreams": [{"destination_name": "api", "local_bind_port": 9191}]}}})
    assert p["Kind"] == "connect-proxy"
    assert p["Proxy"]["DestinationServiceName"] == "web"
    assert upstreams_of(p) == []  # only sidecar_service upstreams belong to the service itself


@pytest.mark.parametrize(("data", "field", "words"), [
    ({"service": {"port": 1}}, "service.name", "required"),
    ({"service": {"name": "a", "port": "80"}}, "service.port", "integer in 1..65535"),
    ({"service": {"name": "a", "port": 70000}}, "service.port", "1..65535"),
    ({"service": {"name": "a b"}}, "service.name", "not a valid service name"),
    ({"service": {"name": "a", "tags": "x"}}, "service.tags", "list of strings"),
    ({"service": {"name": "a", "colour": "red"}}, "service.colour", "unknown field"),
    ({"service": {"name": "a", "meta": {"bad key": "x"}}}, "service.meta.bad key", "letters, digits"),
    ({"service": {"name": "a", "meta": {"k": 1}}}, "service.meta.k", "must be a string"),
    ({"service": {"name": "a", "check": {"tcp": "h:1"}}}, "service.check.interval", "required for a tcp check"),
    ({"service": {"name": "a", "check": {"tcp": "h:1", "ttl": "5s", "interval": "1s"}}}, "service.check",
     "one type"),
    ({"service": {"name": "a", "check": {"ttl": "5s", "interval": "1s"}}}, "service.check.interval",
     "no interval"),
    ({"service": {"name": "a", "check": {"name": "x"}}}, "service.check", "needs one of"),
    ({"service": {"name": "a", "check": {"tcp": "nohost", "interval": "1s"}}}, "service.check.tcp", "host:port"),
    ({"service": {"name": "a", "check": {"http": "ftp://x", "interval": "1s"}}}, "service.check.http", "URL"),
    ({"service": {"name": "a", "check": {"ttl": "5 seconds"}}}, "service.check.ttl", "invalid duration"),
    ({"service": {"name": "a", "check": {"ttl": "5s", "deregister_critical_service_after": "30s"}}},
     "service.check.deregister_critical_service_after", "at least 60s"),
    ({"service": {"name": "a", "checks": [{"id": "c", "ttl": "5s"}, {"id": "c", "ttl": "6s"}]}},
     "service.checks", "duplicate check id"),
    ({"service": {"name": "a", "weights": {"warning": 1}}}, "service.weights.passing", "required"),
    ({"service": {"name": "a", "connect": {"sidecar_service": {}}}}, "service.port", "required when"),
    ({"service": {"name": "a", "port": 1, "connect": {"sidecar_service": {"proxy": {
        "upstreams": [{"destination_name": "b"}]}}}}},
     "service.connect.sidecar_service.proxy.upstreams[0].local_bind_port", "required"),
    ({"service": {"name": "a", "port": 1, "connect": {"sidecar_service": {"proxy": {
        "upstreams": [{"local_bind_port": 2}]}}}}},
     "service.connect.sidecar_service.proxy.upstreams[0].destination_name", "required"),
    ({"service": {"name": "a", "port": 1, "connect": {"sidecar_service": {"proxy": {
        "upstreams": [{"destination_name": "b", "local_bind_port": 2},
                      {"destination_name": "c", "local_bind_port": 2}]}}}}},
     "service.connect.sidecar_service.proxy.upstreams[1].local_bind_port", "already used by upstreams[0]"),
    ({"service": {"name": "a", "port": 1, "connect": {"sidecar_service": {"proxy": {
        "upstream": [{"destination_name": "b", "local_bind_port": 2}]}}}}},
     "service.connect.sidecar_service.proxy.upstream", "unknown field"),
    ({"service": {"name": "a", "port": 1, "connect": {"native": True, "sidecar_service": {}}}},
     "service.connect.native", "no sidecar_service"),
    ({"service": {"name": "a", "kind": "mesh-gateway"}}, "service.kind", "only connect-proxy"),
    ({"service": {"name": "a", "kind": "connect-proxy"}}, "service.proxy", "required"),
    ({"service": {"name": "a", "Name": "b"}}, "service.Name", "given twice"),
    ({"services": [{"name": "a"}, {"name": "a"}]}, "services[1].id", "duplicate service id"),
    ({"servce": {"name": "a"}}, "servce", "unknown top-level key"),
    ({}, "", "no `service` or `services`"),
    ([1], "", "expected an object"),
])
def test_bad_definitions_name_the_field(data: object, field: str, words: str) -> None:
    with pytest.raises(ServiceDefinitionError) as err:
        parse_data(data)
    assert err.value.field == field
    assert words in err.value.problem
    if field:
        assert field in str(err.value)


def test_hcl_block_given_twice_where_one_is_expected() -> None:
    with pytest.raises(ServiceDefinitionError, match=r"service.connect: given 2 times"):
        parse('service {\n name = "a"\n port = 1\n connect {}\n connect {}\n}', fmt="hcl")


def test_syntax_errors_name_the_file() -> None:
    with pytest.raises(ServiceDefinitionError, match=r"^web.hcl: invalid HCL"):
        parse("service { name = ", source="web.hcl")
    with pytest.raises(ServiceDefinitionError, match=r"^web.json: invalid JSON at line 1"):
        parse('{"service": ', source="web.json")
    with pytest.raises(ServiceDefinitionError, match=r"^web.json: service.port"):
        parse('{"service": {"name": "a", "port": true}}', source="web.json")


@pytest.mark.parametrize("text", ["", "10", "s", "10 s", "1d", "-1s"])
def test_bad_durations_name_the_field(text: str) -> None:
    with pytest.raises(ServiceDefinitionError, match=r"service\.check\.interval"):
        parse_data({"service": {"name": "a", "check": {"http": "http://x/", "interval": text}}})
