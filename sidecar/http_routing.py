"""The outbound HTTP call path of a routed upstream (its discovery chain routes, splits or fails over).

Per request: the route, split, target and endpoint come from the pool's plan (``sidecar.traffic``);
the path is rewritten (``PrefixRewrite``) and the route's and split's header modifications applied;
the route's ``RequestTimeout`` (else the resolver's) bounds the whole exchange (504 past it); a
failed attempt is retried on another endpoint when the route's retry policy names the failure
(``RetryOn``, ``RetryOnStatusCodes``, ``RetryOnConnectFailure``), the response has not started, the
request body was kept whole (``BodyBuffer``, 64 KiB), the backoff ends before the deadline and the
upstream's retry budget allows it. The TLS peer must be the target's service (a chain may route to
another service than the upstream's name).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import structlog
from aiohttp import web

from sidecar import http_circuit
from sidecar.http_relay import forward_headers, relay_response
from sidecar.retry import BodyBuffer, decide
from sidecar.routing import Outcome, RouteDecision, apply_header_mods
from sidecar.tls import expected_server_name

if TYPE_CHECKING:
    from sidecar.seams import HttpListener
    from sidecar.snapshot import Snapshot
    from sidecar.traffic import CallPlan

log = structlog.get_logger("weft.sidecar.http")

_rng = random.Random()


async def _read_head(request: web.BaseRequest, limit: int) -> tuple[list[bytes], BodyBuffer]:
    """The body's first chunks, up to just past ``limit`` bytes, and whether they are all of it (the
    buffer is replayable only then)."""
    head: list[bytes] = []
    buf = BodyBuffer(limit)
    if not request.body_exists:
        buf.add(b"", end=True)
        return head, buf
    while not buf.overflowed:
        chunk = await request.content.readany()
        if not chunk:
            buf.add(b"", end=True)
            break
        head.append(chunk)
        buf.add(chunk)
    return head, buf


async def _rest(prefix: list[bytes], content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    for chunk in prefix:
        yield chunk
    async for chunk in content.iter_any():
        yield chunk


async def routed_request(listener: HttpListener, request: web.BaseRequest) -> tuple[web.StreamResponse, str]:
    """(response, status label) of one request through the chain."""
    pool = listener._pool
    out = listener._out
    snap = out.snapshot()
    source = snap.registration.service
    headers: dict[str, str] = {}
    for k, v in request.headers.items():
        k = k.lower()
        headers[k] = f"{headers[k]},{v}" if k in headers else v
    plan = pool.plan(request.method, request.path_qs, headers, source)
    if isinstance(plan, str):
        return web.Response(status=503, text=f"weft: {plan}\n"), "503"
    traffic = pool.traffic
    circuit = traffic.circuit if traffic is not None else None
    if circuit is None:
        return await _send(listener, request, plan, headers, snap)
    async with http_circuit.held(circuit, pool, plan.decision.request_timeout) as refused:  # UpstreamConfig.Limits
        if refused is not None:
            if traffic is not None:
                traffic.cancelled(plan)
            status, text = refused
            return web.Response(status=status, text=text), str(status)
        return await _send(listener, request, plan, headers, snap)


@dataclass(slots=True)
class _Attempt:
    """How one attempt of a routed request went."""

    outcome: Outcome
    upstream: aiohttp.ClientResponse | None  # the response's head, when one came
    seconds: float
    idled: bool = False  # the route's IdleTimeout passed
    connect_timeout: float = 0.0  # the connect timeout it passed, when it did


async def _attempt(listener: HttpListener, request: web.BaseRequest, plan: CallPlan[str], decision: RouteDecision,
                   body: bytes | AsyncIterator[bytes] | None, snap: Snapshot) -> _Attempt:
    """Send the request once, to the plan's endpoint, as the first plan's route ``decision`` says (path
    rewrite, header changes, idle timeout), over mTLS; connect failures, resets and timeouts become the
    attempt's outcome (counted and logged), for the retry policy to judge."""
    pool = listener._pool
    ep = pool.endpoints.get(plan.endpoint)
    url = f"https://{ep.address}:{ep.port}{decision.path or request.path_qs}" if ep else ""
    fwd = apply_header_mods([(k.lower(), v) for k, v in forward_headers(request.headers)], decision.request_headers)
    session = listener._session()
    connect_timeout = pool.traffic.connect_timeout(plan.endpoint) if pool.traffic is not None else 0.0
    t0 = time.perf_counter()
    try:
        if ep is None:
            raise aiohttp.ClientConnectionError(f"endpoint {plan.endpoint} left")
        upstream = await session.request(
            request.method, url, headers=fwd, data=body, allow_redirects=False, auto_decompress=False,
            server_hostname=expected_server_name(pool.service_of(plan.endpoint), snap.credentials.trust_domain),
            timeout=_attempt_timeout(session.timeout, connect_timeout, decision.idle_timeout))
        return _Attempt(Outcome(http_status=upstream.status), upstream, time.perf_counter() - t0)
    except aiohttp.ConnectionTimeoutError:
        pool.metrics.connect_timeouts.labels(pool.name).inc()
        log.warning("upstream_connect_timeout", upstream=pool.name, endpoint=plan.endpoint, timeout=connect_timeout)
        return _Attempt(Outcome(connect_failure=True), None, time.perf_counter() - t0,
                        connect_timeout=connect_timeout)
    except (aiohttp.ClientConnectorError, ConnectionRefusedError) as exc:
        log.warning("upstream_request_failed", upstream=pool.name, endpoint=plan.endpoint, error=str(exc)[:200])
        return _Attempt(Outcome(connect_failure=True), None, time.perf_counter() - t0)
    except (aiohttp.ClientError, OSError) as exc:
        idled = decision.idle_timeout > 0 and isinstance(exc, aiohttp.SocketTimeoutError)
        log.warning("upstream_request_failed", upstream=pool.name, endpoint=plan.endpoint,
                    error="the route's IdleTimeout passed" if idled else str(exc)[:200])
        return _Attempt(Outcome(reset=True), None, time.perf_counter() - t0, idled=idled)


