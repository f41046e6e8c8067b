"""The sidecar's configuration: one immutable snapshot, its validity, and diffs (pure: no I/O).

A :class:`Snapshot` is assembled from watches (see ``sidecar.state``) and swapped atomically;
listeners read the current one per connection or per call. :class:`SnapshotBuilder` collects the
pieces as they arrive and builds a snapshot only when every piece is present ("published only
when complete"): the sidecar's registration, its leaf certificate and key, the roots, the compiled
policy of its service (an explicit "no table yet" counts as an answer), and a first answer for the
endpoints of every upstream (an empty list is an answer).

:func:`diff` lists what changed between two snapshots, for the one-line-per-change log.
:meth:`Snapshot.describe` is what ``/config`` shows: never the private key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from catalog.chain import CompiledChain
from sidecar.faults import FaultDoc
from sidecar.ratelimit import CallerLimits
from sidecar.tap import OFF, TapSettings
from sidecar.upstreamconfig import LocalSettings, UpstreamSettings

PROTOCOLS = ("grpc", "http", "tcp")
DEFAULT_PROTOCOL = "tcp"  # Consul's default when neither service-defaults nor meta say otherwise

# Method kinds, as learned from gRPC reflection / descriptor sets.
UNARY = "unary"
SERVER_STREAM = "server_stream"
CLIENT_STREAM = "client_stream"
BIDI_STREAM = "bidi_stream"
METHOD_KINDS = (UNARY, SERVER_STREAM, CLIENT_STREAM, BIDI_STREAM)


class SnapshotError(ValueError):
    """A piece of configuration that cannot be used; the message names it."""


def normalize_protocol(value: str | None, *, what: str = "protocol") -> str:
    """``grpc``, ``http`` (``http2`` folds into http) or ``tcp``; None or empty means tcp."""
    if value is None or value == "":
        return DEFAULT_PROTOCOL
    v = str(value).strip().lower()
    if v == "http2":
        v = "http"
    if v not in PROTOCOLS:
        raise SnapshotError(f"{what} {value!r} is not one of grpc, http, tcp")
    return v


def kind_of(client_streaming: bool, server_streaming: bool) -> str:
    if client_streaming and server_streaming:
        return BIDI_STREAM
    if client_streaming:
        return CLIENT_STREAM
    if server_streaming:
        return SERVER_STREAM
    return UNARY


def validate_methods(methods: Mapping[str, str], *, what: str = "methods") -> dict[str, str]:
    """Check a ``{"/pkg.Svc/Method": kind}`` map; raise SnapshotError naming the bad entry."""
    out: dict[str, str] = {}
    for path, kind in methods.items():
        if not isinstance(path, str) or not path.startswith("/") or path.count("/") != 2 or path.endswith("/"):
            raise SnapshotError(f"{what}: {path!r} is not a gRPC method path /package.Service/Method")
        if kind not in METHOD_KINDS:
            raise SnapshotError(f"{what}: method {path} has kind {kind!r}, not one of {', '.join(METHOD_KINDS)}")
        out[path] = kind
    return out


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One declared upstream: the local listener the app dials and the service behind it."""

    destination_name: str
    local_bind_port: int
    local_bind_address: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not self.destination_name:
            raise SnapshotError("upstream has no DestinationName")
        if not 0 < int(self.local_bind_port) < 65536:
            raise SnapshotError(f"upstream {self.destination_name}: LocalBindPort {self.local_bind_port} is not a port")


@dataclass(frozen=True, slots=True)
class Registration:
    """What the sidecar is for: its service, where the app listens, where it listens itself."""

    service: str  # the destination service name (the app's)
    service_id: str
    proxy_id: str
    public_address: str
    public_port: int
    local_service_address: str
    local_service_port: int
    upstreams: tuple[UpstreamConfig, ...] = ()
    protocol: str = DEFAULT_PROTOCOL  # of the app itself
    datacenter: str = "dc1"

    def __post_init__(self) -> None:
        if not self.service:
            raise SnapshotError("registration has no service name")
        normalize_protocol(self.protocol)
        names = [u.destination_name for u in self.upstreams]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise SnapshotError(f"upstream {sorted(dup)[0]} is declared twice")
        ports = [u.local_bind_port for u in self.upstreams]
        dupp = {p for p in ports if ports.count(p) > 1}
        if dupp:
            raise SnapshotError(f"LocalBindPort {sorted(dupp)[0]} is used by two upstreams")


