"""Which services a gateway fronts, from its ingress-gateway or terminating-gateway config entry (pure).

Consul keeps a "gateway services" table that its state store fills whenever one of these entries or
the catalog changes; ``/v1/catalog/gateway-services/:gateway`` lists it and
``/v1/health/ingress/:service`` reads it backwards. The dev agent derives the same rows on read:

- ingress-gateway: one row per listener service (Port, Protocol, Hosts);
- terminating-gateway: one row per linked service (CAFile, CertFile, KeyFile, SNI);
- a ``*`` service expands to every typical service in the catalog (not proxies, gateways, or the
  ``consul`` service), marked ``FromWildcard``; a service the entry names explicitly wins over the
  wildcard's row for it.

Rows are in Consul's GatewayService JSON shape, ordered by service name as Consul's index is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from devagent import configentries as ce

WILDCARD = "*"
CONSUL_SERVICE = "consul"


def _row(gateway: str, kind: str, service: str, entry: Mapping[str, Any], extra: Mapping[str, Any],
         from_wildcard: bool, service_kind: str) -> dict[str, Any]:
    row: dict[str, Any] = {"Gateway": {"Name": gateway}, "Service": {"Name": service}, "GatewayKind": kind}
    row.update({k: v for k, v in extra.items() if v not in (None, "", [], 0)})
    if from_wildcard:
        row["FromWildcard"] = True
    if service_kind:
        row["ServiceKind"] = service_kind
    row["CreateIndex"] = entry.get("CreateIndex", 0)
    row["ModifyIndex"] = entry.get("ModifyIndex", 0)
    return row


def gateway_services(gateway: str, entry: Mapping[str, Any] | None, typical_services: Iterable[str],
                     destination: Callable[[str], bool]) -> list[dict[str, Any]]:
    """The GatewayService rows of ``gateway`` given its config entry. ``typical_services``: the names
    of the catalog's typical services (for ``*``); ``destination(name)``: whether service-defaults
    declare ``name`` an external destination (ServiceKind "destination" instead of "service")."""
    if entry is None:
        return []
    kind = entry["Kind"]
    catalog = set(typical_services) - {CONSUL_SERVICE}
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    wildcards: list[tuple[Mapping[str, Any], int, Mapping[str, Any]]] = []

    def service_kind(name: str) -> str:
        if kind != ce.TERMINATING_GATEWAY:
            return ""
        if destination(name):
            return "destination"
        return "service" if name in catalog else ""

    if kind == ce.INGRESS_GATEWAY:
        for listener in entry.get("Listeners") or []:
            port = int(listener.get("Port") or 0)
            extra = {"Port": port, "Protocol": listener.get("Protocol") or "tcp"}
            for svc in listener.get("Services") or []:
                if svc.get("Name") == WILDCARD:
                    wildcards.append((svc, port, extra))
                    continue
                rows[(svc["Name"], port)] = _row(gateway, kind, svc["Name"], entry,
                                                 {**extra, "Hosts": list(svc.get("Hosts") or [])}, False, "")
    elif kind == ce.TERMINATING_GATEWAY:
        for svc in entry.get("Services") or []:
            tls = {f: svc.get(f) for f in ("CAFile", "CertFile", "KeyFile", "SNI")}
            if svc.get("Name") == WILDCARD:
                wildcards.append((svc, 0, tls))
                continue
            rows[(svc["Name"], 0)] = _row(gateway, kind, svc["Name"], entry, tls, False, service_kind(svc["Name"]))
    for _svc, port, fields in wildcards:
        for name in sorted(catalog):
            if (name, port) not in rows:
                rows[(name, port)] = _row(gateway, kind, name, entry, fields, True, service_kind(name))
    return [rows[k] for k in sorted(rows)]


def ingress_gateways_for(service: str, entries: Iterable[Mapping[str, Any]], typical_services: Iterable[str]
                         ) -> list[str]:
    """The ingress gateways whose entry exposes ``service`` (by name or by ``*``), sorted."""
    catalog = set(typical_services)
    out = set()
    for entry in entries:
        for listener in entry.get("Listeners") or []:
            for svc in listener.get("Services") or []:
                name = svc.get("Name")
                if name == service or (name == WILDCARD and service in catalog and service != CONSUL_SERVICE):
                    out.add(str(entry["Name"]))
    return sorted(out)
