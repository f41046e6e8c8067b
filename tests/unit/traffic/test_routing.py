"""Routing a call through a compiled chain: matches, splits, rewrites, timeouts, retry conditions."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from catalog.chain import HeaderMods
from sidecar.routing import (
    NO_RETRIES,
    NoRoute,
    Outcome,
    Request,
    RetryPolicy,
    RouteTable,
    apply_header_mods,
    retryable,
    route_call,
)
from tests.unit.traffic.chains import compile_entries, greeter_canary


def _req(path: str, method: str = "POST", **headers: str) -> Request:
    return Request(method, path, {k.replace("_", "-"): v for k, v in headers.items()})


def test_split_converges_to_its_weights_over_10000_calls() -> None:
    chain = greeter_canary()
    rng = random.Random(7)
    counts = {"v1": 0, "v2": 0}
    for _ in range(10_000):
        d = route_call(chain, _req("/demo.v1.Greeter/SayHello"), rng.random() * 100)
        counts[d.subset] += 1
    assert abs(counts["v1"] / 10_000 - 0.90) <= 0.02 and abs(counts["v2"] / 10_000 - 0.10) <= 0.02


def test_header_route_and_grpc_method_route() -> None:
    chain = greeter_canary()
    d = route_call(chain, _req("/demo.v1.Greeter/SayHello", x_canary="1"), 0.0)
    assert (d.route_index, d.subset, d.target.id) == (0, "v2", "v2.greeter.default.default.dc1")
    d = route_call(chain, _req("/demo.v1.Greeter/SlowHello"), 99.9)
    assert (d.route_index, d.subset, d.request_timeout) == (1, "v1", 0.2)
    assert d.retry == RetryPolicy(3, frozenset({"unavailable", "cancelled"}), frozenset())
    assert d.failover[0].id == "v2.greeter.default.default.dc1"  # v1 fails over to v2
    d = route_call(chain, _req("/demo.v1.Greeter/SayHello", x_canary="0"), 95.0)
    assert (d.route_index, d.subset, d.route_label) == (3, "v2", "3")  # catch-all, then the split's 10 %


def test_prefix_rewrite_methods_query_and_header_mods() -> None:
    chain = greeter_canary()
    d = route_call(chain, _req("/api/users?beta=&x=1", method="GET"), 0.0)
    assert (d.route_index, d.path, d.subset) == (2, "/v2/users?beta=&x=1", "v2")
    assert d.retry.conditions == {"connect-failure"} and d.retry.status_codes == {503} and d.retry.num_retries == 1
    assert apply_header_mods([("x-drop", "1"), ("x-routed", "old"), ("a", "b")], d.request_headers) == [
        ("a", "b"), ("x-routed", "beta")]
    assert route_call(chain, _req("/api/users?beta", method="POST"), 0.0).route_index == 3  # method differs
    assert route_call(chain, _req("/api/users", method="GET"), 0.0).route_index == 3  # no beta parameter


def test_header_match_kinds_and_invert() -> None:
    http = [{"Kind": "service-defaults", "Name": "web", "Protocol": "http"}]

    def route(match: dict[str, object]) -> int:
        chain = compile_entries("web", *http, {"Kind": "service-router", "Name": "web", "Routes": [
            {"Match": {"HTTP": {"Header": [match]}}, "Destination": {"Service": "web"}}]})
        return route_call(chain, _req("/", user_agent="curl/8.1", x_env="prod"), 0.0).route_index

    assert route({"Name": "user-agent", "Prefix": "curl/"}) == 0
    assert route({"Name": "user-agent", "Suffix": "8.1"}) == 0
    assert route({"Name": "user-agent", "Regex": "curl/[0-9.]+"}) == 0
    assert route({"Name": "user-agent", "Regex": "curl"}) == 1  # a regex matches the whole value
    assert route({"Name": "x-missing", "Present": True}) == 1
    assert route({"Name": "x-env", "Exact": "prod", "Invert": True}) == 1
    regex_chain = compile_entries("web", *http, {"Kind": "service-router", "Name": "web", "Routes": [
        {"Match": {"HTTP": {"PathRegex": "/item/[0-9]+"}}, "Destination": {"Service": "web"}}]})
    assert route_call(regex_chain, _req("/item/42?x"), 0.0).route_index == 0
    assert route_call(regex_chain, _req("/item/42/more"), 0.0).route_index == 1


def test_default_chain_and_no_route() -> None:
    chain = compile_entries("db")
    d = route_call(chain, _req("/anything"), 50.0)
    assert (d.route_index, d.target.id, d.retry, d.connect_timeout) == (-1, "db.default.default.dc1", NO_RETRIES, 5.0)
    # a chain document a real Consul cannot produce (no catch-all) still ends in an error, not a crash
    router = compile_entries(
        "web", {"Kind": "service-defaults", "Name": "web", "Protocol": "http"},
        {"Kind": "service-router", "Name": "web", "Routes": [{"Match": {"HTTP": {"PathExact": "/a"}}}]})
    start = router.start
    nodes = dict(router.nodes)
    nodes[router.start_node] = replace(start, routes=start.routes[:1])
    with pytest.raises(NoRoute):
        route_call(replace(router, nodes=nodes), _req("/b"), 0.0)


def test_route_table_decides_as_route_call_does() -> None:
    """The call path's table (memo per request, cumulative weights) against the plain walk."""
    chain = greeter_canary()
    table = RouteTable(chain)
    assert table.header_names == tuple(sorted({h.name for r in chain.start.routes for h in r.match.headers}))
    requests = [_req("/demo.v1.Greeter/SayHello"), _req("/demo.v1.Greeter/SayHello", x_canary="1"),
                _req("/demo.v1.Greeter/SayHello", x_canary="0"), _req("/demo.v1.Greeter/SlowHello"),
                _req("/api/users?beta=&x=1", method="GET"), _req("/api/users?beta", method="POST"),
                _req("/api/users", method="GET"), _req("/" + "x" * 600)]
    rng = random.Random(3)
    draws = [0.0, 89.99, 90.0, 99.99, 100.0, *(rng.random() * 100 for _ in range(200))]
    for _ in range(2):  # the second round is answered from the table's memo
        for req in requests:
            for draw in draws:
                assert table.decide(req.method, req.path, req.headers, draw) == route_call(chain, req, draw)
    start = replace(chain.start, routes=chain.start.routes[:1])  # no catch-all: NoRoute, remembered too
    no_catch_all = RouteTable(replace(chain, nodes={**chain.nodes, chain.start_node: start}))
    for _ in range(2):
        with pytest.raises(NoRoute, match="no route of greeter matches POST /b"):
            no_catch_all.decide("POST", "/b", {}, 0.0)
    default = compile_entries("db")
    assert RouteTable(default).decide("POST", "/x", {}, 50.0) == route_call(default, _req("/x"), 50.0)


