"""``/v1/discovery-chain/:service`` against a running dev agent, through raw HTTP: GET and POST with
overrides, ``?compile-dc``, blocking queries woken by a config entry write, bad bodies, ACLs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.devagent.b_http import call
from tests.support import DevAgent

pytestmark = pytest.mark.integration

MGMT = "6d2f0bd4-5b47-4d38-9d6e-0000000000cc"


@pytest.fixture(scope="module")
def acl_agent() -> Iterator[DevAgent]:
    agent = DevAgent("-acl-enabled", "-acl-default-policy", "deny", "-acl-initial-management", MGMT)
    try:
        yield agent
    finally:
        agent.stop()


def _put(url: str, entry: dict[str, Any], token: str | None = None) -> None:
    status, body, _ = call(url, "PUT", "/v1/config", entry, token=token)
    assert (status, body) == (200, True), body


def test_chain_of_a_canary_split_and_header_route(module_agent: DevAgent) -> None:
    url = module_agent.url
    status, body, headers = call(url, "GET", "/v1/discovery-chain/greeter")
    assert status == 200 and body["Chain"]["Default"] is True and body["Chain"]["Protocol"] == "tcp"
    index = int(headers["X-Consul-Index"])
    _put(url, {"Kind": "service-defaults", "Name": "greeter", "Protocol": "grpc"})
    _put(url, {"Kind": "service-resolver", "Name": "greeter", "DefaultSubset": "v1",
               "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"},
                           "v2": {"Filter": "Service.Meta.version == v2"}}})
    _put(url, {"Kind": "service-splitter", "Name": "greeter",
               "Splits": [{"Weight": 90, "ServiceSubset": "v1"}, {"Weight": 10, "ServiceSubset": "v2"}]})
    _put(url, {"Kind": "service-router", "Name": "greeter", "Routes": [
        {"Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "1"}]}},
         "Destination": {"ServiceSubset": "v2", "RequestTimeout": "2s", "NumRetries": 2,
                         "RetryOn": ["unavailable"]}}]})
    status, body, headers = call(url, "GET", "/v1/discovery-chain/greeter")
    assert status == 200 and int(headers["X-Consul-Index"]) > index
    chain = body["Chain"]
    assert chain["Protocol"] == "grpc" and chain["StartNode"] == "router:greeter.default.default"
    routes = chain["Nodes"]["router:greeter.default.default"]["Routes"]
    assert [r["NextNode"] for r in routes] == ["resolver:v2.greeter.default.default.dc1",
                                               "splitter:greeter.default.default"]
    splits = chain["Nodes"]["splitter:greeter.default.default"]["Splits"]
    assert [(s["Weight"], s["NextNode"]) for s in splits] == [(90, "resolver:v1.greeter.default.default.dc1"),
                                                               (10, "resolver:v2.greeter.default.default.dc1")]
    target = chain["Targets"]["v2.greeter.default.default.dc1"]
    assert target["Subset"] == {"Filter": "Service.Meta.version == v2"} and target["ConnectTimeout"] == "5s"
    assert target["SNI"].startswith("v2.greeter.default.dc1.internal.") and target["SNI"].endswith(".consul")
    # compile-dc
    status, body, _ = call(url, "GET", "/v1/discovery-chain/greeter?compile-dc=dc9")
    assert status == 200 and "v1.greeter.default.default.dc9" in body["Chain"]["Targets"]


def test_post_overrides_and_bad_bodies(module_agent: DevAgent) -> None:
    url = module_agent.url
    _put(url, {"Kind": "service-resolver", "Name": "pay", "Redirect": {"Datacenter": "dc2"}})
    status, body, _ = call(url, "POST", "/v1/discovery-chain/pay", {
        "OverrideConnectTimeout": "7s", "OverrideProtocol": "grpc", "OverrideMeshGateway": {"Mode": "remote"}})
    assert status == 200, body
    chain = body["Chain"]
    assert chain["Protocol"] == "grpc" and len(chain["CustomizationHash"]) == 8
    assert chain["Nodes"]["resolver:pay.default.default.dc2"]["Resolver"]["ConnectTimeout"] == "7s"
    assert chain["Targets"]["pay.default.default.dc2"]["MeshGateway"] == {"Mode": "remote"}
    status, body, _ = call(url, "POST", "/v1/discovery-chain/pay", {"override_connect_timeout": "3s"})
    assert status == 200 and body["Chain"]["Targets"]["pay.default.default.dc2"]["ConnectTimeout"] == "3s"
    status, body, _ = call(url, "POST", "/v1/discovery-chain/pay", {"OverrideMeshGateway": {"Mode": "sideways"}})
    assert (status, body) == (400, b"Invalid OverrideMeshGateway.Mode parameter")
    status, body, _ = call(url, "POST", "/v1/discovery-chain/pay", {"OverrideConnectTimeout": "soon"})
    assert status == 400 and body.startswith(b"Request decoding failed: ")
    status, body, _ = call(url, "POST", "/v1/discovery-chain/pay", b"{not json")
    assert status == 400 and body.startswith(b"Request decoding failed")
    status, body, _ = call(url, "GET", "/v1/discovery-chain/")
    assert (status, body) == (400, b"Missing chain name")


def test_blocking_query_wakes_on_a_config_write(module_agent: DevAgent) -> None:
    url = module_agent.url
    _, _, headers = call(url, "GET", "/v1/discovery-chain/blk")
    index = int(headers["X-Consul-Index"])
    got: dict[str, Any] = {}

    def wait() -> None:
        got["answer"] = call(url, "GET", f"/v1/discovery-chain/blk?index={index}&wait=20s")

    t = threading.Thread(target=wait)
    t.start()
    _put(url, {"Kind": "service-resolver", "Name": "blk", "ConnectTimeout": "9s"})
    t.join(30)
    status, body, headers = got["answer"]
    assert status == 200 and int(headers["X-Consul-Index"]) > index
    assert body["Chain"]["Nodes"]["resolver:blk.default.default.dc1"]["Resolver"]["ConnectTimeout"] == "9s"


def test_acl_service_read(acl_agent: DevAgent) -> None:
    url = acl_agent.url
    status, _, _ = call(url, "GET", "/v1/discovery-chain/web")
    assert status == 403
    policy = {"Name": "web-read", "Rules": 'service "web" { policy = "read" }'}
    status, body, _ = call(url, "PUT", "/v1/acl/policy", policy, token=MGMT)
    assert status == 200, body
    status, tok, _ = call(url, "PUT", "/v1/acl/token", {"Policies": [{"Name": "web-read"}]}, token=MGMT)
    assert status == 200, tok
    status, body, _ = call(url, "GET", "/v1/discovery-chain/web", token=tok["SecretID"])
    assert status == 200 and body["Chain"]["ServiceName"] == "web"
    status, _, _ = call(url, "GET", "/v1/discovery-chain/db", token=tok["SecretID"])
    assert status == 403
