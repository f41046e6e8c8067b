"""Learning the app's gRPC methods, and sharing them through Consul KV ``weft/methods/<service>``.

A sidecar asks its app through gRPC server reflection (``grpc.reflection.v1alpha``) which services it
offers and reads their file descriptors for each method's streaming kind; or it reads a
``FileDescriptorSet`` its owner points to (``--descriptor-set FILE``, as ``protoc
--descriptor_set_out`` writes). It publishes ``{"Service": ..., "Methods": {"/pkg.Svc/M": kind}}``
under ``weft/methods/<service>`` whenever that changes, so callers' sidecars can label their metrics
by method (names outside the table become ``unknown``). Reflection's own service and health checks are
included like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from google.protobuf import descriptor_pb2

from sidecar.protojson import message_to_json
from sidecar.snapshot import kind_of, validate_methods

log = structlog.get_logger("weft.sidecar.methods")

METHODS_PREFIX = "weft/methods/"
_REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def methods_key(service: str) -> str:
    return METHODS_PREFIX + service


def methods_of_files(files: list[descriptor_pb2.FileDescriptorProto]) -> dict[str, str]:
    """``{"/pkg.Service/Method": kind}`` for every service in these file descriptors."""
    out: dict[str, str] = {}
    for fd in files:
        prefix = f"{fd.package}." if fd.package else ""
        for svc in fd.service:
            for m in svc.method:
                out[f"/{prefix}{svc.name}/{m.name}"] = kind_of(m.client_streaming, m.server_streaming)
    return out


def methods_of_descriptor_set(data: bytes) -> dict[str, str]:
    """Methods of a serialized ``FileDescriptorSet`` (raises ValueError when it is not one)."""
    from google.protobuf import descriptor_pb2  # imported when needed: a sidecar rarely needs it

    fds = descriptor_pb2.FileDescriptorSet()
    try:
        fds.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError
        raise ValueError(f"not a FileDescriptorSet: {exc}") from None
    learnt.add_files(list(fds.file))
    return methods_of_files(list(fds.file))


class MessageTypes:
    """The request and response types of the methods whose descriptors this process learnt (by
    reflection or a descriptor set), to decode tap payload previews to JSON (``sidecar.tap``).

    One per process (:data:`learnt`): a sidecar serves one app, and what it learns about that app's
    messages is the same for every tap. Files that clash with ones already known are skipped."""

    def __init__(self) -> None:
        self._pool: Any = None
        self._files: set[str] = set()
        self._types: dict[str, tuple[str, str]] = {}  # method path -> (input type, output type)
        self._classes: dict[str, Any] = {}

    def add_files(self, files: list[descriptor_pb2.FileDescriptorProto]) -> None:
        from google.protobuf import descriptor_pool

        if self._pool is None:
            self._pool = descriptor_pool.DescriptorPool()
        pending = [f for f in files if f.name not in self._files]
        while pending:  # dependencies first; a file whose dependency never comes is given up
            progress = False
            for fd in list(pending):
                if all(dep in self._files or self._borrow(dep) for dep in fd.dependency):
                    pending.remove(fd)
                    progress = True
                    try:
                        self._pool.Add(fd)
                    except (TypeError, ValueError) as exc:  # a clash with a file already added
                        log.debug("descriptor_skipped", file=fd.name, error=str(exc)[:200])
                        continue
                    self._files.add(fd.name)
                    prefix = f"{fd.package}." if fd.package else ""
                    for svc in fd.service:
                        for m in svc.method:
                            self._types[f"/{prefix}{svc.name}/{m.name}"] = (m.input_type.lstrip("."),
                                                                             m.output_type.lstrip("."))
            if not progress:
                log.debug("descriptors_missing_dependencies", files=[f.name for f in pending])
                return

    def _borrow(self, name: str) -> bool:
        """A well-known file (google/protobuf/*.proto) from protobuf's own pool, when a server omitted it."""
        from google.protobuf import descriptor_pb2 as d
        from google.protobuf import descriptor_pool

        try:
            found = descriptor_pool.Default().FindFileByName(name)
        except KeyError:
            return False
        proto = d.FileDescriptorProto()
        found.CopyToProto(proto)
        try:
            self._pool.Add(proto)
        except (TypeError, ValueError):
            return False
        self._files.add(name)
        return True

    def knows(self, method: str) -> bool:
        return method in self._types

    def decode(self, method: str, is_request: bool, data: bytes) -> Any:
        """One message of ``method`` as JSON-able data, or None when its type is unknown."""
        types = self._types.get(method)
        if types is None:
            return None
        name = types[0] if is_request else types[1]
        cls = self._classes.get(name)
        if cls is None:
            from google.protobuf import message_factory

            cls = self._classes[name] = message_factory.GetMessageClass(self._pool.FindMessageTypeByName(name))
        msg = cls()
        msg.ParseFromString(data)
        return message_to_json(msg)


learnt = MessageTypes()


def encode(service: str, methods: dict[str, str]) -> bytes:
    return json.dumps({"Service": service, "Methods": dict(sorted(methods.items()))}, sort_keys=True).encode()


def decode(value: bytes | str | None, *, key: str = "") -> dict[str, str]:
    """The methods of a ``weft/methods/<service>`` value; raises ValueError naming what is wrong."""
    if not value:
        return {}
    try:
        doc = json.loads(value)
    except ValueError as exc:
        raise ValueError(f"{key}: not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("Methods"), dict):
        raise ValueError(f"{key}: expected an object with a Methods object")
    return validate_methods(doc["Methods"], what=key or "methods")


# -- reflection client (raw bytes over a generic stream, no generated stubs needed) ---------------

def _request(**fields: Any) -> bytes:
    from grpc_reflection.v1alpha import reflection_pb2

    return bytes(reflection_pb2.ServerReflectionRequest(**fields).SerializeToString())


def _response(data: bytes) -> Any:
    from grpc_reflection.v1alpha import reflection_pb2

    resp = reflection_pb2.ServerReflectionResponse()
    resp.ParseFromString(data)
    return resp


async def reflect(target: str, timeout: float = 5.0) -> dict[str, str]:
    """Ask the app at ``target`` (host:port, plaintext) for its methods by server reflection.

    Raises sidecar.grpc_client.RpcError (UNIMPLEMENTED when the app has no reflection, UNAVAILABLE when
    it does not answer yet) or ValueError. It uses the sidecar's own HTTP/2 client, not grpc.aio, so
    that grpc's C core is not started in the sidecar for it (see sidecar.grpc_client).
    """
    from sidecar.grpc_client import Channel

    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"app address {target!r}: expected host:port")
    channel = Channel(host.strip("[]"), int(port), connect_timeout=timeout)
    try:
        async def one(request: bytes) -> Any:
            # one request per stream, half-closed at once: the server answers it and ends the stream
            async with contextlib.aclosing(channel.stream(_REFLECTION, [request], timeout=timeout)) as answers:
                async for data in answers:
                    return _response(data)
            raise ValueError("the reflection service sent no answer")

        listing = await one(_request(list_services=""))
        names = [s.name for s in listing.list_services_response.service]
        from google.protobuf import descriptor_pb2

        files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        for name in names:
            resp = await one(_request(file_containing_symbol=name))
            if resp.HasField("error_response"):
                log.debug("reflection_symbol_failed", symbol=name, error=resp.error_response.error_message)
                continue
            for raw in resp.file_descriptor_response.file_descriptor_proto:
                fd = descriptor_pb2.FileDescriptorProto()
                fd.ParseFromString(raw)
                files[fd.name] = fd
        methods = methods_of_files(list(files.values()))
        learnt.add_files(list(files.values()))
        # keep only services the server says it offers (a file may declare others)
        offered = set(names)
        return {p: k for p, k in methods.items() if p.split("/")[1] in offered}
    finally:
        channel.close()


async def learn(target: str, *, stop: asyncio.Event, attempts: int | None = None,
                interval: float = 1.0) -> dict[str, str] | None:
    """Reflect until it answers (the app may start after its sidecar); None when it has no reflection."""
    from sidecar.grpc_client import UNIMPLEMENTED, RpcError

    n = 0
    delay = interval
    while not stop.is_set():
        n += 1
        try:
            return await reflect(target)
        except RpcError as exc:
            if exc.code == UNIMPLEMENTED:
                log.info("reflection_unavailable", app=target, note="methods stay unknown: generic path")
                return None
            log.debug("reflection_failed", app=target, code=exc.name)
        except (TimeoutError, ValueError, OSError) as exc:
            log.debug("reflection_failed", app=target, error=str(exc))
        if attempts is not None and n >= attempts:
            return None
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except TimeoutError:
            pass
        delay = min(delay * 2, 15.0)
    return None