@pytest.mark.parametrize(("conditions", "codes", "outcome", "expected"), [
    ({"unavailable"}, (), Outcome(http_status=200, grpc_status=14), True),
    ({"unavailable"}, (), Outcome(http_status=200, grpc_status=13), False),
    ({"cancelled", "deadline-exceeded", "internal", "resource-exhausted"}, (), Outcome(grpc_status=8), True),
    ({"5xx"}, (), Outcome(http_status=502), True),
    ({"5xx"}, (), Outcome(reset=True), True),
    ({"5xx"}, (), Outcome(connect_failure=True), True),
    ({"gateway-error"}, (), Outcome(http_status=500), False),
    ({"gateway-error"}, (), Outcome(http_status=503), True),
    ({"connect-failure"}, (), Outcome(connect_failure=True), True),
    ({"connect-failure"}, (), Outcome(reset=True), False),
    ({"reset"}, (), Outcome(reset=True), True),
    ({"refused-stream"}, (), Outcome(refused_stream=True), True),
    ({"retriable-4xx"}, (), Outcome(http_status=409), True),
    ({"envoy-ratelimited"}, (), Outcome(http_status=429, mesh_ratelimited=True), True),
    ({"envoy-ratelimited"}, (), Outcome(http_status=429), False),
    (set(), (503,), Outcome(http_status=503), True),
    (set(), (503,), Outcome(http_status=500), False),
])
def test_retry_conditions(conditions: set[str], codes: tuple[int, ...], outcome: Outcome, expected: bool) -> None:
    assert retryable(RetryPolicy(2, frozenset(conditions), frozenset(codes)), outcome) is expected


def test_header_mods_order() -> None:
    mods = (HeaderMods(add=(("a", "2"),)), HeaderMods(set=(("a", "3"),), remove=("b",)))
    assert apply_header_mods([("a", "1"), ("b", "x")], mods) == [("a", "3")]
