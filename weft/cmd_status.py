"""`weft status`: services, instances and their health, sidecars, certificates and policy versions.

Reads everything from Consul (at `CONSUL_HTTP_ADDR`) and from the sidecars' admin `/metrics`:

- every service in the catalog with its instances and their aggregated health (worst check), and
  for each instance its sidecar (the connect-proxy whose `Proxy.DestinationServiceID` names it) with
  the sidecar's health, public port, admin URL, leaf certificate expiry
  (`weft_cert_expiry_timestamp_seconds`) and the policy version it enforces
  (`weft_policy_version_info`);
- the trust bundle the CA publishes in KV `weft/ca/roots` (trust domain, roots and their expiry);
- the compiled policy tables in KV `weft/policy/compiled/<destination>` (version, default policy,
  number of rules) and how many sidecars of that destination enforce the current version;
- traffic management, from each sidecar's admin `/config`: per upstream whose discovery chain is not
  the default one, its routes, its splits (weight, target subset, endpoints) and the endpoints that
  passive health checking has ejected.

`-json` prints the same as JSON. Rendering is pure (`render`) and unit-tested.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from consulkit.conventions import aggregate_status
from devmesh.state import ConsulChoice, admin_urls, consul_for_cli

ROOTS_KEY = "weft/ca/roots"
COMPILED_PREFIX = "weft/policy/compiled/"
CONSUL_SERVICE = "consul"  # the service Consul registers for each of its server nodes


# ---------------------------------------------------------------------------------------------------
# Pure: the report and its rendering


@dataclass(frozen=True)
class SidecarRow:
    id: str
    port: int
    health: str
    admin: str = ""
    cert_expiry: float | None = None  # Unix time
    policy_version: str = ""
    error: str = ""


@dataclass(frozen=True)
class InstanceRow:
    service: str
    id: str
    address: str
    port: int
    health: str
    protocol: str = ""
    sidecars: tuple[SidecarRow, ...] = ()
    role: str = ""  # control-plane replicas: leader/active or standby, from their TTL check's output


@dataclass(frozen=True)
class RootRow:
    id: str
    name: str
    not_after: str
    active: bool


@dataclass(frozen=True)
class PolicyRow:
    destination: str
    version: str
    default_policy: str
    rules: int
    error: str = ""


@dataclass(frozen=True)
class TrafficRow:
    """One upstream of one sidecar whose discovery chain routes, splits or ejects."""

    sidecar: str
    upstream: str
    routes: int = 0
    splits: tuple[tuple[float, str, int], ...] = ()  # (weight, target, endpoints)
    targets: tuple[tuple[str, int], ...] = ()  # (target, endpoints) when there is no split
    ejected: tuple[str, ...] = ()


@dataclass
class StatusReport:
    consul: str
    instances: list[InstanceRow] = field(default_factory=list)
    trust_domain: str = ""
    roots: list[RootRow] = field(default_factory=list)
    roots_error: str = ""
    policies: list[PolicyRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    traffic: list[TrafficRow] = field(default_factory=list)


def traffic_rows(sidecar: str, config: Mapping[str, Any]) -> list[TrafficRow]:
    """The traffic rows of one sidecar's ``/config`` document (upstreams with a non-default chain or
    ejected endpoints); a document of another shape gives none."""
    rows = []
    snap = config.get("snapshot") if isinstance(config, Mapping) else None
    upstreams = snap.get("upstreams") if isinstance(snap, Mapping) else None
    runtime = config.get("traffic") if isinstance(config, Mapping) else None  # the outbound's live state
    for name, up in sorted(upstreams.items()) if isinstance(upstreams, Mapping) else []:
        if not isinstance(up, Mapping):
            continue
        chain: Mapping[str, Any] | None = up["chain"] if isinstance(up.get("chain"), Mapping) else None
        live = runtime.get(name) if isinstance(runtime, Mapping) else None
        ejected_map = live.get("ejected") if isinstance(live, Mapping) else None
        ejected = tuple(sorted(str(k) for k in ejected_map)) if isinstance(ejected_map, Mapping) else ()
        if (chain is None or chain.get("default")) and not ejected:
            continue
        nodes = (chain or {}).get("nodes") or {}
        targets = (chain or {}).get("targets") or {}

        def endpoints(target: str, targets: Mapping[str, Any] = targets) -> int:
            t = targets.get(target)
            return len(t.get("endpoints") or []) if isinstance(t, Mapping) else 0

        routes = 0
        splits: list[tuple[float, str, int]] = []
        for node in nodes.values() if isinstance(nodes, Mapping) else []:
            if not isinstance(node, Mapping):
                continue
            routes = max(routes, len(node.get("routes") or []))
            for sp in node.get("splits") or []:
                nxt = nodes.get(sp.get("next", ""), {}) if isinstance(sp, Mapping) else {}
                target = str(nxt.get("target", "")) if isinstance(nxt, Mapping) else ""
                splits.append((float(sp.get("weight", 0)), target, endpoints(target)))
        plain = () if splits else tuple((str(t), endpoints(str(t))) for t in sorted(targets))
        rows.append(TrafficRow(sidecar=sidecar, upstream=str(name), routes=routes, splits=tuple(splits),
                               targets=plain, ejected=ejected))
    return rows


def _short_target(target: str) -> str:
    """``v2.greeter.default.default.dc1`` -> ``v2.greeter`` (dc1 and the default namespace dropped)."""
    parts = target.split(".")
    if len(parts) >= 4 and parts[-3:-1] == ["default", "default"]:
        return ".".join(parts[:-3])
    return target


ROLES = ("leader", "active", "standby")


def role_of(outputs: Iterable[str]) -> str:
    """The role a control-plane replica reports in its TTL check's output ("" when none)."""
    for out in outputs:
        if out.strip() in ROLES:
            return out.strip()
    return ""


