"""Consul's discovery-chain compiler: config entries -> the compiled chain of one service (pure: no I/O).

The chain is the graph ``GET /v1/discovery-chain/:service`` serves and proxies consume:
router -> splitter -> resolver nodes, and the targets (service, subset, datacenter) resolvers end at.
The walk follows Consul's ``agent/consul/discoverychain`` compiler:

- the start node is the service's router if it has one (plus a catch-all ``PathPrefix "/"`` route
  to the service itself), else its splitter, else its resolver;
- a route or split without a subset goes to the destination's splitter (when another service's),
  else its resolver; with a subset straight to the resolver of that subset;
- a resolver applies ``Redirect`` (service, subset, datacenter, peer) and ``DefaultSubset`` again and
  again until the target stops changing (a loop is "detected circular resolver redirect"), refuses
  an unknown subset, records ``ConnectTimeout`` (5s when unset), ``RequestTimeout`` and the
  ``LoadBalancer``; ``Failover`` (for the subset, else ``"*"``) lists the rewritten failover targets;
- nested splitters are flattened (weights multiplied), nodes no route reaches are dropped;
- every service on the chain must share one protocol (service-defaults ``Protocol``, else
  proxy-defaults ``Config.protocol``, else tcp), and routers/splitters need an HTTP-like one;
- the POST overrides (protocol, connect timeout, mesh gateway mode) customise the result and set
  ``CustomizationHash`` (our own 8 hex digits: Consul's is a hashstructure value of Go structs).

``compile_chain`` returns ``Compiled`` (the ``Chain`` JSON, the protocol, the services it touched)
or raises ``ConfigEntryError`` with Consul's words. ``discoverychain.check`` uses it to refuse
writes that would leave a chain that does not compile.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from devagent import configentries as ce
from devagent.codec import format_duration, parse_duration
from devagent.configentries import ConfigEntryError

Lookup = Callable[[str, str], Mapping[str, Any] | None]

DEFAULT_NS = "default"
DEFAULT_PARTITION = "default"
DEFAULT_CONNECT_TIMEOUT_NS = 5_000_000_000
HTTP_LIKE = ("http", "http2", "grpc")
MESH_GATEWAY_MODES = ("", "none", "local", "remote")
WILDCARD = "*"


@dataclass(frozen=True)
class Overrides:
    """The POST body of ``/v1/discovery-chain/:service`` (Consul's CompileRequest overrides)."""

    protocol: str = ""
    connect_timeout_ns: int = 0
    mesh_gateway_mode: str = ""


@dataclass
class Compiled:
    chain: dict[str, Any]
    protocol: str
    start_type: str  # router | splitter | resolver
    touched: set[str] = field(default_factory=set)  # every service whose entries the chain read


@dataclass
class _Target:
    service: str
    subset: str
    namespace: str
    partition: str
    datacenter: str
    peer: str
    id: str
    sni: str = ""
    connect_timeout: int = 0
    subset_def: dict[str, Any] = field(default_factory=dict)
    mesh_gateway: dict[str, Any] = field(default_factory=dict)
    transparent_proxy: dict[str, Any] = field(default_factory=dict)
    external: bool = False

    def opts(self) -> dict[str, str]:
        return {"Service": self.service, "ServiceSubset": self.subset, "Namespace": self.namespace,
                "Partition": self.partition, "Datacenter": self.datacenter, "Peer": self.peer}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ID": self.id, "Service": self.service}
        for key, value in (("ServiceSubset", self.subset), ("Namespace", self.namespace),
                           ("Partition", self.partition), ("Datacenter", self.datacenter), ("Peer", self.peer)):
            if value:
                out[key] = value
        out["MeshGateway"] = dict(self.mesh_gateway)
        out["Subset"] = _omit_empty(self.subset_def)
        out["TransparentProxy"] = dict(self.transparent_proxy)
        if self.connect_timeout:
            out["ConnectTimeout"] = format_duration(self.connect_timeout)
        if self.external:
            out["External"] = True
        if self.sni:
            out["SNI"] = self.sni
            out["Name"] = self.sni
        return out


def target_id(service: str, subset: str, namespace: str, partition: str, datacenter: str, peer: str = "") -> str:
    """Consul's chainID: ``[subset.]service.namespace.partition.datacenter`` (peers: ``.external.<peer>``)."""
    if peer:
        return f"{service}.{namespace}.default.external.{peer}"
    base = f"{service}.{namespace}.{partition}.{datacenter}"
    return f"{subset}.{base}" if subset else base


def service_sni(service: str, subset: str, namespace: str, partition: str, datacenter: str, trust_domain: str) -> str:
    """Consul's ServiceSNI (``[subset.]service.ns.dc.internal.<trust domain>`` in the default partition)."""
    parts = [subset] if subset else []
    if partition in ("", DEFAULT_PARTITION):
        parts += [service, namespace or DEFAULT_NS, datacenter, "internal", trust_domain]
    else:
        parts += [service, namespace or DEFAULT_NS, partition, datacenter, "internal-v1", trust_domain]
    return ".".join(parts)


def _sid(service: str) -> str:
    return f"{service}.{DEFAULT_NS}.{DEFAULT_PARTITION}"


def _omit_empty(value: Any) -> Any:
    """Go's ``omitempty`` for the definitions the chain echoes: zero values and empty containers go."""
    if isinstance(value, Mapping):
        out = {k: _omit_empty(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, "", 0, False, [], {}) or v is True}
    if isinstance(value, list):
        return [_omit_empty(v) for v in value]
    return value


def _duration_ns(value: Any) -> int:
    if isinstance(value, str) and value:
        return parse_duration(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    return 0


def _is_default_resolver(entry: Mapping[str, Any]) -> bool:
    return (not entry.get("DefaultSubset") and not entry.get("Subsets") and entry.get("Redirect") is None
            and not entry.get("Failover") and not _duration_ns(entry.get("ConnectTimeout"))
            and not _duration_ns(entry.get("RequestTimeout")) and entry.get("LoadBalancer") is None)


def _is_hash_lb(lb: Mapping[str, Any] | None) -> bool:
    return bool(lb) and (lb or {}).get("Policy") in ("ring_hash", "maglev")


def _weight(value: float) -> float | int:
    w = round(value * 100) / 100
    return int(w) if w == int(w) else w


def _merge_headers(parent: Mapping[str, Any] | None, child: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Consul's MergeHTTPHeaderModifiers: the parent's Add/Set, the child's on top, both Removes."""
    if not parent:
        return dict(child) if child else None
    out: dict[str, Any] = {"Add": dict(parent.get("Add") or {}), "Set": dict(parent.get("Set") or {}),
                           "Remove": list(parent.get("Remove") or [])}
    for key in ("Add", "Set"):
        out[key].update((child or {}).get(key) or {})
    out["Remove"] += [r for r in (child or {}).get("Remove") or [] if r not in out["Remove"]]
    return out


class _Compiler:
    def __init__(self, lookup: Lookup, service: str, datacenter: str, trust_domain: str,
                 overrides: Overrides) -> None:
        self.lookup = lookup
        self.service = service
        self.dc = datacenter
        self.trust_domain = trust_domain
        self.overrides = overrides
        self.disable_advanced = bool(overrides.protocol) and overrides.protocol not in HTTP_LIKE
        self.advanced = False
        self.protocol = ""
        self.customized: set[str] = set()
        self.nodes: dict[str, dict[str, Any]] = {}
        self.splitter_nodes: dict[str, dict[str, Any]] = {}
        self.resolver_nodes: dict[str, dict[str, Any]] = {}
        self.targets: dict[str, _Target] = {}
        self.retained: set[str] = set()
        self.touched: set[str] = {service}
        self.start = ""

    # ----- entries -----
    def _entry(self, kind: str, service: str) -> Mapping[str, Any] | None:
        self.touched.add(service)
        return self.lookup(kind, service)

    def _proxy_defaults(self) -> Mapping[str, Any]:
        return self.lookup(ce.PROXY_DEFAULTS, ce.PROXY_DEFAULTS_NAME) or {}

    def record_protocol(self, service: str) -> None:
        sd = self._entry(ce.SERVICE_DEFAULTS, service)
        proto = ""
        if sd is not None:
            proto = str(sd.get("Protocol") or "")
        else:
            cfg = self._proxy_defaults().get("Config") or {}
            if isinstance(cfg, Mapping):
                for k, v in cfg.items():
                    if str(k).lower() == "protocol" and isinstance(v, str):
                        proto = v
        proto = proto.lower() or "tcp"
        if not self.protocol:
            self.protocol = proto
        elif proto != self.protocol:
            raise ConfigEntryError(f'discovery chain "{self.service}" uses inconsistent protocols; service '
                                   f'"{service}" has "{proto}" which is not "{self.protocol}"')

    # ----- targets -----
    def new_target(self, service: str, subset: str = "", namespace: str = "", partition: str = "",
                   datacenter: str = "", peer: str = "") -> _Target:
        if peer:
            datacenter, partition, namespace = "", DEFAULT_PARTITION, namespace or DEFAULT_NS
        else:
            datacenter = datacenter or self.dc
            namespace = namespace or DEFAULT_NS
            partition = partition or DEFAULT_PARTITION
        tid = target_id(service, subset, namespace, partition, datacenter, peer)
        prev = self.targets.get(tid)
        if prev is not None:
            return prev
        t = _Target(service, subset, namespace, partition, datacenter, peer, tid)
        if not peer:
            t.sni = service_sni(service, subset, namespace, partition, datacenter, self.trust_domain)
        self.targets[tid] = t
        return t

    def rewrite(self, t: _Target, opts: Mapping[str, Any]) -> _Target:
        merged = t.opts()
        service = str(opts.get("Service") or "")
        if service and service != merged["Service"]:
            merged["Service"], merged["ServiceSubset"] = service, ""
        for key in ("ServiceSubset", "Partition", "Datacenter"):
            if opts.get(key):
                merged[key] = str(opts[key])
        if opts.get("Namespace") or opts.get("Peer"):
            merged["Namespace"] = str(opts.get("Namespace") or "")
        merged["Peer"] = str(opts.get("Peer") or "")
        return self.new_target(merged["Service"], merged["ServiceSubset"], merged["Namespace"],
                               merged["Partition"], merged["Datacenter"], merged["Peer"])

    # ----- nodes -----
    def assemble(self) -> None:
        router = self._entry(ce.SERVICE_ROUTER, self.service)
        if router is not None and self.disable_advanced:
            router = None
            self.customized.add("Protocol")
        if router is None:
            self.start = self.splitter_or_resolver(self.new_target(self.service))["_key"]
            return
        name = _sid(self.service)
        node: dict[str, Any] = {"Type": "router", "Name": name, "Routes": [], "_key": "router:" + name}
        self.advanced = True
        self.record_protocol(self.service)
        for route in router.get("Routes") or []:
            dest = route.get("Destination") or {}
            svc = dest.get("Service") or self.service
            if dest.get("ServiceSubset"):
                nxt = self.resolver(self.new_target(svc, str(dest["ServiceSubset"]), str(dest.get("Namespace") or ""),
                                                    str(dest.get("Partition") or "")))
            else:
                nxt = self.splitter_or_resolver(self.new_target(svc, "", str(dest.get("Namespace") or ""),
                                                                str(dest.get("Partition") or "")))
            node["Routes"].append({"Definition": _omit_empty(route), "NextNode": nxt["_key"]})
        catch_all = self.splitter_or_resolver(self.new_target(self.service))
        node["Routes"].append({
            "Definition": {"Match": {"HTTP": {"PathPrefix": "/"}},
                           "Destination": {"Service": self.service, "Namespace": DEFAULT_NS,
                                           "Partition": DEFAULT_PARTITION}},
            "NextNode": catch_all["_key"]})
        self.nodes[node["_key"]] = node
        self.start = node["_key"]

    def splitter_or_resolver(self, target: _Target) -> dict[str, Any]:
        node = self.splitter(target.service)
        return node if node is not None else self.resolver(target)

    def splitter(self, service: str) -> dict[str, Any] | None:
        name = _sid(service)
        if name in self.splitter_nodes:
            return self.splitter_nodes[name]
        entry = self._entry(ce.SERVICE_SPLITTER, service)
        if entry is not None and self.disable_advanced:
            entry = None
            self.customized.add("Protocol")
        if entry is None:
            return None
        node: dict[str, Any] = {"Type": "splitter", "Name": name, "Splits": [], "_key": "splitter:" + name}
        self.splitter_nodes[name] = node  # recorded before recursing: a loop ends here
        self.nodes[node["_key"]] = node
        has_lb = False
        for split in entry.get("Splits") or []:
            compiled: dict[str, Any] = {"Definition": _omit_empty(split),
                                        "Weight": _weight(float(split.get("Weight") or 0))}
            node["Splits"].append(compiled)
            svc = split.get("Service") or service
            subset = str(split.get("ServiceSubset") or "")
            if svc != service and not subset:
                inner = self.splitter(svc)
                if inner is not None:
                    compiled["NextNode"] = inner["_key"]
                    continue
            nxt = self.resolver(self.new_target(svc, subset))
            compiled["NextNode"] = nxt["_key"]
            if not has_lb and _is_hash_lb(nxt.get("LoadBalancer")):
                node["LoadBalancer"] = nxt["LoadBalancer"]
                has_lb = True
        self.advanced = True
        return node

    def resolver(self, target: _Target, for_failover: bool = False) -> dict[str, Any]:
        """The resolver node of `target` (compiled once per target): redirects followed, connect
        timeout, load balancer, how the target is reached, and its failover targets."""
        target, entry = self._resolve_target(target)
        if target.id in self.resolver_nodes:
            return self.resolver_nodes[target.id]
        subsets: Mapping[str, Any] = entry.get("Subsets") or {}
        connect_timeout = _duration_ns(entry.get("ConnectTimeout"))
        if connect_timeout < 1:
            connect_timeout = DEFAULT_CONNECT_TIMEOUT_NS
        if self.overrides.connect_timeout_ns > 0 and connect_timeout != self.overrides.connect_timeout_ns:
            connect_timeout = self.overrides.connect_timeout_ns
            self.customized.add("ConnectTimeout")
        target.connect_timeout = connect_timeout
        resolver: dict[str, Any] = {}
        if _is_default_resolver(entry):
            resolver["Default"] = True
        resolver["ConnectTimeout"] = format_duration(connect_timeout)
        request_timeout = _duration_ns(entry.get("RequestTimeout"))
        if request_timeout:
            resolver["RequestTimeout"] = request_timeout  # a Go time.Duration without a marshaller: nanoseconds
        resolver["Target"] = target.id
        node: dict[str, Any] = {"Type": "resolver", "Name": target.id, "Resolver": resolver,
                                "_key": "resolver:" + target.id}
        if entry.get("LoadBalancer") is not None:
            node["LoadBalancer"] = _omit_empty(entry["LoadBalancer"])
        target.subset_def = dict(subsets.get(target.subset) or {}) if target.subset else {}
        self._target_routing(target, entry)
        self.retained.add(target.id)
        if for_failover:
            return node
        self.resolver_nodes[target.id] = node
        self.nodes[node["_key"]] = node
        failover = self._failover(target, entry)
        if failover is not None:
            resolver["Failover"] = failover
        return node

    def _resolve_target(self, target: _Target) -> tuple[_Target, Mapping[str, Any]]:
        """Follow the resolvers' redirects and default subsets to the target that serves `target`, with
        the resolver entry that governs it (a default one when there is none)."""
        history: list[str] = []
        while True:
            if target.id in self.resolver_nodes:
                return target, {}
            if not target.peer:
                self.record_protocol(target.service)
            entry = self._entry(ce.SERVICE_RESOLVER, target.service) or {"Kind": ce.SERVICE_RESOLVER,
                                                                            "Name": target.service}
            if target.id in history:
                history.append(target.id)
                raise ConfigEntryError(f"detected circular resolver redirect: [{' -> '.join(history)}]")
            history.append(target.id)
            redirect = entry.get("Redirect")
            if redirect is not None:
                moved = self.rewrite(target, redirect)
                if moved.id != target.id:
                    target = moved
                    continue
            if not target.subset and entry.get("DefaultSubset"):
                target = self.rewrite(target, {"ServiceSubset": entry["DefaultSubset"]})
                continue
            subsets: Mapping[str, Any] = entry.get("Subsets") or {}
            if target.subset and target.subset not in subsets:
                raise ConfigEntryError(f'service "{target.service}" does not have a subset named "{target.subset}"')
            return target, entry

    def _target_routing(self, target: _Target, entry: Mapping[str, Any]) -> None:
        """How the target is reached: its external SNI (service-defaults), or the mesh gateway mode and
        transparent-proxy dialing (service-defaults, then proxy-defaults, then the request's override)."""
        sd = self.lookup(ce.SERVICE_DEFAULTS, target.service) if not target.peer else None
        if sd is not None and sd.get("ExternalSNI"):
            target.sni, target.external = str(sd["ExternalSNI"]), True
            for what, present in (("redirects", entry.get("Redirect") is not None),
                                  ("subsets", bool(entry.get("Subsets"))), ("failover", bool(entry.get("Failover")))):
                if present:
                    raise ConfigEntryError(f'service "{target.service}" has an external SNI set; cannot define '
                                           f"{what} for external services")
        if target.external:
            return
        mode = ""
        if sd is not None:
            mode = str((sd.get("MeshGateway") or {}).get("Mode") or "")
            if (sd.get("TransparentProxy") or {}).get("DialedDirectly"):
                target.transparent_proxy = {"DialedDirectly": True}
        pd = self._proxy_defaults()
        if pd:
            mode = mode or str((pd.get("MeshGateway") or {}).get("Mode") or "")
            if not target.transparent_proxy and (pd.get("TransparentProxy") or {}).get("DialedDirectly"):
                target.transparent_proxy = {"DialedDirectly": True}
        want = self.overrides.mesh_gateway_mode
        if want and want != mode:
            mode = want
            self.customized.add("MeshGateway")
        target.mesh_gateway = {"Mode": mode} if mode else {}

    def _failover(self, target: _Target, entry: Mapping[str, Any]) -> dict[str, Any] | None:
        """The resolver's failover for the target's subset (or ``*``): its targets, each compiled as a
        resolver of its own, and the policy (the resolver's, else proxy-defaults'); None without one."""
        failovers: Mapping[str, Any] = entry.get("Failover") or {}
        failover = failovers.get(target.subset, failovers.get(WILDCARD))
        if not failover:
            return None
        if failover.get("Datacenters"):
            goals = [self.rewrite(target, {**failover, "Datacenter": dc}) for dc in failover["Datacenters"]]
        elif failover.get("Targets"):
            goals = [self.rewrite(target, t) for t in failover["Targets"]]
        else:
            goals = [self.rewrite(target, failover)]
        goals = [g for g in goals if g.id != target.id]
        if not goals:
            return None
        df: dict[str, Any] = {"Targets": []}
        policy = failover.get("Policy")
        if not policy or not policy.get("Mode"):
            policy = self._proxy_defaults().get("FailoverPolicy")
        if policy:
            df["Policy"] = _omit_empty(policy)
        for goal in goals:
            df["Targets"].append(self.resolver(goal, for_failover=True)["Resolver"]["Target"])
        return df

    # ----- after assembly -----
    def detect_cycles(self) -> None:
        def visit(key: str, path: list[str]) -> None:
            if key in path:
                raise ConfigEntryError(f"detected circular reference: [{' -> '.join([*path, key])}]")
            node = self.nodes[key]
            nxt = [r["NextNode"] for r in node.get("Routes", [])] + [s["NextNode"] for s in node.get("Splits", [])]
            for n in nxt:
                visit(n, [*path, key])

        visit(self.start, [])

    def flatten_splitters(self) -> None:
        changed = True
        while changed:
            changed = False
            for node in self.nodes.values():
                if node["Type"] != "splitter":
                    continue
                fixed: list[dict[str, Any]] = []
                touched = False
                for split in node["Splits"]:
                    inner = self.nodes[split["NextNode"]]
                    if inner["Type"] != "splitter":
                        fixed.append(split)
                        continue
                    touched = True
                    for s in inner["Splits"]:
                        definition = dict(s["Definition"])
                        for hdr in ("RequestHeaders", "ResponseHeaders"):
                            merged = _merge_headers(split["Definition"].get(hdr), s["Definition"].get(hdr))
                            if merged:
                                definition[hdr] = _omit_empty(merged)
                        fixed.append({"Definition": definition,
                                      "Weight": _weight(float(split["Weight"]) * float(s["Weight"]) / 100),
                                      "NextNode": s["NextNode"]})
                if touched:
                    node["Splits"] = fixed
                    changed = True

    def prune(self) -> None:
        seen: set[str] = set()
        todo = [self.start]
        while todo:
            key = todo.pop()
            if key in seen:
                continue
            seen.add(key)
            node = self.nodes[key]
            todo += [r["NextNode"] for r in node.get("Routes", [])] + [s["NextNode"] for s in node.get("Splits", [])]
        self.nodes = {k: v for k, v in self.nodes.items() if k in seen}

    def is_default(self) -> bool:
        node = self.nodes.get(self.start)
        if node is None or node["Type"] != "resolver" or not node["Resolver"].get("Default"):
            return node is None
        target = self.targets[node["Resolver"]["Target"]]
        return (target.service, target.namespace, target.partition) == (self.service, DEFAULT_NS,
                                                                        DEFAULT_PARTITION)

    def compile(self) -> Compiled:
        self.assemble()
        self.detect_cycles()
        self.flatten_splitters()
        self.prune()
        if self.advanced and self.protocol not in HTTP_LIKE:
            raise ConfigEntryError(f'discovery chain "{self.service}" uses a protocol "{self.protocol}" that does '
                                   "not permit advanced routing or splitting behavior")
        protocol = self.protocol
        if self.overrides.protocol and self.overrides.protocol != protocol:
            protocol = self.overrides.protocol
            self.customized.add("Protocol")
        chain: dict[str, Any] = {"ServiceName": self.service, "Namespace": DEFAULT_NS, "Partition": DEFAULT_PARTITION,
                                 "Datacenter": self.dc}
        if self.customized:
            custom = {"MeshGateway": self.overrides.mesh_gateway_mode if "MeshGateway" in self.customized else "",
                      "Protocol": self.overrides.protocol if "Protocol" in self.customized else "",
                      "ConnectTimeout": (self.overrides.connect_timeout_ns
                                         if "ConnectTimeout" in self.customized else 0)}
            chain["CustomizationHash"] = hashlib.sha256(json.dumps(custom, sort_keys=True).encode()).hexdigest()[:8]
        if self.is_default():
            chain["Default"] = True
        chain["Protocol"] = protocol
        sd = self.lookup(ce.SERVICE_DEFAULTS, self.service)
        if sd is not None and sd.get("Meta"):
            chain["ServiceMeta"] = dict(sd["Meta"])
        extensions = list(self._proxy_defaults().get("EnvoyExtensions") or []) + list(
            (sd or {}).get("EnvoyExtensions") or [])
        if extensions:
            chain["EnvoyExtensions"] = extensions
        chain["StartNode"] = self.start
        chain["Nodes"] = {k: {f: v for f, v in n.items() if f != "_key"} for k, n in sorted(self.nodes.items())}
        chain["Targets"] = {tid: self.targets[tid].to_json() for tid in sorted(self.retained)}
        start_type = self.nodes[self.start]["Type"]
        return Compiled(chain, protocol, start_type, self.touched)


def compile_chain(lookup: Lookup, service: str, *, datacenter: str = "dc1", trust_domain: str = "consul",
                  overrides: Overrides | None = None) -> Compiled:
    """The compiled discovery chain of ``service`` from the entries ``lookup`` finds (kind, name -> entry
    or None). Raises ``ConfigEntryError`` (with ``touched``: the services read) as Consul's compiler."""
    c = _Compiler(lookup, service, datacenter, trust_domain, overrides or Overrides())
    try:
        return c.compile()
    except ConfigEntryError as exc:
        exc.touched = c.touched  # type: ignore[attr-defined]
        raise
