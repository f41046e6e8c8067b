"""Traffic management on the frame-level HTTP/2 paths (``sidecar.h2_proxy``): the hooks it calls.

Outbound, for an upstream whose pool is routed (a discovery chain that routes, splits or fails over;
see ``sidecar.outbound``): each new stream gets a plan (route, split, target, endpoint) from its
request headers; ``PrefixRewrite`` and the route's and split's request-header changes re-encode its
header block; the route's ``RequestTimeout`` (else the resolver's) arms a timer that ends the call
with DEADLINE_EXCEEDED; an answer that the route's retry policy names (a trailers-only gRPC status
such as UNAVAILABLE, or an HTTP status in ``RetryOnStatusCodes`` / 5xx) is not passed on but retried
on another endpoint when nothing of the response was sent to the app, the request is replayable
(the proxy keeps up to 64 KiB of sent request data), the backoff ends before the deadline and the
upstream's budget allows it; each attempt's outcome goes to passive health checking.

Inbound (the full path): per call, the caller's rate limits (RESOURCE_EXHAUSTED with
``retry-after``) and injected faults (a delay before the call goes on, or an abort with the
document's status), and service-defaults ``LocalRequestTimeoutMs`` on the call to the local app.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from sidecar import h2_circuit, h2_idle
from sidecar.h2.grpc import RESOURCE_EXHAUSTED, UNAVAILABLE, percent
from sidecar.h2.hpack import encode_plain, headers_of, scan
from sidecar.h2_conn import DeadlineGroup
from sidecar.ratelimit import retry_after_header
from sidecar.retry import decide
from sidecar.routing import Outcome, apply_header_mods
from sidecar.traffic import CallPlan
from sidecar.traffic_metrics import metrics_of

if TYPE_CHECKING:
    from sidecar.h2_conn import Expiry, FrameProxy, InboundFrameProxy, OutboundFrameProxy, Stream, UpConn
    from sidecar.seams import UpstreamPool
    from sidecar.snapshot import Snapshot

log = structlog.get_logger("weft.sidecar.h2")

DEADLINE_EXCEEDED = 4
HTTP_CONDITIONS = frozenset({"5xx", "gateway-error", "retriable-4xx", "envoy-ratelimited"})
_rng = random.Random()


class _Replayable:
    """The request of a stream as ``retry.decide`` sees it: sent whole and kept, or not."""

    __slots__ = ("_replayable",)

    def __init__(self, replayable: bool) -> None:
        self._replayable = replayable

    @property
    def replayable(self) -> bool:
        return self._replayable


# ----- outbound ---------------------------------------------------------------------------------------

def routed(pool: UpstreamPool) -> bool:
    """Whether the upstream's calls go through its discovery chain (``sidecar.outbound.EndpointPool``)."""
    return bool(getattr(pool, "routed", False))


def service_of(pool: UpstreamPool, key: str) -> str:
    """The service whose identity the endpoint ``key`` must prove (a chain may reach another service)."""
    of = getattr(pool, "service_of", None)
    return str(of(key)) if of is not None else str(pool.name)


def open_routed(proxy: OutboundFrameProxy, st: Stream, exclude: str = "") -> None:
    """Plan a new (or retried) stream of a routed upstream and send it on its way."""
    pool = proxy.pool
    out = proxy._out
    if st.plan is not None and st.attempt_start is not None:  # the last attempt could not connect
        attempt_ended(proxy, st, status="UNAVAILABLE", failed=True, transport_ok=False)
    st.tries += 1
    first = st.plan is None
    block = st.request_block
    # the path was read from the block when the stream opened (``Stream.method``)
    path = st.original_path or st.method or "/"
    plain = {}
    traffic = pool.traffic
    if traffic is not None and traffic.header_fields:
        # only what the chain looks at is read from the block (its router's header matches, hash fields)
        try:
            for name, wire_name in traffic.header_fields:
                value = scan(block, wire_name)
                if value is not None:
                    plain[name] = value.decode("latin-1")
        except (ValueError, UnicodeDecodeError) as exc:
            proxy.fail(st, 13, f"weft: unreadable request headers: {exc}")
            return
    plan = pool.plan("POST", path, plain, out.snapshot().registration.service, exclude=exclude)  # gRPC: POST
    if isinstance(plan, str):
        proxy.fail(st, UNAVAILABLE, f"weft: {plan}")
        return
    st.plan = plan
    decision = plan.decision
    if first:
        st.original_path = path
        if decision.path or decision.request_headers:
            try:
                headers = headers_of(block)
            except ValueError as exc:
                proxy.fail(st, 13, f"weft: unreadable request headers: {exc}")
                return
            new_path = (decision.path or path).encode("latin-1")
            rewritten = [(k, new_path) if k == b":path" else (k, v) for k, v in headers]
            if decision.request_headers:
                regular = apply_header_mods([(k.decode("latin-1"), v.decode("latin-1")) for k, v in rewritten
                                             if not k.startswith(b":")], decision.request_headers)
                rewritten = [(k, v) for k, v in rewritten if k.startswith(b":")] + [
                    (k.encode("latin-1"), v.encode("latin-1")) for k, v in regular]
            st.request_block = encode_plain(rewritten)
        timeout = decision.request_timeout
        if timeout > 0:
            st.deadline = time.monotonic() + timeout
            _deadline(proxy, st, timeout, _timed_out)
        if decision.idle_timeout > 0:
            h2_idle.arm(proxy, st, decision.idle_timeout)
    traffic = pool.traffic  # routed: the pool's traffic state made this plan
    if traffic is not None and traffic.circuit is not None and not h2_circuit.admit(proxy, st, plan, traffic):
        return  # UpstreamConfig.Limits: refused at once
    st.endpoint = plan.endpoint
    st.attempt_start = time.perf_counter()
    proxy.route(st, proxy._up(plan.endpoint))


