"""`weft dev`'s plan, pure: which demo services, on which ports, started by which commands, and the
tour printed once the mesh is up. Tested with plain values (tests/unit/devmesh/test_plan.py)."""

from __future__ import annotations

import copy
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devmesh.state import STATE_FILE

# start order: callees first; key -> the service ID of its definition (greeter-v2 is greeter's canary)
DEMO_ORDER = ("store", "greeter", "greeter-v2", "frontend")
DEMO_IDS = {"store": "store-1", "greeter": "greeter-1", "greeter-v2": "greeter-2", "frontend": "frontend-1"}
ADMIN_PORTS = {"frontend": 19102, "greeter": 19202, "greeter-v2": 19212, "store": 19302}
CA_PORT = 8553
POLICY_PORT = 8507
DASHBOARD_PORT = 8580
INTENTIONS = (("frontend", "greeter"), ("greeter", "store"))


class DevError(Exception):
    """Something that stops `weft dev` from starting; the message says what and what to do."""



@dataclass(frozen=True)
class DemoFiles:
    """Where the demo's definitions live (they ship with the CLI, in `weft/demo/`)."""

    services: Path  # Consul service definitions, *.hcl|*.json
    config: Path  # the canary's config entries, *.hcl


@dataclass(frozen=True)
class DemoService:
    key: str  # unique in the demo: the service name, or "greeter-v2" for greeter's second version
    name: str  # the Consul service name
    id: str
    port: int
    sidecar_port: int
    admin_port: int
    upstreams: tuple[tuple[str, int], ...]  # (destination, local bind port)
    payload: Mapping[str, Any]
    version: str = ""  # Meta.version: the app announces it (x-greeter-version)


@dataclass(frozen=True)
class Plan:
    consul_host: str
    consul_port: int
    ca_port: int
    policy_port: int
    services: tuple[DemoService, ...]

    def service(self, key: str) -> DemoService:
        for s in self.services:
            if s.key == key:
                return s
        raise KeyError(key)

    def ports(self) -> dict[str, int]:
        """Every port the plan listens on, by role (for the busy-port check and state.json)."""
        out = {"consul": self.consul_port, "ca": self.ca_port, "policy": self.policy_port}
        for s in self.services:
            out[f"{s.key}.app"] = s.port
            out[f"{s.key}.sidecar"] = s.sidecar_port
            out[f"{s.key}.admin"] = s.admin_port
            for dest, bind in s.upstreams:
                out[f"{s.key}.upstream.{dest}"] = bind
        return out


def rewrite_ports(payload: Mapping[str, Any], mapping: Mapping[int, int]) -> dict[str, Any]:
    """A copy of a register payload with every port in `mapping` replaced: the service and sidecar
    `Port`, upstream `LocalBindPort`s, and the ports inside check targets (HTTP URLs, host:port)."""
    out: dict[str, Any] = copy.deepcopy(dict(payload))

    def fix_target(target: str) -> str:
        # the port of the authority only: "host:port[/...]" or "scheme://host:port[/...]"
        scheme, sep, rest = target.partition("://")
        if not sep:
            scheme, rest = "", target
        authority, slash, tail = rest.partition("/")
        host, colon, port = authority.rpartition(":")
        if colon and port.isdigit():
            authority = f"{host}:{mapping.get(int(port), int(port))}"
        return (f"{scheme}://" if sep else "") + authority + slash + tail

    def fix_checks(checks: list[dict[str, Any]]) -> None:
        for check in checks:
            for key in ("HTTP", "TCP", "GRPC", "H2PING", "UDP"):
                if isinstance(check.get(key), str):
                    check[key] = fix_target(check[key])

    if "Port" in out:
        out["Port"] = mapping.get(out["Port"], out["Port"])
    fix_checks(out.get("Checks") or [])
    sidecar = (out.get("Connect") or {}).get("SidecarService")
    if sidecar is not None:
        if "Port" in sidecar:
            sidecar["Port"] = mapping.get(sidecar["Port"], sidecar["Port"])
        fix_checks(sidecar.get("Checks") or [])
        for up in (sidecar.get("Proxy") or {}).get("Upstreams") or []:
            up["LocalBindPort"] = mapping.get(up["LocalBindPort"], up["LocalBindPort"])
    return out


def demo_services(payloads: Sequence[Mapping[str, Any]], admin_ports: Mapping[str, int], *,
                  source: Path | None = None) -> list[DemoService]:
    """The demo's services from their register payloads (read from `source`), in start order;
    checks that they are complete."""
    by_id = {p.get("ID") or p["Name"]: p for p in payloads}
    missing = [DEMO_IDS[k] for k in DEMO_ORDER if DEMO_IDS[k] not in by_id]
    if missing:
        where = f" (in {source})" if source is not None else ""
        raise DevError(f"demo service definitions lack {', '.join(missing)}{where}")
    out = []
    for key in DEMO_ORDER:
        p = by_id[DEMO_IDS[key]]
        name = p["Name"]
        sidecar = (p.get("Connect") or {}).get("SidecarService")
        if sidecar is None or "Port" not in sidecar:
            raise DevError(f"{name}: the demo definition needs connect.sidecar_service with a port")
        ups = tuple((u["DestinationName"], int(u["LocalBindPort"]))
                    for u in (sidecar.get("Proxy") or {}).get("Upstreams") or [])
        out.append(DemoService(key=key, name=name, id=p.get("ID") or name, port=int(p["Port"]),
                               sidecar_port=int(sidecar["Port"]), admin_port=admin_ports[key], upstreams=ups,
                               payload=p, version=str((p.get("Meta") or {}).get("version", ""))))
    return out