def parse_roots(raw: bytes | None) -> tuple[str, list[RootRow]]:
    """KV `weft/ca/roots` (Consul's /v1/connect/ca/roots shape) -> (trust domain, roots)."""
    if raw is None:
        raise ValueError("no trust bundle yet (is `weft ca serve` running?)")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{ROOTS_KEY} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("Roots"), list):
        raise ValueError(f"{ROOTS_KEY} has no Roots list")
    active_id = str(doc.get("ActiveRootID", ""))
    rows = []
    for r in doc["Roots"]:
        if not isinstance(r, dict):
            continue
        rid = str(r.get("ID", ""))
        rows.append(RootRow(id=rid, name=str(r.get("Name", "")), not_after=str(r.get("NotAfter", "")),
                            active=bool(r.get("Active", rid == active_id))))
    return str(doc.get("TrustDomain", "")), rows


def parse_policy(key: str, raw: bytes | None) -> PolicyRow:
    """One compiled table from KV (only the fields `weft status` shows)."""
    dest = key.removeprefix(COMPILED_PREFIX)
    try:
        doc = json.loads(raw or b"")
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        return PolicyRow(destination=str(doc.get("Destination", dest)), version=str(doc.get("Version", "")),
                         default_policy=str(doc.get("DefaultPolicy", "")), rules=len(doc.get("Rules") or []))
    except (ValueError, UnicodeDecodeError) as exc:
        return PolicyRow(destination=dest, version="", default_policy="", rules=0, error=f"unreadable: {exc}")


def metrics_facts(samples: Iterable[tuple[str, Mapping[str, str], float]]) -> tuple[float | None, str]:
    """(leaf expiry, policy version in force) from a sidecar's metrics samples."""
    expiry: float | None = None
    version = ""
    for name, labels, value in samples:
        if name == "weft_cert_expiry_timestamp_seconds" and value > 0:
            expiry = value
        elif name == "weft_policy_version_info" and value >= 1:
            version = labels.get("version", "")
    return expiry, version


def format_remaining(until: float | None, now: float) -> str:
    if until is None:
        return "-"
    left = until - now
    if left <= 0:
        return "EXPIRED"
    d, rem = divmod(int(left), 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{d}d{h}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s"


def _version(version: str) -> str:
    """A policy version as the sidecars and `weft intention check` print it: whole (16 hex digits, or
    words such as "none (deny all)"), never cut."""
    return version or "-"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]


def policy_for(destination: str, policies: Sequence[PolicyRow]) -> PolicyRow | None:
    """The table a destination's sidecars enforce: its own, else the `*` table."""
    by_dest = {p.destination: p for p in policies}
    return by_dest.get(destination) or by_dest.get("*")


