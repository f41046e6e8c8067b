"""The request helpers: token order, blocking options, consistency (mocked requests, no sockets)."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from devagent.agent import Agent, AgentConfig
from devagent.http import HTTPError, Req


def _req(path: str, headers: dict[str, str] | None = None) -> Req:
    return Req(make_mocked_request("GET", path, headers=headers or {}), Agent(AgentConfig(node_name="n")))


def test_token_order_query_then_header_then_bearer() -> None:
    assert _req("/v1/kv/x?token=q", {"X-Consul-Token": "h", "Authorization": "Bearer b"}).token == "q"
    assert _req("/v1/kv/x", {"X-Consul-Token": "h", "Authorization": "Bearer b"}).token == "h"
    assert _req("/v1/kv/x", {"Authorization": "Bearer  b  extra"}).token == "b"
    assert _req("/v1/kv/x", {"Authorization": "bearer b"}).token == "b"
    assert _req("/v1/kv/x", {"Authorization": "Basic b"}).token == ""
    assert _req("/v1/kv/x", {"Authorization": "b"}).token == ""


def test_blocking_options_follow_consuls_rules() -> None:
    index, wait = _req("/v1/kv/x").blocking_options()
    assert index == 0 and 300 <= wait <= 300 * (1 + 1 / 16)
    index, wait = _req("/v1/kv/x?index=7&wait=2s").blocking_options()
    assert index == 7 and 2 <= wait <= 2 * (1 + 1 / 16)
    _, wait = _req("/v1/kv/x?index=7&wait=1h").blocking_options()
    assert 600 <= wait <= 600 * (1 + 1 / 16)  # capped at 10m
    with pytest.raises(HTTPError, match="Invalid index"):
        _req("/v1/kv/x?index=-1").blocking_options()
    with pytest.raises(HTTPError, match="Invalid wait time"):
        _req("/v1/kv/x?index=1&wait=soon").blocking_options()


def test_consistency_modes() -> None:
    assert _req("/v1/kv/x").consistency() == "leader"
    assert _req("/v1/kv/x?stale").consistency() == "stale"
    assert _req("/v1/kv/x?consistent").consistency() == "consistent"
    with pytest.raises(HTTPError, match="conflicting"):
        _req("/v1/kv/x?stale&consistent").consistency()
    with pytest.raises(HTTPError, match="No path to datacenter"):
        _req("/v1/kv/x?dc=other").check_dc()
    _req("/v1/kv/x?dc=dc1").check_dc()