async def _send(listener: HttpListener, request: web.BaseRequest, plan: CallPlan[str], headers: dict[str, str],
                snap: Snapshot) -> tuple[web.StreamResponse, str]:
    """The planned request's attempts (retries included) and its response."""
    pool = listener._pool
    source = snap.registration.service
    decision = plan.decision
    timeout = decision.request_timeout
    deadline = time.monotonic() + timeout if timeout else None
    # a body larger than the replay bound is streamed once: such a call is not retried
    buffered: BodyBuffer | None = None
    head: list[bytes] = []
    if decision.retry.enabled:
        head, buffered = await _read_head(request, 64 * 1024)
    retries = 0
    timed_out = 0.0  # the connect timeout the last attempt passed
    response: web.StreamResponse | None = None
    try:
        async with asyncio.timeout_at(asyncio.get_running_loop().time() + timeout if timeout else None):
            while True:
                if buffered is not None and buffered.replayable:
                    body: bytes | AsyncIterator[bytes] | None = b"".join(head) if request.body_exists else None
                elif buffered is not None:
                    body = _rest(head, request.content)
                else:
                    body = _rest([], request.content) if request.body_exists else None
                attempt = await _attempt(listener, request, plan, decision, body, snap)
                outcome, upstream, seconds, idled = attempt.outcome, attempt.upstream, attempt.seconds, attempt.idled
                if attempt.connect_timeout:
                    timed_out = attempt.connect_timeout
                failed = outcome.connect_failure or outcome.reset or outcome.http_status >= 500
                status = str(outcome.http_status) if outcome.http_status else "502"
                verdict = decide(decision.retry, outcome, retries_done=retries, response_started=False,
                                 body=buffered, now=time.monotonic(), deadline=deadline,
                                 budget=pool.budget(), rng=_rng)
                pool.finished(plan, seconds=seconds, status=status, failed=failed,
                              transport_ok=not (outcome.connect_failure or outcome.reset))
                if idled:  # as Envoy: an idle stream is not retried
                    text = (f"weft: no byte from upstream {pool.name} for {decision.idle_timeout:g}s "
                            "(the route's IdleTimeout)")
                    return web.Response(status=504, text=text + "\n"), "504"
                if verdict.retry:
                    if upstream is not None:
                        upstream.release()
                    retries += 1
                    pool.metrics.retries.labels(pool.name).inc()
                    await asyncio.sleep(verdict.delay)
                    nxt = pool.plan(request.method, request.path_qs, headers, source, exclude=plan.endpoint)
                    if isinstance(nxt, str):
                        return web.Response(status=503, text=f"weft: {nxt}\n"), "503"
                    plan = nxt
                    continue
                if verdict.reason == "budget-exhausted":
                    pool.metrics.budget_exhausted.labels(pool.name).inc()
                if upstream is None and timed_out:
                    return web.Response(status=503, text=f"weft: no connection to upstream {pool.name} within "
                                                         f"the connect timeout of {timed_out:g}s\n"), "503"
                if upstream is None:
                    return web.Response(status=502, text=f"weft: upstream {pool.name} failed\n"), "502"
                async with upstream:
                    response = await relay_response(request, upstream, apply_header_mods(
                        [(k.lower(), v) for k, v in forward_headers(upstream.headers)], decision.response_headers))
                return response, str(upstream.status)
    except TimeoutError:
        if response is not None and response.prepared:
            raise  # the response had started: the connection is cut, as Envoy does
        return web.Response(status=504, text=f"weft: upstream {pool.name} did not answer within the route's "
                                             f"timeout of {timeout:g}s\n"), "504"


def _attempt_timeout(base: aiohttp.ClientTimeout, connect: float, idle: float) -> aiohttp.ClientTimeout:
    """The session's timeouts with the endpoint's connect timeout (TCP and TLS handshake) and the route's
    IdleTimeout (the longest silence of the upstream while the response is awaited or read)."""
    if connect <= 0 and idle <= 0:
        return base
    return aiohttp.ClientTimeout(total=base.total, connect=connect or base.connect,
                                 sock_read=idle or base.sock_read, sock_connect=connect or base.sock_connect,
                                 ceil_threshold=base.ceil_threshold)
