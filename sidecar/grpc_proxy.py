"""gRPC proxied as gRPC: one generic handler that forwards calls as raw bytes over grpc.aio.

For every call the grpc.aio server asks :class:`ProxyHandler` for a handler by method path. A
method whose type is known to be unary (learned by reflection and published in Consul, see
``sidecar.methods``) gets a *unary* handler, the cheapest path through grpc.aio; every other method
(streaming, or unknown) gets a bidirectional stream handler, which is correct for all four kinds.

Both paths keep the call's meaning end to end: request metadata (``-bin`` keys included) minus
HTTP/2 and transport headers, the deadline (the remaining time becomes the upstream call's
timeout), the upstream's initial metadata, its responses, and its final status, details and
trailing metadata (``grpc-status-details-bin`` included). The caller sees the upstream's real
status: UNIMPLEMENTED stays UNIMPLEMENTED.

Where the call goes is decided by a :class:`Router` (outbound: pick an endpoint of the upstream;
inbound: authorize the caller, then the local app), which may refuse a call with a
:class:`Refusal` (e.g. PERMISSION_DENIED naming the rule).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import grpc.aio

from sidecar.limits import Limits
from sidecar.snapshot import UNARY

# Headers that belong to one HTTP/2 hop, not to the call.
_HOP_HEADERS = frozenset({
    ":authority", ":path", ":method", ":scheme", "user-agent", "te", "content-type", "grpc-timeout",
    "grpc-accept-encoding", "grpc-encoding", "accept-encoding", "host", "connection",
})

Metadata = tuple[tuple[str, str | bytes], ...]
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]


def forwardable(metadata: Any) -> Metadata:
    """The request metadata worth forwarding (drops hop-by-hop headers)."""
    if not metadata:
        return ()
    return tuple((k, v) for k, v in metadata if k not in _HOP_HEADERS)


def _md(metadata: Any) -> Metadata:
    return tuple((m[0], m[1]) for m in metadata or ())


def message_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def _metadata_options(limits: Limits) -> list[tuple[str, Any]]:
    # gRPC core refuses metadata above a soft limit (8 KiB by default) with some probability and above the
    # absolute one (16 KiB) always: both at the sidecar's header-list limit, like the h2 engine
    return [("grpc.max_metadata_size", limits.h2_max_header_list_size),
            ("grpc.absolute_max_metadata_size", limits.h2_max_header_list_size)]


def channel_options(max_message_bytes: int, limits: Limits) -> list[tuple[str, Any]]:
    """Options of the aio engine's channels (to upstreams, to the app): message and metadata sizes."""
    return [*message_options(max_message_bytes), *_metadata_options(limits)]


def server_options(max_message_bytes: int, limits: Limits) -> list[tuple[str, Any]]:
    """Options of the aio engine's servers: message and metadata sizes and the connection limits of ``limits``.

    Streams per connection are bounded by SETTINGS_MAX_CONCURRENT_STREAMS, open connections by
    ``grpc.max_allowed_incoming_connections``, and a connection without a call for ``idle_timeout``
    is closed by gRPC with GOAWAY (``grpc.max_connection_idle_ms``).
    """
    options = [*channel_options(max_message_bytes, limits),
               ("grpc.max_concurrent_streams", limits.h2_max_concurrent_streams),
               ("grpc.max_allowed_incoming_connections", limits.max_connections)]
    if limits.idle_timeout > 0:
        options.append(("grpc.max_connection_idle_ms", int(limits.idle_timeout * 1000)))
    return options


class Refusal(Exception):
    """Raised by a router to end a call with ``code`` and ``message`` before it is forwarded."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class UpstreamChannel:
    """A grpc.aio channel plus cached raw-bytes multicallables per method."""

    __slots__ = ("_stream", "_unary", "channel", "closing", "key")

    def __init__(self, channel: grpc.aio.Channel, key: str = "") -> None:
        self.channel = channel
        self.key = key
        self._unary: dict[str, Any] = {}
        self._stream: dict[str, Any] = {}
        self.closing = False

    def unary(self, method: str) -> Any:
        mc = self._unary.get(method)
        if mc is None:
            mc = self.channel.unary_unary(method, None, None)
            self._unary[method] = mc
        return mc

    def stream(self, method: str) -> Any:
        mc = self._stream.get(method)
        if mc is None:
            mc = self.channel.stream_stream(method, None, None)
            self._stream[method] = mc
        return mc


@dataclass(slots=True)
class Target:
    """Where one call goes; ``done`` is told the outcome (for load balancing)."""

    channel: UpstreamChannel
    done: Callable[[grpc.StatusCode, float], None] | None = None


class Router(Protocol):
    def route(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Target:
        """Choose where the call goes, or raise :class:`Refusal`."""

    def retry_target(self, method: str, failed: Target) -> Target | None:
        """Another target after a connect failure of ``failed`` (unary calls only), or None."""

    def record(self, method: str, code: grpc.StatusCode, seconds: float,
               context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Metrics and access log of a finished call."""


