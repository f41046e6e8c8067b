"""One upstream's traffic state: the chain, endpoints per target, pickers, ejections, retry budget.

Pure (no I/O, no clock, randomness injected): the outbound call path asks ``plan`` for each call and
reports with ``started``/``finished``; the sidecar state feeds ``update`` with the compiled chain,
the healthy endpoints of every target (each target is watched with its subset's filter) and the
caller's service-defaults settings.

A call's plan: the chain's route and split (``routing.route_call``), then the first target, in
order (the routed target, then its failover targets), that has an endpoint neither missing from
Consul's healthy list nor ejected by passive health checking; when none has, the first target with
any endpoint (ejected ones included: better a weak endpoint than none). Within a target the
resolver's ``LoadBalancer`` policy picks (``lb.Picker``), or, without one, the sidecar's default
P2C/EWMA balancer.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl

from catalog.chain import CompiledChain, Target
from sidecar import faults
from sidecar.balance import Balancer
from sidecar.circuit import DEFAULT_CONNECT_TIMEOUT, RequestCircuit, connect_timeout, limited
from sidecar.lb import Picker, call_hash
from sidecar.outlier import OutlierDetector, PassiveHealthCheck
from sidecar.ratelimit import CallerLimits, RateLimiter, retry_after_header
from sidecar.retry import RetryBudget
from sidecar.routing import Request, RouteDecision, RouteTable
from sidecar.snapshot import InboundTraffic
from sidecar.upstreamconfig import UpstreamSettings

K = TypeVar("K", bound=Hashable)

# Without a PassiveHealthCheck entry, an endpoint whose calls fail this many times in a row is still
# set aside for a while (the sidecar's own guard, as its default balancer always did).
DEFAULT_GUARD = PassiveHealthCheck(interval=10.0, max_failures=5, enforcing_percent=100,
                                   max_ejection_percent=50, base_ejection_time=10.0)


class NoEndpoint(LookupError):
    """No target of the call has an endpoint."""


@dataclass(frozen=True)
class CallPlan(Generic[K]):
    decision: RouteDecision
    target: Target  # where the call goes (differs from decision.target after a failover)
    endpoint: K
    failed_over: bool = False


@dataclass
class _TargetState(Generic[K]):
    endpoints: tuple[K, ...] = ()
    picker: Picker[K] | None = None
    default: Balancer[K] = field(default_factory=Balancer)
    hash_policies: tuple[Any, ...] = ()


class UpstreamTraffic(Generic[K]):
    def __init__(self, name: str, chain: CompiledChain, *, settings: UpstreamSettings | None = None,
                 rng: random.Random | None = None) -> None:
        self.name = name
        self.rng = rng or random.Random()
        self.chain = chain
        self.settings = settings or UpstreamSettings()
        self.budget = RetryBudget()
        self.outlier: OutlierDetector[K] = OutlierDetector(self.settings.passive_health_check or DEFAULT_GUARD,
                                                           rng=self.rng)
        self._targets: dict[str, _TargetState[K]] = {}
        self.header_names: frozenset[str] = frozenset()
        # UpstreamConfig.Limits on the HTTP/1.1 path (None: no limit set, no per-call work)
        self.circuit: RequestCircuit | None = RequestCircuit(self.settings.limits) if limited(
            self.settings.limits) else None
        self.connect_timeouts: dict[K, float] = {}  # endpoint -> its connect timeout (sidecar.circuit)
        # the same names with their wire form, for the call path's scan of a request's header block
        self.header_fields: tuple[tuple[str, bytes], ...] = ()
        self._table = RouteTable(chain)
        # each (decision, target, endpoint)'s plan, built once per chain (decisions are the table's)
        self._plans: dict[tuple[int, str, K], CallPlan[K]] = {}
        self._configure_targets()

    # ----- configuration -----
    def _configure_targets(self) -> None:
        names: set[str] = set()
        for node in self.chain.nodes.values():
            for route in node.routes:
                names.update(h.name for h in route.match.headers)
            lb = node.load_balancer
            for hp in lb.hash_policies if lb is not None else ():
                if hp.field == "header":
                    names.add(hp.field_value.lower())
                elif hp.field == "cookie":
                    names.add("cookie")
        self.header_names = frozenset(names)  # what a call's plan reads of its request headers
        self.header_fields = tuple((n, n.encode("latin-1")) for n in sorted(names))
        by_target = {}
        for node in self.chain.nodes.values():
            if node.type == "resolver":
                by_target[node.target] = node.load_balancer
        states: dict[str, _TargetState[K]] = {}
        for tid in self.chain.targets:
            old = self._targets.get(tid)
            lb = by_target.get(tid)
            policy = lb.policy if lb is not None and lb.policy else ""
            st = old if old is not None else _TargetState()
            if policy:
                if st.picker is None or st.picker.policy != policy:
                    st.picker = Picker(policy, rng=self.rng, choice_count=lb.choice_count if lb else 2,
                                       min_ring_size=lb.min_ring_size if lb else 1024,
                                       max_ring_size=lb.max_ring_size if lb else 8192)
                st.hash_policies = tuple(lb.hash_policies) if lb is not None else ()
            else:
                st.picker, st.hash_policies = None, ()
            states[tid] = st
        self._targets = states

    def update(self, *, chain: CompiledChain | None = None, endpoints: Mapping[str, Sequence[K]] | None = None,
               settings: UpstreamSettings | None = None, now: float = 0.0) -> None:
        if settings is not None and settings != self.settings:
            self.settings = settings
            self.outlier.config = settings.passive_health_check or DEFAULT_GUARD
            if not limited(settings.limits):
                self.circuit = None  # requests in flight release the one they entered
            elif self.circuit is None:
                self.circuit = RequestCircuit(settings.limits)
            else:
                self.circuit.limits = settings.limits
        if chain is not None and chain != self.chain:
            self.chain = chain
            self._table = RouteTable(chain)
            self._plans = {}
            self._configure_targets()
        if endpoints is not None:
            for tid, eps in endpoints.items():
                st = self._targets.get(tid)
                if st is not None:
                    st.endpoints = tuple(dict.fromkeys(eps))
                    st.default.set_endpoints(st.endpoints, now)
            self.outlier.set_endpoints([e for st in self._targets.values() for e in st.endpoints])
        if settings is not None or chain is not None or endpoints is not None:
            self._set_connect_timeouts()

    def _set_connect_timeouts(self) -> None:
        per: dict[K, list[float]] = {}
        for tid, st in self._targets.items():
            target = self.chain.targets.get(tid)
            for e in st.endpoints:
                per.setdefault(e, []).append(target.connect_timeout if target is not None else 0.0)
        self.connect_timeouts = {e: connect_timeout(self.settings, ts) for e, ts in per.items()}

    def connect_timeout(self, endpoint: K) -> float:
        """Seconds a connection to ``endpoint`` (TCP and TLS handshake) may take (``sidecar.circuit``)."""
        return self.connect_timeouts.get(endpoint, self.settings.connect_timeout or DEFAULT_CONNECT_TIMEOUT)

    def target_ids(self) -> tuple[str, ...]:
        return tuple(self.chain.targets)

    # ----- per call -----
    def plan(self, request: Request, now: float, *, source: str = "", exclude: K | None = None) -> CallPlan[K]:
        """Route, split and pick for one call; NoEndpoint when no target has an endpoint. ``exclude``
        (a retry's failed endpoint) is avoided while the target has another one."""
        return self.plan_call(request.method, request.path, request.headers, now, source=source, exclude=exclude)

    def plan_call(self, method: str, path: str, headers: Mapping[str, str], now: float, *, source: str = "",
                  exclude: K | None = None) -> CallPlan[K]:
        """``plan`` without a Request: the call path's form."""
        decision = self._table.decide(method, path, headers, self.rng.random() * 100)
        if exclude is None and self.outlier.none_ejected(now):
            # the common call: its routed target, nothing ejected, no endpoint to avoid
            routed = self._targets.get(decision.target.id)
            if routed is not None and routed.endpoints and routed.picker is None:
                picked = routed.default.pick(now)
                if picked is not None:
                    return self._plan_of(decision, decision.target, picked, False)
        order = (decision.target, *decision.failover)
        chosen: tuple[Target, list[K]] | None = None
        for target in order:
            st = self._targets.get(target.id)
            if st is None or not st.endpoints:
                continue
            if self.outlier.none_ejected(now):
                live = list(st.endpoints)
            else:
                live = [e for e in st.endpoints if not self.outlier.is_ejected(e, now)]
            if exclude is not None and len(live) > 1:
                live = [e for e in live if e != exclude]
            if live:
                chosen = (target, live)
                break
        if chosen is None:
            for target in order:  # panic: every endpoint is ejected; use them anyway
                st = self._targets.get(target.id)
                if st is not None and st.endpoints:
                    chosen = (target, list(st.endpoints))
                    break
        if chosen is None:
            raise NoEndpoint(f"upstream {self.name}: no endpoint for {decision.target.id}"
                             + (" or its failover targets" if decision.failover else ""))
        target, candidates = chosen
        st = self._targets[target.id]
        endpoint: K | None
        if st.picker is not None:
            h = None
            if st.picker.hash_based and st.hash_policies:
                query = dict(parse_qsl(path.partition("?")[2], max_num_fields=100))
                h = call_hash(st.hash_policies, headers, query, source)
            endpoint = st.picker.pick(candidates, h)
        else:
            endpoint = self._default_pick(st, candidates, now)
        assert endpoint is not None
        return self._plan_of(decision, target, endpoint, target.id != decision.target.id)

    def _plan_of(self, decision: RouteDecision, target: Target, endpoint: K, failed_over: bool) -> CallPlan[K]:
        if decision.path:  # a rewritten path: a decision of this call only
            return CallPlan(decision, target, endpoint, failed_over=failed_over)
        # keyed by the decision's identity: the table keeps each decision (and the plan keeps it alive)
        key = (id(decision), target.id, endpoint)
        plan = self._plans.get(key)
        if plan is None:
            plan = CallPlan(decision, target, endpoint, failed_over=failed_over)
            if len(self._plans) >= 4096:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _default_pick(self, st: _TargetState[K], candidates: list[K], now: float) -> K | None:
        if len(candidates) == len(st.endpoints):
            return st.default.pick(now)
        live = set(candidates)
        for _ in range(4):  # the balancer may offer an ejected one; it rarely does twice
            key = st.default.pick(now)
            if key in live:
                return key
        return candidates[self.rng.randrange(len(candidates))]

    def started(self, plan: CallPlan[K], now: float, *, retry: bool = False) -> None:
        st = self._targets.get(plan.target.id)
        if st is not None:
            if st.picker is not None:
                st.picker.start(plan.endpoint)
            st.default.start(plan.endpoint)
        if not retry:
            self.budget.record_call(now)

    def cancelled(self, plan: CallPlan[K]) -> None:
        """A planned call that never went out (a circuit breaker refused it): undo ``started``'s in-flight
        counts without a latency or health sample."""
        st = self._targets.get(plan.target.id)
        if st is not None:
            if st.picker is not None:
                st.picker.finish(plan.endpoint)
            if plan.endpoint in st.endpoints:
                stats = st.default.stats(plan.endpoint)
                stats.in_flight = max(0, stats.in_flight - 1)

    def finished(self, plan: CallPlan[K], now: float, *, latency: float, failed: bool,
                 transport_ok: bool = True) -> bool:
        """An attempt ended; True when it made its endpoint ejected."""
        st = self._targets.get(plan.target.id)
        if st is not None:
            if st.picker is not None:
                st.picker.finish(plan.endpoint)
            st.default.observe(plan.endpoint, latency, now, ok=transport_ok)
        return self.outlier.observe(plan.endpoint, failed, now)

    # ----- visibility -----
    def describe(self, now: float) -> dict[str, Any]:
        """What ``/config`` and ``weft status`` show: the chain's shape, splits, targets and ejections."""
        start = self.chain.start
        out: dict[str, Any] = {"protocol": self.chain.protocol, "start": self.chain.start_node,
                               "default": self.chain.default}
        if start.type == "router":
            out["routes"] = len(start.routes)
        splitter = start if start.type == "splitter" else next(
            (n for n in self.chain.nodes.values() if n.type == "splitter"), None)
        if splitter is not None:
            out["splits"] = [{"weight": s.weight, "target": self.chain.nodes[s.next_node].target}
                             for s in splitter.splits]
        out["targets"] = {tid: {"endpoints": [str(e) for e in st.endpoints],
                                "policy": st.picker.policy if st.picker else "p2c-ewma"}
                          for tid, st in self._targets.items()}
        out["ejected"] = {str(k): round(v, 1) for k, v in self.outlier.ejected(now).items()}
        calls, retries = self.budget.window
        out["retry_budget"] = {"calls": calls, "retries": retries, "exhausted": self.budget.exhausted}
        return out


# ----- the inbound side: rate limits and faults ------------------------------------------------------

GRPC_RESOURCE_EXHAUSTED = 8


@dataclass(frozen=True)
class InboundVerdict:
    """What the inbound does with one call before it reaches the app: refuse it (``status``/``http_status``
    with ``message`` and ``retry_after`` seconds for a rate limit), or hold it ``delay`` seconds."""

    refuse: bool = False
    grpc_status: int = 0
    http_status: int = 0
    message: str = ""
    retry_after: float = 0.0
    delay: float = 0.0
    reason: str = ""  # ratelimit | fault-abort | fault-delay


PASS = InboundVerdict()


class InboundControls:
    """This instance's rate limiter and fault document (mutable buckets; no I/O)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.limiter = RateLimiter()
        self.faults: faults.FaultDoc | None = None
        self.rng = rng or random.Random()

    def update(self, config: InboundTraffic) -> None:
        """``config``: the snapshot's inbound settings (caller limits, local settings, fault document)."""
        self.limiter.update(config.caller_limits or CallerLimits(), config.local.rate_limits)
        self.faults = config.faults

    def needs_call_path(self, caller: str) -> bool:
        """Whether ``caller``'s calls must be seen one by one (a limit or a fault may apply to them)."""
        if self.limiter.applies_to(caller):
            return True
        f = self.faults
        return f is not None and (not f.sources or caller in f.sources)

    def check(self, caller: str, path: str, now: float) -> InboundVerdict:
        verdict = self.limiter.check(caller, path, now)
        if not verdict.allowed:
            return InboundVerdict(
                refuse=True, grpc_status=GRPC_RESOURCE_EXHAUSTED, http_status=429, retry_after=verdict.retry_after,
                message=f"weft: rate limit ({verdict.source}) exceeded for {caller}; retry after "
                        f"{retry_after_header(verdict.retry_after)}s", reason="ratelimit")
        fault = faults.decide(self.faults, caller, path, self.rng)
        if fault.abort:
            return InboundVerdict(refuse=True, grpc_status=fault.grpc_status, http_status=fault.http_status,
                                  message="weft: fault injected (weft/faults)", delay=fault.delay,
                                  reason="fault-abort")
        if fault.delay:
            return InboundVerdict(delay=fault.delay, reason="fault-delay")
        return PASS
