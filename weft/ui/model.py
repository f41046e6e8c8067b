"""What the dashboard shows, computed from plain values (pure: no I/O, unit-tested).

- :func:`topology`: services as nodes in layers (callers left of callees) and edges with the golden
  metrics of the last interval (RPS, success rate, p50, p99, from ``weft.cmd_top.edge_stats``); an
  edge is ``failing`` when its success rate is below the threshold, ``idle`` without calls, ``ok``
  otherwise. Edges come from the sidecars' declared upstreams and from observed traffic.
- :func:`services_view`: per service its instances, health, sidecars, certificate expiry and policy
  version (from ``weft.cmd_status``'s report).
- :func:`intentions_by_destination`: the intention rows of ``weft intention list`` grouped per
  destination, each with its origin (KV key or native ID).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from consulkit.conventions import aggregate_status
from weft.cmd_status import StatusReport
from weft.cmd_top import EdgeStats

FAILING_BELOW = 0.9  # success rate under which an edge is drawn red


def edge_state(stats: EdgeStats | None, failing_below: float = FAILING_BELOW) -> str:
    if stats is None or stats.success_rate is None or stats.requests <= 0:
        return "idle"
    return "failing" if stats.success_rate < failing_below else "ok"


def _layers(nodes: Iterable[str], edges: Iterable[tuple[str, str]]) -> dict[str, int]:
    """Longest-path layer of every node (a node's callers sit in lower layers); cycles are cut."""
    out_edges: dict[str, set[str]] = {}
    for s, d in edges:
        if s != d:
            out_edges.setdefault(s, set()).add(d)
    layer = {n: 0 for n in nodes}
    for _ in range(len(layer)):  # Bellman-Ford style relaxation; at most |nodes| rounds even with cycles
        changed = False
        for s, targets in out_edges.items():
            for d in targets:
                if layer.get(d, 0) < layer.get(s, 0) + 1 and layer.get(s, 0) + 1 < len(layer):
                    layer[d] = layer.get(s, 0) + 1
                    changed = True
        if not changed:
            break
    return layer


def topology(services: Iterable[str], declared: Iterable[tuple[str, str]], stats: Sequence[EdgeStats], *,
             failing_below: float = FAILING_BELOW) -> dict[str, Any]:
    """Nodes and edges for the dashboard's graph."""
    by_edge = {(s.source, s.destination): s for s in stats}
    pairs = sorted(set(declared) | set(by_edge))
    names = sorted(set(services) | {n for p in pairs for n in p} - {""})
    layer = _layers(names, pairs)
    nodes = [{"name": n, "layer": layer.get(n, 0)} for n in names]
    edges = []
    for source, destination in pairs:
        s = by_edge.get((source, destination))
        edges.append({
            "source": source, "destination": destination, "state": edge_state(s, failing_below),
            "declared": (source, destination) in set(declared),
            "rps": None if s is None else round(s.rps, 3),
            "requests": None if s is None else s.requests,
            "success_rate": None if s is None else s.success_rate,
            "p50_ms": None if s is None or s.p50 is None else round(s.p50 * 1000, 3),
            "p99_ms": None if s is None or s.p99 is None else round(s.p99 * 1000, 3),
            "side": "" if s is None else s.side,
        })
    return {"nodes": nodes, "edges": edges}


def services_view(report: StatusReport) -> list[dict[str, Any]]:
    """One entry per service: its instances with health, protocol and sidecars."""
    out: dict[str, dict[str, Any]] = {}
    for inst in report.instances:
        svc = out.setdefault(inst.service, {"name": inst.service, "instances": []})
        svc["instances"].append({
            "id": inst.id, "address": f"{inst.address}:{inst.port}", "health": inst.health,
            "protocol": inst.protocol, "role": inst.role,
            "sidecars": [{"id": sc.id, "port": sc.port, "health": sc.health, "admin": sc.admin,
                          "cert_expiry": sc.cert_expiry, "policy_version": sc.policy_version, "error": sc.error}
                         for sc in inst.sidecars],
        })
    for svc in out.values():
        instances = svc["instances"]
        svc["health"] = aggregate_status(i["health"] for i in instances) if instances else "unknown"
        svc["meshed"] = any(i["sidecars"] for i in svc["instances"])
    return [out[k] for k in sorted(out)]


def intentions_by_destination(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(str(r["Destination"]), []).append({
            "source": r["Source"], "action": r["Action"], "mode": r["Mode"], "precedence": r["Precedence"],
            "origin": r["Origin"], "description": r.get("Description", "")})
    return out