def _is_connect_failure(err: grpc.aio.AioRpcError) -> bool:
    if err.code() is not grpc.StatusCode.UNAVAILABLE:
        return False
    details = (err.details() or "").lower()
    return "connect" in details or "connection refused" in details or "handshake" in details


class ProxyHandler(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """The generic handler: unary handlers for known unary methods, bidi streams for the rest."""

    def __init__(self, router: Router, kinds: Callable[[], Mapping[str, str]]) -> None:
        self._router = router
        self._kinds = kinds
        self._handlers: dict[tuple[str, bool], Any] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        if isinstance(method, bytes):
            method = method.decode()
        unary = self._kinds().get(method) == UNARY
        key = (method, unary)
        handler = self._handlers.get(key)
        if handler is None:
            if len(self._handlers) > 4096:  # bounded: methods are few, garbage names are not
                self._handlers.clear()
            if unary:
                handler = grpc.unary_unary_rpc_method_handler(self._unary_fn(method))
            else:
                handler = grpc.stream_stream_rpc_method_handler(self._stream_fn(method))
            self._handlers[key] = handler
        return handler

    def _unary_fn(self, method: str) -> Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Any]:
        router = self._router

        async def unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                try:
                    target = router.route(method, context)
                except Refusal as refusal:
                    code = refusal.code
                    await context.abort(refusal.code, refusal.message)
                metadata = forwardable(context.invocation_metadata())
                timeout = context.time_remaining()
                while True:
                    t0 = time.perf_counter()
                    call = target.channel.unary(method)(request, metadata=metadata, timeout=timeout)
                    try:
                        response: bytes = await call
                    except grpc.aio.AioRpcError as err:
                        if target.done is not None:
                            target.done(err.code(), time.perf_counter() - t0)
                        if _is_connect_failure(err):
                            again = router.retry_target(method, target)
                            if again is not None:
                                target = again
                                if timeout is not None:
                                    timeout = context.time_remaining()
                                continue
                        code = err.code()
                        initial = err.initial_metadata()
                        if initial:
                            await context.send_initial_metadata(initial)
                        await context.abort(code, err.details() or "", _md(err.trailing_metadata()))
                    if target.done is not None:
                        target.done(grpc.StatusCode.OK, time.perf_counter() - t0)
                    initial = await call.initial_metadata()
                    if initial:
                        await context.send_initial_metadata(initial)
                    trailing = await call.trailing_metadata()
                    if trailing:
                        context.set_trailing_metadata(trailing)
                    return response
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            finally:
                router.record(method, code, time.perf_counter() - start, context)

        return unary

    def _stream_fn(self, method: str) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext[Any, Any]], Any]:
        router = self._router

        async def stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> None:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            call: Any = None
            target: Target | None = None
            try:
                try:
                    target = router.route(method, context)
                except Refusal as refusal:
                    code = refusal.code
                    await context.abort(refusal.code, refusal.message)
                call = target.channel.stream(method)(requests, metadata=forwardable(context.invocation_metadata()),
                                                     timeout=context.time_remaining())
                try:
                    initial = await call.initial_metadata()
                    if initial:
                        await context.send_initial_metadata(initial)
                    while True:
                        message = await call.read()
                        if message is _EOF:
                            break
                        await context.write(message)
                except grpc.aio.AioRpcError:
                    pass  # the status below says what happened
                code = await call.code()
                if target.done is not None:
                    target.done(code, time.perf_counter() - start)
                if code is not grpc.StatusCode.OK:
                    await context.abort(code, await call.details() or "", _md(await call.trailing_metadata()))
                trailing = await call.trailing_metadata()
                if trailing:
                    context.set_trailing_metadata(trailing)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                if call is not None:
                    call.cancel()
                raise
            finally:
                router.record(method, code, time.perf_counter() - start, context)

        return stream


def status_name(code: grpc.StatusCode) -> str:
    return str(code.name)
