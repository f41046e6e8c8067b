"""The h2 engine's upstream mTLS (client side, on memory BIOs) refuses a peer that is not the service it dialled.

In one process on loopback: web's outbound dials "api", whose public port presents a certificate of the
wrong service (the mesh's CA, but "db") or of another CA. The call gets UNAVAILABLE naming the upstream,
the handshake error is counted by reason, and the app behind the peer never sees the call.
"""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

from sidecar.inbound import Inbound
from sidecar.outbound import Outbound
from sidecar.telemetry import Telemetry
from sidecar.tls import TlsContexts
from tests.apps.echo import echo_pb2, echo_pb2_grpc
from tests.apps.echo import server as echo_server
from tests.integration.sidecar.harness import Authority, Holder, snapshot, table
from tests.support import free_port

pytestmark = pytest.mark.integration


def _tls_errors(tel: Telemetry, reason: str) -> float:
    return tel.registry.get_sample_value("weft_tls_handshake_errors_total",
                                         {"direction": "outbound", "reason": reason}) or 0.0


@pytest.mark.parametrize("peer", ["wrong_service", "untrusted", "right"])
async def test_upstream_connection_checks_the_peer_certificate(peer: str) -> None:
    ca = Authority.root()
    served = {"wrong_service": ca.leaf("db"), "untrusted": Authority.root().leaf("api"), "right": ca.leaf("api")}[peer]
    app, app_port, _ = await echo_server.start(0, name="api-1")
    api_holder = Holder(snapshot("api", served, app_port=app_port, policy=table("api", ("web", "allow"))))
    inbound = Inbound(api_holder, Telemetry(), TlsContexts())
    public = await inbound.start("127.0.0.1", 0)
    local = free_port()
    web_tel = Telemetry()
    outbound = Outbound(Holder(snapshot("web", ca.leaf("web"), upstreams={"api": (local, [public], "grpc")},
                                        policy=table("web"))), web_tel, TlsContexts())
    await outbound.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{local}")
    stub = echo_pb2_grpc.EchoStub(channel)  # type: ignore[no-untyped-call]
    try:
        if peer == "right":
            assert (await stub.Unary(echo_pb2.EchoRequest(text="hi"), timeout=10)).instance == "api-1"
            assert _tls_errors(web_tel, "wrong_identity") == _tls_errors(web_tel, "unknown_ca") == 0
            return
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Unary(echo_pb2.EchoRequest(text="hi"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "api" in (err.value.details() or "")
        reason = "wrong_identity" if peer == "wrong_service" else "unknown_ca"
        assert _tls_errors(web_tel, reason) >= 1
        # the sidecar keeps serving: the next call is refused the same way, not hung or crashed
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await stub.Unary(echo_pb2.EchoRequest(text="again"), timeout=10)
        assert again.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close(None)
        await outbound.close(0.1)
        await inbound.close(0.1)
        await app.stop(None)