def make_plan(payloads: Sequence[Mapping[str, Any]], *, consul_host: str, consul_port: int,
              free_port: Callable[[], int] | None = None, source: Path | None = None) -> Plan:
    """The fixed-port plan, or with `free_port` every port (but Consul's) freshly chosen."""
    services = demo_services(payloads, ADMIN_PORTS, source=source)
    if free_port is None:
        return Plan(consul_host, consul_port, CA_PORT, POLICY_PORT, tuple(services))
    mapping: dict[int, int] = {}
    admin: dict[str, int] = {}
    for s in services:
        for port in (s.port, s.sidecar_port, *(b for _, b in s.upstreams)):
            if port not in mapping:
                mapping[port] = free_port()
        admin[s.key] = free_port()
    rewritten = [rewrite_ports(p, mapping) for p in payloads]
    services = demo_services(rewritten, admin, source=source)
    return Plan(consul_host, consul_port, free_port(), free_port(), tuple(services))


def app_command(python: str, service: DemoService, log_level: str) -> list[str]:
    args = [python, "-m", f"weft.demo.{service.name}", "-port", str(service.port), "-log-level", log_level]
    for dest, bind in service.upstreams:
        args += [f"-{dest}-addr", f"127.0.0.1:{bind}"]
    if service.version:
        args += ["-version", service.version]
    return args


def summary(plan: Plan, *, started_agent: bool, state_dir: Path, traffic_rps: float | None,
            default_consul: bool, demo_config: Path) -> str:
    consul_url = f"http://{plan.consul_host}:{plan.consul_port}"
    logs = state_dir / "logs"
    lines = [
        "",
        f"weft dev: the mesh is up. Logs in {logs}/, state in {state_dir / STATE_FILE}.",
        "",
        f"  Consul       {consul_url}" + ("  (weft agent -dev, in memory)" if started_agent else "  (already running)"),
        f"  CA           127.0.0.1:{plan.ca_port}  (weft ca serve -dev; trust bundle in KV weft/ca/roots)",
        f"  policy       127.0.0.1:{plan.policy_port}  (weft policy serve; tables in KV weft/policy/compiled/)",
        "",
    ]
    head = ("SERVICE", "APP", "SIDECAR (mTLS)", "ADMIN (/metrics /config /ready)", "UPSTREAMS")
    rows = []
    for s in reversed(plan.services):
        ups = ", ".join(f"{d} at 127.0.0.1:{b}" for d, b in s.upstreams) or "-"
        rows.append((s.key, f"127.0.0.1:{s.port}", f"127.0.0.1:{s.sidecar_port}",
                     f"http://127.0.0.1:{s.admin_port}", ups))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    frontend = plan.service("frontend")
    lines.append("")
    lines.append("  intentions   frontend -> greeter allowed, greeter -> store allowed, everything else denied")
    lines.append("  canary       greeter: 90 % to v1, 10 % to v2, header x-canary: 1 to v2 "
                 f"(config entries in {demo_config})")
    if traffic_rps:
        lines.append(f"  traffic      {traffic_rps:g} requests/s to http://127.0.0.1:{frontend.port}")
    lines += ["", "Try (in another terminal):"]
    if not default_consul or (plan.consul_host, plan.consul_port) != ("127.0.0.1", 8500):
        # weft status/top/intention find this agent through the state file when run here; other
        # tools (curl, consul, consul-template) need the address
        lines.append(f"  export CONSUL_HTTP_ADDR={plan.consul_host}:{plan.consul_port}")
    lines += [
        f"  curl 'http://127.0.0.1:{frontend.port}/hello?name=ada'",
        f"  curl 'http://127.0.0.1:{frontend.port}/stream?name=ada&count=3'",
        f"  curl -H 'x-canary: 1' 'http://127.0.0.1:{frontend.port}/hello?name=ada'   # always greeter v2",
        "  weft config read -kind service-splitter -name greeter",
        "  weft top                                  # live rps, success rate, p50/p99 per edge",
        "  weft tap greeter                          # live calls into and out of greeter, one line each",
        "  weft status                               # services, sidecars, certificates, policy versions",
        "  weft intention deny frontend greeter      # frontend's calls now fail with 403 PERMISSION_DENIED",
        "  weft intention allow frontend greeter     # and succeed again",
        f"  curl http://127.0.0.1:{frontend.admin_port}/metrics | grep weft_requests_total",
        "",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)



def consul_address(env: Mapping[str, str]) -> tuple[str, int, bool]:
    """(host, port, is_default) of CONSUL_HTTP_ADDR; `weft dev` only runs its agent on plain http."""
    raw = env.get("CONSUL_HTTP_ADDR", "").strip()
    if not raw:
        return "127.0.0.1", 8500, True
    if raw.startswith("unix://") or raw.startswith("https://"):
        raise DevError(f"CONSUL_HTTP_ADDR={raw}: weft dev needs a plain http address (host:port)")
    parsed = urllib.parse.urlsplit(raw if "://" in raw else f"http://{raw}")
    if not parsed.hostname:
        raise DevError(f"CONSUL_HTTP_ADDR={raw}: expected host:port")
    return parsed.hostname, parsed.port or 8500, False