def _timed_out(proxy: FrameProxy, st: Stream, timeout: float) -> None:
    if not st.recorded:  # the proxy's name is its upstream's
        proxy.fail(st, DEADLINE_EXCEEDED, f"weft: {proxy.name} did not answer within the route's timeout "
                                          f"of {timeout:g}s")
        proxy.flush()


def _deadline(proxy: FrameProxy, st: Stream, timeout: float, expire: Expiry) -> None:
    """Arm ``timeout`` for ``st``: ``expire(proxy, st, timeout)`` runs when it passes first;
    ``stream_done`` disarms it. The groups (one per timeout and expiry; timeouts come from config
    entries, so they are few) live on the proxy."""
    groups = proxy._traffic_deadlines
    g = groups.get((timeout, expire))
    if g is None:
        g = groups[(timeout, expire)] = DeadlineGroup(proxy, timeout, expire, asyncio.get_running_loop())
    g.add(st)


def attempt_ended(proxy: OutboundFrameProxy, st: Stream, *, status: str, failed: bool,
                  transport_ok: bool = True) -> None:
    """An attempt of a routed stream ended: its outcome to the pickers, passive health checking and metrics."""
    plan: CallPlan[str] | None = st.plan
    if plan is None or st.attempt_start is None:
        return
    seconds = time.perf_counter() - st.attempt_start
    st.attempt_start = None
    proxy.pool.finished(plan, seconds=seconds, status=status, failed=failed, transport_ok=transport_ok)


def stream_done(st: Stream) -> None:
    timer = st.timer
    if timer is not None:
        st.timer = None
        timer.cancel_for(st)
    plan = st.plan  # None on the inbound side
    if plan is not None and plan.decision.idle_timeout:
        h2_idle.stop(st)


def retry_answer(proxy: OutboundFrameProxy, up: UpConn, st: Stream, raw: bytes, end: bool) -> bool:
    """The upstream's response headers of a routed stream: True when they were consumed by a retry
    (or a failure past one), False to pass them on as usual."""
    plan: CallPlan[str] | None = st.plan
    if plan is None or st.headers_sent_app:
        return False
    policy = plan.decision.retry
    if not policy.enabled or (not end and not policy.status_codes and not policy.conditions & HTTP_CONDITIONS):
        return False  # nothing in these headers can make the call retried: no decoding
    try:
        headers = dict(headers_of(raw))
    except ValueError:
        return False
    http_status = int(headers.get(b":status", b"200") or 200)
    grpc_raw = headers.get(b"grpc-status")
    grpc_status = int(grpc_raw) if grpc_raw is not None and grpc_raw.isdigit() else -1
    outcome = Outcome(http_status=http_status, grpc_status=grpc_status if end else -1)
    failed = http_status >= 500 or (end and grpc_status == UNAVAILABLE)
    replayable = st.replay is not None and st.a.remote_closed and not st.q_up and st.trailers is None
    verdict = decide(policy, outcome, retries_done=st.retries, response_started=st.headers_sent_app,
                     body=_Replayable(replayable), now=time.monotonic(), deadline=st.deadline,
                     budget=proxy.pool.budget(), rng=_rng)
    if not verdict.retry:
        if verdict.reason == "budget-exhausted":
            metrics_of(proxy.telemetry).budget_exhausted.labels(proxy.pool.name).inc()
        return False
    # this answer is dropped: its stream ends here, the request goes again to another endpoint
    attempt_ended(proxy, st, status=str(grpc_status if grpc_status >= 0 else http_status), failed=failed)
    u = st.u
    if u is not None:
        st.u = None
        if not end:
            up.reset(u, 8)  # CANCEL: the rest of this answer is not wanted
        else:
            up.close_stream(u)
        up.start_waiting()
    _resend(proxy, st, plan.endpoint, verdict.delay, failed=failed)
    return True