@dataclass(frozen=True, slots=True)
class Credentials:
    """The sidecar's leaf (PEM), its chain, its key (PEM, never shown) and the trust bundle."""

    cert_pem: str
    key_pem: str = field(repr=False)
    chain_pem: str  # intermediates, possibly empty
    roots_pem: str  # every trusted root, concatenated
    spiffe_id: str
    serial: str
    not_after: float  # Unix time
    trust_domain: str
    roots_version: str = ""  # e.g. the ActiveRootID plus the set of root IDs
    # changes whenever anything a TLS context is built from changes; computed once (every new upstream
    # stream compares it with its connection's, so it is read per call)
    generation: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if "BEGIN CERTIFICATE" not in self.cert_pem:
            raise SnapshotError("leaf certificate is not PEM")
        if "PRIVATE KEY" not in self.key_pem:
            raise SnapshotError("leaf key is not PEM")
        if "BEGIN CERTIFICATE" not in self.roots_pem:
            raise SnapshotError("trust bundle has no root certificate")
        h = hashlib.sha256()
        for part in (self.cert_pem, self.chain_pem, self.roots_pem):
            h.update(part.encode())
            h.update(b"\0")
        object.__setattr__(self, "generation", h.hexdigest()[:16])

    @property
    def full_chain_pem(self) -> str:
        """Leaf followed by its intermediates, as sent in a handshake."""
        chain = self.chain_pem.strip()
        return self.cert_pem.strip() + "\n" + (chain + "\n" if chain else "")


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """A healthy sidecar of an upstream service: where to dial it."""

    address: str
    port: int
    instance_id: str = ""  # the proxy's service id
    node: str = ""

    @property
    def key(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class UpstreamState:
    """Everything the outbound side needs about one upstream."""

    config: UpstreamConfig
    endpoints: tuple[Endpoint, ...] = ()
    protocol: str = DEFAULT_PROTOCOL
    methods: Mapping[str, str] = field(default_factory=dict)  # path -> kind, as published by its sidecars
    trust_domain: str = ""
    chain: CompiledChain | None = None  # the compiled discovery chain (None: not known yet, plain path)
    targets: Mapping[str, tuple[Endpoint, ...]] = field(default_factory=dict)  # chain target ID -> endpoints
    settings: UpstreamSettings = field(default_factory=UpstreamSettings)  # from our service-defaults

    @property
    def name(self) -> str:
        return self.config.destination_name

    @property
    def routed(self) -> bool:
        """Whether calls need the per-call path: a chain with more than one plain target, or limits,
        passive health checks or a connect timeout from service-defaults."""
        return (self.chain is not None and not self.chain.default) or self.settings != UpstreamSettings()


@dataclass(frozen=True, slots=True)
class InboundTraffic:
    """What the inbound side applies to calls into this instance beyond authorization."""

    local: LocalSettings = field(default_factory=LocalSettings)  # LocalRequestTimeoutMs, RateLimits
    caller_limits: CallerLimits | None = None  # KV weft/ratelimits/<service>
    faults: FaultDoc | None = None  # KV weft/faults/<service>
    ratelimits_version: str = ""  # the KV ModifyIndex of what is in force ("" = none)
    faults_version: str = ""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One complete, immutable configuration; ``version`` counts publications."""

    registration: Registration
    credentials: Credentials
    policy: Any  # the compiled table of this service (policies.model), or None for "no table yet"
    policy_version: str
    upstreams: Mapping[str, UpstreamState]
    local_methods: Mapping[str, str] = field(default_factory=dict)  # of the app behind this sidecar
    version: int = 0
    tap: TapSettings = OFF  # KV weft/tap/<service>: payload previews and redaction

    inbound: InboundTraffic = field(default_factory=InboundTraffic)

    def upstream(self, name: str) -> UpstreamState | None:
        return self.upstreams.get(name)

    def describe(self) -> dict[str, Any]:
        """A JSON-able view for ``/config``: no private key, ever."""
        r = self.registration
        c = self.credentials
        return {
            "version": self.version,
            "service": r.service,
            "service_id": r.service_id,
            "proxy_id": r.proxy_id,
            "protocol": r.protocol,
            "public_listener": f"{r.public_address}:{r.public_port}",
            "local_service": f"{r.local_service_address}:{r.local_service_port}",
            "certificate": {
                "spiffe_id": c.spiffe_id,
                "serial": c.serial,
                "not_after": c.not_after,
                "trust_domain": c.trust_domain,
                "roots_version": c.roots_version,
                "cert_pem": c.cert_pem,
            },
            "policy_version": self.policy_version,
            "local_methods": dict(sorted(self.local_methods.items())),
            "tap": {"payload": self.tap.payload, "max_bytes": self.tap.max_bytes, "redact": list(self.tap.redact),
                    "allow_binary": sorted(self.tap.allow_binary)},
            "upstreams": {
                name: {
                    "local_bind": f"{u.config.local_bind_address}:{u.config.local_bind_port}",
                    "protocol": u.protocol,
                    "endpoints": [e.key for e in u.endpoints],
                    "methods": dict(sorted(u.methods.items())),
                    "chain": describe_chain(u),
                }
                for name, u in sorted(self.upstreams.items())
            },
            "inbound": describe_inbound(self.inbound),
        }


def describe_chain(u: UpstreamState) -> dict[str, Any] | None:
    """The compiled chain as ``/config`` shows it: routes, splits, targets with their endpoints."""
    chain = u.chain
    if chain is None:
        return None
    nodes: dict[str, Any] = {}
    for key, node in chain.nodes.items():
        if node.type == "router":
            nodes[key] = {"routes": [{"match": _match_text(r.match), "next": r.next_node,
                                      **({"timeout": r.destination.request_timeout}
                                         if r.destination.request_timeout else {}),
                                      **({"retries": r.destination.num_retries,
                                          "retry_on": sorted({*r.destination.retry_on,
                                                              *map(str, r.destination.retry_on_status_codes)})}
                                         if r.destination.num_retries or r.destination.retry_on else {})}
                                     for r in node.routes]}
        elif node.type == "splitter":
            nodes[key] = {"splits": [{"weight": s.weight, "next": s.next_node} for s in node.splits]}
        else:
            nodes[key] = {"target": node.target, "failover": list(node.failover),
                          "connect_timeout": node.connect_timeout,
                          **({"load_balancer": node.load_balancer.policy} if node.load_balancer else {})}
    return {"protocol": chain.protocol, "default": chain.default, "start": chain.start_node, "nodes": nodes,
            "targets": {tid: {"service": t.service, "subset": t.subset, "filter": t.filter,
                              "endpoints": [e.key for e in u.targets.get(tid, ())]}
                        for tid, t in sorted(chain.targets.items())}}


def _match_text(m: Any) -> str:
    parts = []
    if m.path_exact:
        parts.append(f"path == {m.path_exact}")
    if m.path_prefix:
        parts.append(f"path ^= {m.path_prefix}")
    if m.path_regex is not None:
        parts.append(f"path ~ {m.path_regex.pattern}")
    parts += [f"header {h.name}" for h in m.headers]
    parts += [f"query {q.name}" for q in m.query]
    if m.methods:
        parts.append("method in " + ",".join(m.methods))
    return " and ".join(parts) or "any"


def describe_inbound(i: InboundTraffic) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if i.local.request_timeout:
        out["local_request_timeout"] = i.local.request_timeout
    inst = i.local.rate_limits
    if inst.limit is not None or inst.routes:
        out["instance_rate_limit"] = {
            **(inst.limit.as_json() if inst.limit else {}),
            "routes": [{"path": r.path_exact or r.path_prefix or (r.path_regex.pattern if r.path_regex else ""),
                        **r.limit.as_json()} for r in inst.routes]}
    if i.caller_limits is not None:
        out["caller_rate_limits"] = {
            "version": i.ratelimits_version,
            "per_caller": i.caller_limits.per_caller.as_json() if i.caller_limits.per_caller else None,
            "callers": {k: v.as_json() for k, v in sorted(i.caller_limits.callers.items())}}
    if i.faults is not None:
        f = i.faults
        out["faults"] = {"version": i.faults_version, "delay_percent": f.delay_percent, "delay": f.delay,
                         "abort_percent": f.abort_percent, "grpc_status": f.grpc_status,
                         "http_status": f.http_status, "sources": sorted(f.sources), "methods": list(f.methods)}
    return out


_MISSING: Any = object()


@dataclass
class SnapshotBuilder:
    """Collects pieces from watches; :meth:`build` returns a snapshot only when all are present.

    Every setter returns True when the value differs from the one held. Pieces are kept once
    received (fail static): a watch that errors simply stops calling the setter.
    """

    registration: Registration | None = None
    credentials: Credentials | None = None
    policy: Any = _MISSING
    policy_version: str = ""
    endpoints: dict[str, tuple[Endpoint, ...]] = field(default_factory=dict)
    protocols: dict[str, str] = field(default_factory=dict)
    methods: dict[str, dict[str, str]] = field(default_factory=dict)
    local_methods: dict[str, str] = field(default_factory=dict)
    tap: TapSettings = OFF
    chains: dict[str, CompiledChain] = field(default_factory=dict)  # upstream -> its compiled chain
    target_endpoints: dict[str, tuple[Endpoint, ...]] = field(default_factory=dict)  # target ID -> endpoints
    upstream_settings: dict[str, UpstreamSettings] = field(default_factory=dict)
    inbound: InboundTraffic = field(default_factory=InboundTraffic)
    _published: int = 0

    def set_tap(self, settings: TapSettings) -> bool:
        changed = settings != self.tap
        self.tap = settings
        return changed

    def set_registration(self, reg: Registration) -> bool:
        changed = reg != self.registration
        self.registration = reg
        return changed

    def set_credentials(self, creds: Credentials) -> bool:
        changed = creds != self.credentials
        self.credentials = creds
        return changed

    def set_policy(self, table: Any, version: str) -> bool:
        changed = self.policy is _MISSING or version != self.policy_version
        self.policy = table
        self.policy_version = version
        return changed

    def set_endpoints(self, upstream: str, endpoints: tuple[Endpoint, ...] | list[Endpoint]) -> bool:
        eps = tuple(sorted(set(endpoints)))
        changed = self.endpoints.get(upstream) != eps
        self.endpoints[upstream] = eps
        return changed

    def set_protocol(self, service: str, protocol: str) -> bool:
        p = normalize_protocol(protocol, what=f"protocol of {service}")
        changed = self.protocols.get(service) != p
        self.protocols[service] = p
        return changed

    def set_methods(self, upstream: str, methods: Mapping[str, str]) -> bool:
        m = validate_methods(methods, what=f"methods of {upstream}")
        changed = self.methods.get(upstream) != m
        self.methods[upstream] = m
        return changed

    def set_local_methods(self, methods: Mapping[str, str]) -> bool:
        m = validate_methods(methods, what="methods of the local app")
        changed = m != self.local_methods
        self.local_methods = m
        return changed

    def set_chain(self, upstream: str, chain: CompiledChain) -> bool:
        changed = self.chains.get(upstream) != chain
        self.chains[upstream] = chain
        return changed

    def set_target_endpoints(self, target_id: str, endpoints: tuple[Endpoint, ...] | list[Endpoint]) -> bool:
        eps = tuple(sorted(set(endpoints)))
        changed = self.target_endpoints.get(target_id) != eps
        self.target_endpoints[target_id] = eps
        return changed

    def set_upstream_settings(self, upstream: str, settings: UpstreamSettings) -> bool:
        changed = self.upstream_settings.get(upstream, UpstreamSettings()) != settings
        self.upstream_settings[upstream] = settings
        return changed

    def set_inbound(self, inbound: InboundTraffic) -> bool:
        changed = inbound != self.inbound
        self.inbound = inbound
        return changed

    def endpoints_of_target(self, upstream: str, chain: CompiledChain, target_id: str) -> tuple[Endpoint, ...]:
        """A target's endpoints: its own watch's, or the upstream's plain list for the plain target
        (the upstream's service, no subset filter, this datacenter)."""
        if target_id in self.target_endpoints:
            return self.target_endpoints[target_id]
        t = chain.targets[target_id]
        if t.service == upstream and not t.filter and not t.peer and t.datacenter in ("", chain.datacenter):
            return self.endpoints.get(upstream, ())
        return ()

    def missing(self) -> list[str]:
        """What is still needed before a snapshot can be published (empty when complete)."""
        out: list[str] = []
        if self.registration is None:
            out.append("registration")
        if self.credentials is None:
            out.append("leaf certificate")
        if self.policy is _MISSING:
            out.append("policy")
        if self.registration is not None:
            for u in self.registration.upstreams:
                if u.destination_name not in self.endpoints:
                    out.append(f"endpoints of {u.destination_name}")
                if u.destination_name not in self.protocols:
                    out.append(f"protocol of {u.destination_name}")
        return out

    def build(self) -> Snapshot | None:
        if self.missing():
            return None
        assert self.registration is not None and self.credentials is not None
        reg = self.registration
        own_protocol = self.protocols.get(reg.service, reg.protocol)
        if own_protocol != reg.protocol:
            reg = replace(reg, protocol=own_protocol)
        ups: dict[str, UpstreamState] = {}
        for u in reg.upstreams:
            name = u.destination_name
            chain = self.chains.get(name)
            ups[name] = UpstreamState(
                config=u,
                endpoints=self.endpoints.get(name, ()),
                protocol=self.protocols.get(name, DEFAULT_PROTOCOL),
                methods=dict(self.methods.get(name, {})),
                trust_domain=self.credentials.trust_domain,
                chain=chain,
                targets={tid: self.endpoints_of_target(name, chain, tid) for tid in chain.targets} if chain else {},
                settings=self.upstream_settings.get(name, UpstreamSettings()),
            )
        self._published += 1
        return Snapshot(
            registration=reg,
            credentials=self.credentials,
            policy=self.policy,
            policy_version=self.policy_version,
            upstreams=ups,
            local_methods=dict(self.local_methods),
            version=self._published,
            tap=self.tap,
            inbound=self.inbound,
        )


def diff(old: Snapshot | None, new: Snapshot) -> list[dict[str, Any]]:
    """The configuration changes from ``old`` to ``new``, one dict per log line."""
    changes: list[dict[str, Any]] = []
    if old is None:
        changes.append({"change": "initial", "service": new.registration.service, "version": new.version})
    oc = old.credentials if old else None
    if oc is None or oc.serial != new.credentials.serial:
        changes.append({"change": "certificate", "serial": new.credentials.serial,
                        "previous_serial": oc.serial if oc else None, "not_after": new.credentials.not_after})
    if oc is None or oc.roots_pem != new.credentials.roots_pem:
        changes.append({"change": "roots", "roots_version": new.credentials.roots_version,
                        "previous_roots_version": oc.roots_version if oc else None})
    if old is None or old.policy_version != new.policy_version:
        changes.append({"change": "policy", "policy_version": new.policy_version,
                        "previous_policy_version": old.policy_version if old else None})
    if old is not None and old.registration.protocol != new.registration.protocol:
        changes.append({"change": "protocol", "service": new.registration.service,
                        "protocol": new.registration.protocol})
    if old is not None and old.tap != new.tap:
        changes.append({"change": "tap", "payload": new.tap.payload, "max_bytes": new.tap.max_bytes,
                        "redact": list(new.tap.redact)})
    if old is not None and dict(old.local_methods) != dict(new.local_methods):
        changes.append({"change": "local_methods", "count": len(new.local_methods)})
    for name, up in sorted(new.upstreams.items()):
        prev = old.upstreams.get(name) if old else None
        before = {e.key for e in prev.endpoints} if prev else set()
        after = {e.key for e in up.endpoints}
        if prev is None or before != after:
            changes.append({"change": "endpoints", "upstream": name, "endpoints": sorted(after),
                            "added": sorted(after - before), "removed": sorted(before - after)})
        if prev is not None and prev.protocol != up.protocol:
            changes.append({"change": "protocol", "service": name, "protocol": up.protocol})
        if prev is not None and dict(prev.methods) != dict(up.methods):
            changes.append({"change": "methods", "upstream": name, "count": len(up.methods)})
        if (prev.chain if prev else None) != up.chain and up.chain is not None:
            c = up.chain
            splits = [f"{s.weight:g}%->{c.nodes[s.next_node].target}" for n in c.nodes.values() for s in n.splits]
            changes.append({"change": "chain", "upstream": name, "start": c.start_node, "protocol": c.protocol,
                            "targets": sorted(c.targets), **({"splits": splits} if splits else {})})
        if prev is not None and prev.targets != up.targets:
            changes.append({"change": "target_endpoints", "upstream": name,
                            "targets": {t: [e.key for e in eps] for t, eps in sorted(up.targets.items())}})
        if prev is not None and prev.settings != up.settings:
            changes.append({"change": "upstream_settings", "upstream": name})
    oi = old.inbound if old else InboundTraffic()
    if oi.ratelimits_version != new.inbound.ratelimits_version:
        changes.append({"change": "ratelimits", "version": new.inbound.ratelimits_version or "none"})
    if oi.faults_version != new.inbound.faults_version:
        changes.append({"change": "faults", "version": new.inbound.faults_version or "none"})
    if oi.local != new.inbound.local:
        changes.append({"change": "service_defaults", "service": new.registration.service})
    if old is not None:
        for name in sorted(set(old.upstreams) - set(new.upstreams)):
            changes.append({"change": "upstream_removed", "upstream": name})
    return changes
