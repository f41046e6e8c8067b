"""Compiled chains for the traffic tests, built by the dev agent's compiler from plain entries."""

from __future__ import annotations

from typing import Any

from catalog.chain import CompiledChain, parse_chain
from devagent import chaincompile, configcheck


def compile_entries(service: str, *entries: dict[str, Any]) -> CompiledChain:
    table = {(e["Kind"], e["Name"]): configcheck.normalize_and_validate(e) for e in entries}
    return parse_chain({"Chain": chaincompile.compile_chain(lambda k, n: table.get((k, n)), service).chain})


def greeter_canary() -> CompiledChain:
    """The tour's canary: grpc greeter, v1/v2 subsets, a 90/10 split and a header route to v2."""
    return compile_entries(
        "greeter",
        {"Kind": "service-defaults", "Name": "greeter", "Protocol": "grpc"},
        {"Kind": "service-resolver", "Name": "greeter", "DefaultSubset": "v1",
         "Subsets": {"v1": {"Filter": "Service.Meta.version == v1"}, "v2": {"Filter": "Service.Meta.version == v2"}},
         "Failover": {"v1": {"ServiceSubset": "v2"}}},
        {"Kind": "service-splitter", "Name": "greeter",
         "Splits": [{"Weight": 90, "ServiceSubset": "v1"}, {"Weight": 10, "ServiceSubset": "v2"}]},
        {"Kind": "service-router", "Name": "greeter", "Routes": [
            {"Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "1"}]}},
             "Destination": {"ServiceSubset": "v2"}},
            {"Match": {"HTTP": {"PathExact": "/demo.v1.Greeter/SlowHello"}},
             "Destination": {"ServiceSubset": "v1", "RequestTimeout": "200ms", "NumRetries": 3,
                             "RetryOn": ["unavailable", "cancelled"]}},
            {"Match": {"HTTP": {"PathPrefix": "/api/", "Methods": ["GET"],
                                "QueryParam": [{"Name": "beta", "Present": True}]}},
             "Destination": {"ServiceSubset": "v2", "PrefixRewrite": "/v2/", "RetryOnStatusCodes": [503],
                             "RetryOnConnectFailure": True,
                             "RequestHeaders": {"Set": {"x-routed": "beta"}, "Remove": ["x-drop"]}}},
        ]})