def retry_lost(proxy: OutboundFrameProxy, st: Stream) -> bool:
    """The connection carrying a routed stream broke before its response started: True when the
    stream is retried (the route retries on ``reset``, ``5xx`` or ``gateway-error``)."""
    plan: CallPlan[str] | None = st.plan
    if plan is None or st.headers_sent_app or st.app.closed or st.a.sid not in st.app.streams:
        return False
    replayable = st.replay is not None and st.a.remote_closed and not st.q_up and st.trailers is None
    verdict = decide(plan.decision.retry, Outcome(reset=True), retries_done=st.retries, response_started=False,
                     body=_Replayable(replayable), now=time.monotonic(), deadline=st.deadline,
                     budget=proxy.pool.budget(), rng=_rng)
    if not verdict.retry:
        if verdict.reason == "budget-exhausted":
            metrics_of(proxy.telemetry).budget_exhausted.labels(proxy.pool.name).inc()
        return False
    attempt_ended(proxy, st, status="UNAVAILABLE", failed=True, transport_ok=False)
    st.u = None
    _resend(proxy, st, plan.endpoint, verdict.delay, failed=True)
    return True


def _resend(proxy: OutboundFrameProxy, st: Stream, failed_endpoint: str, delay: float, *, failed: bool) -> None:
    """Put the request sent so far back in front of the queue and send it again after ``delay``."""
    replay = st.replay
    chunks = [replay] if isinstance(replay, bytes) else list(replay or ())  # one chunk is kept as bytes
    st.q_up[:0] = [(chunk, False) for chunk in chunks]
    if st.q_up:
        last, _ = st.q_up[-1]
        st.q_up[-1] = (last, True)
    st.credited += st.replay_size
    st.replay, st.replay_size, st.data_sent = (), 0, False
    st.status = None
    st.retries += 1
    proxy.release(st, ok=not failed)
    st.up = None
    metrics_of(proxy.telemetry).retries.labels(proxy.pool.name).inc()

    def again() -> None:
        if st.recorded or st.app.closed or st.a.sid not in st.app.streams:
            return
        open_routed(proxy, st, exclude=failed_endpoint)
        proxy.flush()

    asyncio.get_running_loop().call_later(delay, again)


# ----- inbound -------------------------------------------------------------------------------------

def inbound_controls(h2in: InboundFrameProxy, st: Stream, snap: Snapshot, go_on: Callable[[], None]) -> bool:
    """Rate limits and faults for one inbound call; True when the call was refused or deferred (``go_on``
    is called after an injected delay), False to go on at once."""
    inbound = h2in._out
    verdict = inbound.controls_for(snap).check(st.source, st.method, time.monotonic())
    if not verdict.reason:
        return False
    metrics = metrics_of(inbound.telemetry)
    if verdict.reason == "ratelimit":
        metrics.ratelimited.labels(metrics.source_label(st.source)).inc()
        refuse(h2in, st, RESOURCE_EXHAUSTED, verdict.message, retry_after_header(verdict.retry_after))
        return True

    def abort() -> None:
        metrics.faults.labels("abort").inc()
        refuse(h2in, st, verdict.grpc_status, verdict.message, "")

    if verdict.delay:
        metrics.faults.labels("delay").inc()

        def later() -> None:
            if st.recorded or st.app.closed or st.a.sid not in st.app.streams:
                return
            if verdict.refuse:
                abort()
            else:
                go_on()
            h2in.flush()

        asyncio.get_running_loop().call_later(verdict.delay, later)
        return True
    abort()
    return True


def refuse(h2in: FrameProxy, st: Stream, code: int, message: str, retry_after: str) -> None:
    """End a call with a trailers-only gRPC status (and ``retry-after`` when given)."""
    app = st.app
    if not app.closed and st.a.sid in app.streams and not app.dead:
        headers = [(b":status", b"200"), (b"content-type", b"application/grpc"),
                   (b"grpc-status", str(code).encode()), (b"grpc-message", percent(message))]
        if retry_after:
            headers.append((b"retry-after", retry_after.encode()))
        app.send_headers(st.a, encode_plain(headers), True)
        app.close_stream(st.a)
    h2in.drop_queues(st)
    h2in.finish(st, code)


def local_timeout(h2in: FrameProxy, st: Stream, snap: Snapshot) -> None:
    """service-defaults ``LocalRequestTimeoutMs``: a call to the local app ends with DEADLINE_EXCEEDED past it."""
    timeout = snap.inbound.local.request_timeout
    if timeout > 0 and st.timer is None:
        _deadline(h2in, st, timeout, _local_expired)


def _local_expired(h2in: FrameProxy, st: Stream, timeout: float) -> None:
    if not st.recorded:
        h2in.fail(st, DEADLINE_EXCEEDED, f"weft: the local app did not answer within {timeout:g}s "
                                         "(LocalRequestTimeoutMs)")
        h2in.flush()
