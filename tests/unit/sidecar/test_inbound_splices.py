"""The public port's splices into the full-path server: whose identity a local port stands for."""

from __future__ import annotations

from ca.identity import SpiffeId
from sidecar.inbound import Inbound
from sidecar.pipe import Pipe
from sidecar.telemetry import Telemetry
from sidecar.tls import TlsContexts


def _splice(inbound: Inbound, port: int, service: str) -> Pipe:
    pipe = Pipe()
    inbound._remember_splice(port, SpiffeId.for_service("example.org", service), pipe)
    pipe.info["local_port"] = port
    return pipe


def test_a_closed_splice_forgets_its_port_only_while_the_port_is_still_its_own() -> None:
    inbound = Inbound(lambda: None, Telemetry(), TlsContexts())  # type: ignore[arg-type,return-value]
    old = _splice(inbound, 40000, "web")
    new = _splice(inbound, 40000, "api")  # loopback reuses a just-closed port at once (tcp_tw_reuse)
    inbound._closed(old)  # the old splice's close is handled after the new splice took the port
    assert inbound.identities[40000].service == "api"
    inbound._closed(new)
    assert 40000 not in inbound.identities
