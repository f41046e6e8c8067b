"""CONSUL_HTTP_TOKEN and ACL errors end to end against a dev agent with ACLs enabled."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from catalog.client import ConsulACLDisabled, ConsulClient, ConsulPermissionDenied
from tests.integration.catalog.helpers import client_for
from tests.support import DevAgent

pytestmark = pytest.mark.integration

ROOT = "weft-test-root-token"


@pytest.fixture(scope="module")
def acl_agent() -> Iterator[DevAgent]:
    agent = DevAgent("-acl-enabled", "-acl-initial-management", ROOT)
    try:
        yield agent
    finally:
        agent.stop()


async def test_token_from_environment_is_used(acl_agent: DevAgent) -> None:
    async with ConsulClient.from_env({**acl_agent.env, "CONSUL_HTTP_TOKEN": ROOT}) as c:
        assert await c.kv_put("acl/k", b"v")
        _, e = await c.kv_get("acl/k")
        assert e is not None and e.value == b"v"
        me = await c.acl_token_self()
        assert me.accessor_id
        assert ROOT not in repr(me)


async def test_without_token_permission_denied(acl_agent: DevAgent) -> None:
    async with client_for(acl_agent) as anon:
        with pytest.raises(ConsulPermissionDenied) as err:
            await anon.kv_get("acl/k")
        assert ROOT not in str(err.value)
        # a per-call token overrides the client's (none here)
        _, e = await anon.kv_get("acl/missing", token=ROOT)
        assert e is None


async def test_acl_endpoint_with_acls_off_is_acl_disabled(module_agent: DevAgent) -> None:
    async with client_for(module_agent) as c:
        with pytest.raises(ConsulACLDisabled):
            await c.acl_token_self()