def render(report: StatusReport, now: float) -> str:
    lines = [f"Consul: {report.consul}", ""]
    rows: list[list[str]] = []
    for inst in sorted(report.instances, key=lambda i: (i.service, i.id)):
        health = f"{inst.health} ({inst.role})" if inst.role else inst.health
        base = [inst.service, inst.id, f"{inst.address}:{inst.port}", health, inst.protocol or "-"]
        table = policy_for(inst.service, report.policies)
        if not inst.sidecars:
            rows.append([*base, "-", "-", "-", "-", "-"])
        for sc in inst.sidecars:
            version = _version(sc.policy_version)
            if sc.policy_version and table is not None and table.version and sc.policy_version != table.version:
                version += " (stale)"
            rows.append([*base, f"{sc.id}:{sc.port}", sc.health, format_remaining(sc.cert_expiry, now), version,
                         sc.admin or "-"])
            base = ["", "", "", "", ""]
    lines.append("Services")
    if rows:
        lines += ["  " + line for line in _table(
            ["SERVICE", "INSTANCE", "ADDRESS", "HEALTH", "PROTO", "SIDECAR", "SIDECAR HEALTH", "CERT EXPIRES",
             "POLICY", "ADMIN"], rows)]
    else:
        lines.append("  (no services registered)")
    lines.append("")
    domain = f": trust domain {report.trust_domain}" if report.trust_domain else ""
    lines.append(f"Trust bundle ({ROOTS_KEY}){domain}")
    if report.roots_error:
        lines.append(f"  {report.roots_error}")
    elif report.roots:
        lines += ["  " + line for line in _table(
            ["ROOT", "NAME", "ACTIVE", "EXPIRES"],
            [[r.id[:23], r.name, "yes" if r.active else "no", _root_expiry(r.not_after, now)] for r in report.roots])]
    lines.append("")
    lines.append(f"Policy tables ({COMPILED_PREFIX}<destination>)")
    if report.policies:
        sync_rows = []
        for p in sorted(report.policies, key=lambda p: p.destination):
            enforcing = [sc for inst in report.instances for sc in inst.sidecars
                         if policy_for(inst.service, report.policies) is p]
            current = sum(1 for sc in enforcing if sc.policy_version == p.version)
            sync = f"{current}/{len(enforcing)}" if enforcing else "-"
            sync_rows.append([p.destination, _version(p.version) if not p.error else p.error, p.default_policy or "-",
                              str(p.rules), sync])
        lines += ["  " + line for line in _table(["DESTINATION", "VERSION", "DEFAULT", "RULES", "SIDECARS CURRENT"],
                                                 sync_rows)]
    else:
        lines.append("  (none yet: is `weft policy serve` running?)")
    if report.traffic:
        lines.append("")
        lines.append("Traffic management (discovery chains, from each sidecar's /config)")
        trows = []
        for t in report.traffic:
            if t.splits:
                shape = ", ".join(f"{w:g}% {_short_target(tg)} ({n} ep)" for w, tg, n in t.splits)
            else:
                shape = ", ".join(f"{_short_target(tg)} ({n} ep)" for tg, n in t.targets) or "-"
            trows.append([t.sidecar, t.upstream, str(t.routes) if t.routes else "-", shape,
                          ", ".join(t.ejected) or "none"])
        lines += ["  " + line for line in _table(["SIDECAR", "UPSTREAM", "ROUTES", "SPLITS / TARGETS", "EJECTED"],
                                                 trows)]
    if report.problems:
        lines.append("")
        lines.append("Problems")
        lines += [f"  ! {p}" for p in report.problems]
    return "\n".join(lines) + "\n"


def _root_expiry(not_after: str, now: float) -> str:
    try:
        ts = datetime.fromisoformat(not_after.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return not_after or "-"
    return f"{not_after[:10]} (in {format_remaining(ts, now)})"


def report_json(report: StatusReport) -> dict[str, Any]:
    return asdict(report)


# ---------------------------------------------------------------------------------------------------
# I/O: collecting the report


async def _sidecar_metrics(session: Any, url: str) -> tuple[float | None, str, str]:
    import aiohttp

    from weft.cmd_top import parse_metrics

    try:
        async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=3)) as resp:
            if resp.status != 200:
                return None, "", f"/metrics answered {resp.status}"
            text = await resp.text()
        expiry, version = metrics_facts((s.name, s.labels, s.value) for s in parse_metrics(text))
        return expiry, version, ""
    except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
        return None, "", f"{type(exc).__name__}: {exc}"


