"""The checks Consul makes across config entries before it accepts a write (pure: no I/O).

Consul's state store compiles the discovery chain of every service a proposed write touches
(``validateProposedConfigEntryInGraph``) and refuses the write when a chain does not compile:

- a service-router or service-splitter on a chain whose protocol is not HTTP-like (http, http2,
  grpc), the protocol coming from service-defaults, else proxy-defaults ``Config.protocol``,
  else ``tcp``;
- services of one chain with different protocols;
- a subset a route, split, redirect or failover names that the service's resolver does not define;
- circular resolver redirects and circular splitter references;
- an ingress-gateway listener whose services' protocol differs from the listener's;
- an intention with L7 permissions on a service whose protocol is not HTTP-like.

The same checks run when an entry is deleted (deleting the service-defaults that made a splitter
legal is refused too). ``check(lookup, written_kind)`` raises ``ConfigEntryError`` with Consul's
words; Consul answers those with 500.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from devagent import chaincompile
from devagent import configentries as ce
from devagent.configcheck import WILDCARD, is_http_like
from devagent.configentries import ConfigEntryError

# (kind, name) -> the entry as it would be after the write, or None
Lookup = Callable[[str, str], Mapping[str, Any] | None]

GRAPH_KINDS = (ce.SERVICE_DEFAULTS, ce.PROXY_DEFAULTS, *ce.DISCOVERY_CHAIN_KINDS, ce.INGRESS_GATEWAY,
               ce.SERVICE_INTENTIONS)


def protocol_of(lookup: Lookup, service: str) -> str:
    """Consul's protocolForService: service-defaults, else proxy-defaults ``Config.protocol``, else tcp."""
    sd = lookup(ce.SERVICE_DEFAULTS, service)
    if sd is not None and sd.get("Protocol"):
        return str(sd["Protocol"]).lower()
    pd = lookup(ce.PROXY_DEFAULTS, ce.PROXY_DEFAULTS_NAME)
    cfg = (pd or {}).get("Config") or {}
    if isinstance(cfg, Mapping):
        for k, v in cfg.items():
            if str(k).lower() == "protocol" and isinstance(v, str) and v:
                return v.lower()
    return "tcp"


def compile_chain(lookup: Lookup, service: str, datacenter: str = "dc1") -> tuple[str, str]:
    """(protocol, first node type) of ``service``'s chain; raises ConfigEntryError as Consul's compiler."""
    protocol, top, _ = _compile(lookup, service, datacenter)
    return protocol, top


def _compile(lookup: Lookup, service: str, datacenter: str) -> tuple[str, str, set[str]]:
    compiled = chaincompile.compile_chain(lookup, service, datacenter=datacenter)
    return compiled.protocol, compiled.start_type, compiled.touched


def chain_services(entries: Iterable[Mapping[str, Any]]) -> set[str]:
    """Every service whose chain an entry of these may change: the entries' names and the services
    their routes, splits, redirects and failovers name."""
    names: set[str] = set()
    for e in entries:
        kind = e.get("Kind")
        if kind in (ce.SERVICE_DEFAULTS, *ce.DISCOVERY_CHAIN_KINDS):
            names.add(str(e["Name"]))
            names.update(related_services(e))
    return names


def related_services(entry: Mapping[str, Any]) -> list[str]:
    """Consul's ListRelatedServices: the other services a chain entry sends traffic to."""
    name = str(entry.get("Name", ""))
    found: set[str] = set()
    kind = entry.get("Kind")
    if kind == ce.SERVICE_ROUTER:
        for route in entry.get("Routes") or []:
            dest = route.get("Destination")
            if dest:
                found.add(dest.get("Service") or name)
    elif kind == ce.SERVICE_SPLITTER:
        found.update(s.get("Service") or name for s in entry.get("Splits") or [])
    elif kind == ce.SERVICE_RESOLVER:
        if entry.get("Redirect"):
            found.add(entry["Redirect"].get("Service") or name)
        for f in (entry.get("Failover") or {}).values():
            if f.get("Targets"):
                found.update(t.get("Service") or name for t in f["Targets"] if not t.get("Peer"))
            else:
                found.add(f.get("Service") or name)
    found.discard(name)
    return sorted(found)


def affected_services(kind: str, entries: Iterable[Mapping[str, Any] | None]) -> set[str] | None:
    """The services whose checks a write of ``kind`` (old and new versions in ``entries``) can change;
    None when it can change every service's (proxy-defaults sets the default protocol)."""
    if kind == ce.PROXY_DEFAULTS:
        return None
    names: set[str] = set()
    for e in entries:
        if e is None:
            continue
        if kind == ce.INGRESS_GATEWAY:
            names.update(s.get("Name", "") for lis in e.get("Listeners") or [] for s in lis.get("Services") or [])
        else:
            names.add(str(e.get("Name", "")))
            names.update(related_services(e))
    names.discard("")
    return names


def check(lookup: Lookup, entries: Iterable[Mapping[str, Any]], *, written_kind: str,
          affected: set[str] | None, datacenter: str = "dc1") -> None:
    """Refuse (ConfigEntryError) a proposed state (``lookup``, ``entries``: every entry of it) in which
    a chain reaching an ``affected`` service (None: any) does not compile, an ingress listener
    exposing one speaks another protocol, or an L7 intention on one is not on an HTTP-like service."""
    all_entries = list(entries)
    chains: dict[str, tuple[str, str]] = {}

    def hit(names: Iterable[str]) -> bool:
        return affected is None or any(n in affected for n in names)

    def chain(service: str) -> tuple[str, str]:
        if service not in chains:
            chains[service] = compile_chain(lookup, service, datacenter)
        return chains[service]

    for service in sorted(chain_services(all_entries) | (affected or set())):
        try:
            protocol, top, _touched = _compile(lookup, service, datacenter)
        except ConfigEntryError as exc:
            if hit(getattr(exc, "touched", {service})):
                raise
            continue
        chains[service] = (protocol, top)
    strict = written_kind == ce.INGRESS_GATEWAY
    for e in all_entries:
        if e.get("Kind") == ce.INGRESS_GATEWAY:
            for listener in e.get("Listeners") or []:
                want = listener.get("Protocol") or "tcp"
                for svc in listener.get("Services") or []:
                    name = svc.get("Name", "")
                    if not name or name == WILDCARD or not hit([name]):
                        continue
                    proto, top = chain(name)
                    if proto != want and (strict or want != "tcp" or top != "resolver"):
                        raise ConfigEntryError(f'service "{name}" has protocol "{proto}", which does not match '
                                               f'defined listener protocol "{want}"')
        elif e.get("Kind") == ce.SERVICE_INTENTIONS:
            dest = str(e.get("Name", ""))
            if dest == WILDCARD or not hit([dest]) or not any(s.get("Permissions") for s in e.get("Sources") or []):
                continue
            proto, _ = chain(dest)
            if not is_http_like(proto):
                raise ConfigEntryError(f'service "{dest}" has protocol "{proto}", which is incompatible with L7 '
                                       "intentions permissions")
