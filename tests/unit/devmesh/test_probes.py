"""When `weft dev` counts a sidecar as knowing its upstreams: from its /config document, as plain values."""

from __future__ import annotations

from typing import Any

from devmesh.probes import endpoints_known


def _config(**upstreams: dict[str, Any]) -> dict[str, Any]:
    return {"snapshot": {"upstreams": upstreams}}


def test_every_upstream_needs_an_endpoint() -> None:
    assert endpoints_known(_config(store={"endpoints": ["127.0.0.1:21300"], "chain": None}))
    assert not endpoints_known(_config(store={"endpoints": [], "chain": None}))
    assert endpoints_known(_config())


def test_a_routed_upstream_needs_an_endpoint_in_every_target_of_its_chain() -> None:
    chain = {"targets": {"v1.greeter.default.default.dc1": {"endpoints": ["127.0.0.1:21200"]},
                         "v2.greeter.default.default.dc1": {"endpoints": []}}}
    assert not endpoints_known(_config(greeter={"endpoints": ["127.0.0.1:21200"], "chain": chain}))
    chain["targets"]["v2.greeter.default.default.dc1"]["endpoints"] = ["127.0.0.1:21201"]
    assert endpoints_known(_config(greeter={"endpoints": ["127.0.0.1:21200"], "chain": chain}))


def test_a_document_of_another_shape_is_not_ready() -> None:
    for doc in (None, [], {"snapshot": []}, {"snapshot": {"upstreams": {"x": "y"}}}):
        assert not endpoints_known(doc)