async def _sidecar_config(session: Any, url: str) -> dict[str, Any]:
    """A sidecar's ``/config`` (empty when it cannot be read: the metrics already told why)."""
    import aiohttp

    try:
        async with session.get(url + "/config", timeout=aiohttp.ClientTimeout(total=3)) as resp:
            if resp.status != 200:
                return {}
            doc = await resp.json(content_type=None)
        return doc if isinstance(doc, dict) else {}
    except (aiohttp.ClientError, TimeoutError, ValueError, OSError):
        return {}


async def collect(consul_choice: ConsulChoice) -> StatusReport:
    import aiohttp

    from catalog.client import ConsulClient, ConsulError
    from weft.cmd_top import admin_url

    dev_admin = admin_urls(consul_choice)

    async with ConsulClient.from_env(consul_choice.env) as consul:
        report = StatusReport(consul=consul.address)
        _, services = await consul.catalog_services()
        # Consul's own `consul` service (every server node carries it) is not part of the mesh
        services = {name: tags for name, tags in services.items() if name != CONSUL_SERVICE}
        proxies: dict[str, list[Any]] = {}
        by_service: dict[str, tuple[Any, ...]] = {}
        for name in sorted(services):
            _, by_service[name] = await consul.health_service(name, passing=False)
            for inst in by_service[name]:
                if inst.kind == "connect-proxy" and inst.proxy is not None:
                    key = inst.proxy.destination_service_id or inst.proxy.destination_service_name
                    proxies.setdefault(key, []).append(inst)
        async with aiohttp.ClientSession() as session:
            for name in sorted(services):
                for inst in by_service[name]:
                    if inst.kind == "connect-proxy":
                        continue
                    meta = dict(inst.meta)
                    sidecars = []
                    for sc in proxies.get(inst.service_id, []) + proxies.get(inst.service, []):
                        admin = (admin_url(sc.address or sc.node_address, dict(sc.meta))
                                 or dev_admin.get(inst.service, ""))
                        expiry, version, err = (None, "", "")
                        if admin:
                            expiry, version, err = await _sidecar_metrics(session, admin)
                            if err:
                                report.problems.append(f"sidecar {sc.service_id}: {admin}: {err}")
                            else:
                                report.traffic += traffic_rows(sc.service_id, await _sidecar_config(session, admin))
                        sidecars.append(SidecarRow(id=sc.service_id, port=sc.port,
                                                   health=aggregate_status(c.status for c in sc.checks), admin=admin,
                                                   cert_expiry=expiry, policy_version=version, error=err))
                    report.instances.append(InstanceRow(
                        service=inst.service, id=inst.service_id, address=inst.address or inst.node_address,
                        port=inst.port, health=aggregate_status(c.status for c in inst.checks),
                        protocol=meta.get("protocol", ""), sidecars=tuple(sidecars),
                        role=role_of(c.output for c in inst.checks)))
        try:
            _, entry = await consul.kv_get(ROOTS_KEY)
            report.trust_domain, report.roots = parse_roots(entry.value if entry is not None else None)
        except ValueError as exc:
            report.roots_error = str(exc)
        except ConsulError as exc:
            report.roots_error = f"cannot read: {exc}"
        try:
            _, entries = await consul.kv_get_recurse(COMPILED_PREFIX)
            report.policies = [parse_policy(e.key, e.value) for e in entries]
        except ConsulError as exc:
            report.problems.append(f"cannot read {COMPILED_PREFIX}: {exc}")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-json", "--json", action="store_true", help="print the report as JSON")
    parser.add_argument("-state-dir", "--state-dir", default=None,
                        help="a running `weft dev`'s state dir (its agent when CONSUL_HTTP_ADDR is unset; admin URLs "
                             "of sidecars that publish none); default: .weft-dev here or in a parent directory, "
                             "else the last weft dev started ($XDG_RUNTIME_DIR/weft-dev.json)")


def run(args: argparse.Namespace) -> int:
    from catalog.client import ConsulError

    consul = consul_for_cli("weft status", args.state_dir)
    try:
        report = asyncio.run(collect(consul))
    except (ConsulError, ValueError) as exc:
        print(f"weft status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report_json(report), indent=2))
    else:
        sys.stdout.write(render(report, time.time()))
    return 0
