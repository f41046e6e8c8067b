"""The sidecar's connection to the CA: a `ca.client.CAConnector` on `sidecar.grpc_client`.

It behaves as `ca.client.GrpcCA` does (same RPCs, same messages, same TLS verification: the CA's
certificate must chain to the trust bundle's roots and name `weft-ca.svc.<ns>.<trust-domain>`; a
replica that answers UNAVAILABLE or DEADLINE_EXCEEDED is skipped for the next one; any other status is
a `CARefused`), without starting grpc's C core in the sidecar (see sidecar.grpc_client for why).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

from ca.backend import SERVICE_NAME
from ca.client import CARefused, CAUnavailable, Resolver, SignResult, ca_addresses
from ca.identity import SpiffeId
from ca.provider import TrustBundle
from ca.v1 import ca_pb2
from ca.wire import bundle_from_pb
from sidecar.grpc_client import CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE, Channel, RpcError

SIGN = "/weft.ca.v1.CA/Sign"
WATCH_ROOTS = "/weft.ca.v1.CA/WatchRoots"
_SKIP = (UNAVAILABLE, DEADLINE_EXCEEDED)


class Status(NamedTuple):
    """A refusal's gRPC status, as `CARefused.code` carries it (grpc.StatusCode has the same `name`)."""

    value: int
    name: str


def _refused(exc: RpcError) -> CARefused:
    return CARefused(Status(exc.code, exc.name), exc.details)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise CAUnavailable(f"bad CA address {address!r}: expected host:port")
    return host.strip("[]"), int(port)


class H2CA:
    """Talks to the CA's replicas over TLS; tries each address until one answers."""

    RETIRED_CHANNEL_GRACE_S = 600.0

    def __init__(self, resolve: Resolver, *, namespace: str = "default", timeout_s: float = 15.0) -> None:
        self._resolve = resolve
        self._namespace = namespace
        self._timeout = timeout_s
        self._channels: dict[tuple[str, str], Channel] = {}
        self._retired: list[Channel] = []

    def _channel(self, address: str, bundle: TrustBundle) -> Channel:
        roots = bundle.roots_pem
        key = (address, roots)
        channel = self._channels.get(key)
        if channel is None:
            # new roots: new connections verify against them; a WatchRoots stream may still run on the
            # old connection, so it is closed only after a grace period (as GrpcCA does)
            for old_key in [k for k in self._channels if k[0] == address]:
                self._retire(self._channels.pop(old_key))
            target = SpiffeId.for_service(bundle.trust_domain, SERVICE_NAME, namespace=self._namespace).dns_name
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=roots)
            context.set_alpn_protocols(["h2"])
            host, port = _split(address)
            channel = Channel(host, port, ssl_context=context, server_hostname=target,
                              connect_timeout=self._timeout)
            self._channels[key] = channel
        return channel

    def _retire(self, channel: Channel) -> None:
        self._retired.append(channel)
        asyncio.get_running_loop().call_later(self.RETIRED_CHANNEL_GRACE_S, self._close_retired, channel)

    def _close_retired(self, channel: Channel) -> None:
        if channel in self._retired:
            self._retired.remove(channel)
            channel.close()

    async def _addresses(self) -> list[str]:
        return await ca_addresses(self._resolve)

    async def sign(self, csr: bytes, *, token: str, current_chain: bytes, proof: bytes, ttl_seconds: int,
                   bundle: TrustBundle | None) -> SignResult:
        if bundle is None:
            raise CAUnavailable("no trust bundle yet: cannot verify the CA")
        request = ca_pb2.SignRequest(csr=csr, token=token, current_chain=current_chain, renewal_proof=proof,
                                     ttl_seconds=ttl_seconds).SerializeToString()
        errors: list[str] = []
        for address in await self._addresses():
            try:
                data = await self._channel(address, bundle).unary(SIGN, request, timeout=self._timeout)
            except RpcError as exc:
                if exc.code in _SKIP:
                    errors.append(f"{address}: {exc.details}")
                    continue
                raise _refused(exc) from None
            resp: Any = ca_pb2.SignResponse.FromString(data)
            new_bundle = bundle_from_pb(resp.bundle) if resp.HasField("bundle") else None
            return SignResult(resp.leaf_pem, tuple(resp.chain_pem), new_bundle)
        raise CAUnavailable("no CA replica could sign: " + "; ".join(errors))

    async def watch_roots(self, known_index: int, bundle: TrustBundle | None) -> AsyncIterator[TrustBundle]:
        """Stream bundles from the first replica that serves the stream; raises CAUnavailable when none."""
        if bundle is None:
            raise CAUnavailable("no trust bundle yet: cannot verify the CA")
        request = ca_pb2.WatchRootsRequest(known_index=known_index).SerializeToString()
        errors: list[str] = []
        for address in await self._addresses():
            try:
                async with contextlib.aclosing(self._channel(address, bundle).stream(WATCH_ROOTS, [request])) as it:
                    async for data in it:
                        yield bundle_from_pb(ca_pb2.TrustBundle.FromString(data))
                errors.append(f"{address}: stream ended")
            except RpcError as exc:
                if exc.code not in (*_SKIP, CANCELLED):
                    raise _refused(exc) from None
                errors.append(f"{address}: {exc.details}")
        raise CAUnavailable("no CA replica serves WatchRoots: " + "; ".join(errors))

    async def close(self) -> None:
        for channel in [*self._channels.values(), *self._retired]:
            channel.close()
        self._channels.clear()
        self._retired.clear()
