"""The local listener of a TCP upstream: each connection spliced (a :class:`sidecar.pipe.Pipe`) to a
picked endpoint over mTLS (:class:`sidecar.tls_conn.TlsClientConnection`)."""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import TYPE_CHECKING, Any

import structlog

from sidecar.gate import ListenerGate
from sidecar.limits import Limits
from sidecar.pipe import IdleSweeper, Pipe
from sidecar.tls_conn import connect_b_tls

if TYPE_CHECKING:
    from sidecar.seams import Direction, UpstreamPool

log = structlog.get_logger("weft.sidecar.tcp")

class OutboundTcp:
    """The local listener of a TCP upstream: each connection goes to a picked endpoint over mTLS.

    Bounded like the public port: at most ``max_connections`` open (the excess aborted at accept),
    the dial's TLS handshake within ``handshake_timeout``, and a connection that moves no byte for
    ``idle_timeout`` closed.
    """

    def __init__(self, outbound: Direction, pool: UpstreamPool) -> None:
        self._out = outbound
        self._pool = pool
        self._server: asyncio.AbstractServer | None = None
        self._pipes: set[Pipe] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        limits: Limits = outbound.limits
        listener = f"outbound:{pool.name}"
        self._gate = ListenerGate(listener, limits.max_connections, outbound.telemetry)
        self._idle = IdleSweeper(listener, limits.idle_timeout, lambda: self._pipes, outbound.telemetry)
        self._dial_timeout = limits.handshake_timeout

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, host, port, reuse_address=True, backlog=1024)
        self._idle.start()

    def _accept(self) -> asyncio.BaseProtocol:
        pipe = Pipe(on_made=self._made, on_close=self._closed)
        return pipe.a

    def _made(self, pipe: Pipe) -> None:
        if not self._gate.admit(pipe.a.transport):
            pipe.info["refused"] = True
            return
        self._pipes.add(pipe)
        task = asyncio.ensure_future(self._dial(pipe))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dial(self, pipe: Pipe) -> None:
        from sidecar.tls import PeerIdentityError, check_server_identity, expected_server_name, tls_error_reason

        pool = self._pool
        out = self._out
        tried = ""
        for _attempt in range(2):
            if out.draining:
                break
            key = pool.pick(exclude=tried)
            if key is None or key == tried:
                break
            tried = key
            snap = out.snapshot()
            ep = pool.endpoints.get(key)
            if ep is None:
                continue
            creds = snap.credentials
            t0 = time.perf_counter()
            try:
                transport = await connect_b_tls(
                    pipe, ep.address, ep.port, out.tls.client(creds, "tcp"),
                    expected_server_name(pool.name, creds.trust_domain), timeout=self._dial_timeout)
                sslobj = transport.get_extra_info("ssl_object")
                check_server_identity(sslobj.getpeercert(binary_form=True) if sslobj else None, pool.name,
                                      creds.trust_domain)
            except PeerIdentityError as exc:
                pool.observe(key, False, time.perf_counter() - t0)
                out.telemetry.tls_errors.labels("outbound", exc.reason).inc()
                log.warning("upstream_identity_refused", upstream=pool.name, endpoint=key, error=str(exc))
                break
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                pool.observe(key, False, time.perf_counter() - t0)
                if isinstance(exc, ssl.SSLError):
                    out.telemetry.tls_errors.labels("outbound", tls_error_reason(exc)).inc()
                log.warning("upstream_connect_failed", upstream=pool.name, endpoint=key, error=str(exc)[:200])
                if pipe.b.transport is not None:
                    pipe.b.transport.abort()
                    pipe.b.transport = None
                    pipe.b.closed = False
                if pipe.a.closed:
                    return
                continue
            pool.observe(key, True, time.perf_counter() - t0)
            pipe.info["endpoint"] = key
            pipe.start()
            return
        pipe.close(abort=True)

    def _closed(self, pipe: Pipe) -> None:
        if pipe.info.get("refused"):
            return
        self._pipes.discard(pipe)
        self._gate.release()
        key = pipe.info.get("endpoint")
        snap = self._out.snapshot()
        status = "closed" if key is not None else "connect_failed"
        self._out.telemetry.request("outbound", snap.registration.service, self._pool.name, "tcp", status,
                                    time.monotonic() - pipe.started)

    def on_snapshot(self) -> None:
        """Nothing to do: endpoint changes apply to the next connection (the pool is already updated)."""

    async def close(self, grace: float = 5.0) -> None:
        if self._server is not None:
            self._server.close()
        self._idle.stop()
        deadline = time.monotonic() + grace
        while self._pipes and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for pipe in list(self._pipes):
            pipe.close(abort=True)
        for task in list(self._tasks):
            task.cancel()
