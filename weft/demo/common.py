"""What the demo's gRPC apps share: a grpc.aio server with grpc.health.v1 and server reflection."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

from weft.demo.v1 import demo_pb2

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"


def add_common_arguments(parser: argparse.ArgumentParser, *, default_port: int) -> None:
    parser.add_argument("-port", "--port", type=int, default=default_port,
                        help=f"port to listen on (default {default_port})")
    parser.add_argument("-host", "--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: only the sidecar reaches the app)")
    parser.add_argument("-log-level", "--log-level", default=os.environ.get("WEFT_LOG_LEVEL", "info"))


def upstream_default(env: str, fallback: str) -> str:
    """The address of an upstream: an environment variable (as Nomad templates set it) or a fallback."""
    return os.environ.get(env) or fallback


async def start_grpc_server(
    host: str, port: int, service_names: list[str], add: Sequence[Callable[[grpc.aio.Server], None]],
) -> tuple[grpc.aio.Server, health_aio.HealthServicer]:
    """Start a server with the given servicers, health (every service SERVING) and reflection."""
    server = grpc.aio.server()
    for register in add:
        register(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    full_names = [demo_pb2.DESCRIPTOR.services_by_name[n].full_name for n in service_names]
    reflection.enable_server_reflection([*full_names, HEALTH_SERVICE, REFLECTION_SERVICE], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    for name in ["", *full_names]:
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health
