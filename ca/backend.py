"""What the CA needs from Consul, as small Protocols (no I/O here).

``ca`` must not import ``catalog`` (see DESIGN.md), so the CA states what it needs and
``weft/cmd_ca.py`` wires in implementations built on ``catalog`` (tests use in-memory fakes):

- :class:`KV`: get, put with check-and-set, blocking get;
- :class:`LeaderLock`: one holder of ``weft/ca/leader`` through a Consul session;
- :class:`Registry`: register the CA as service ``weft-ca`` with a TTL health check, and find it;
- :class:`AclApi`: ``/v1/acl/token/self`` with the caller's token, policies and roles by id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

KEY_ROOTS = "weft/ca/roots"
KEY_STATE = "weft/ca/state"
KEY_CLUSTER_ID = "weft/ca/cluster-id"
KEY_LEADER = "weft/ca/leader"
SERVICE_NAME = "weft-ca"


class BackendError(Exception):
    """Consul could not be reached or answered with an error."""


class TokenRejected(Exception):
    """Consul does not know the token (or it expired): the caller has no rights."""


@dataclass(frozen=True, slots=True)
class KVEntry:
    key: str
    value: bytes
    modify_index: int


class KV(Protocol):
    async def get(self, key: str) -> KVEntry | None: ...

    async def put(self, key: str, value: bytes, *, cas: int | None = None) -> bool:
        """Write ``value``; with ``cas`` only if the key's ModifyIndex is ``cas`` (0: only if absent)."""
        ...

    async def watch(self, key: str, index: int, wait_s: float) -> tuple[KVEntry | None, int]:
        """Blocking read: returns when the key changes past ``index`` or after ``wait_s``."""
        ...


class LeaderLock(Protocol):
    async def acquire(self) -> None:
        """Block until this process holds the lock."""
        ...

    async def wait_lost(self) -> None:
        """Return when the lock has been lost (session invalidated or renewal failed)."""
        ...

    async def release(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ServiceAddress:
    id: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    active: bool = False  # its health check says "active"


class Registry(Protocol):
    async def register(self, service_id: str, address: str, port: int, tags: list[str], ttl_s: float) -> None: ...

    async def pass_check(self, service_id: str, note: str) -> None: ...

    async def deregister(self, service_id: str) -> None: ...

    async def healthy(self, service: str) -> list[ServiceAddress]: ...


class AclApi(Protocol):
    async def token_self(self, token: str) -> dict[str, Any] | None:
        """The token's own description (AccessorID, Policies, Roles, ServiceIdentities, ...).

        ``None`` when ACLs are disabled; raises :class:`TokenRejected` for an unknown token.
        """
        ...

    async def policy(self, policy_id: str) -> dict[str, Any]: ...

    async def role(self, role_id: str) -> dict[str, Any]: ...
