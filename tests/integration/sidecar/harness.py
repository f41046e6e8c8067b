"""In-process sidecar pieces for data-path tests: snapshots from the test PKI and plain policy tables."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from policies.model import CompiledRule, CompiledTable, Origin, Permission
from sidecar.snapshot import Credentials, Endpoint, Registration, Snapshot, SnapshotBuilder, UpstreamConfig
from tests.unit.sidecar.pki import Authority


def table(destination: str, *rules: tuple[str, str | tuple[Permission, ...]], default: str = "deny",
          mode: str = "enforce") -> CompiledTable:
    compiled = []
    for i, (source, action) in enumerate(rules):
        prec = 8 if source == "*" else 9
        origin = Origin(kind="kv", ref=f"weft/intentions/{destination}", index=i)
        if isinstance(action, str):
            compiled.append(CompiledRule(source=source, destination=destination, precedence=prec, origin=origin,
                                         action=action, mode=mode))  # type: ignore[arg-type]
        else:
            compiled.append(CompiledRule(source=source, destination=destination, precedence=prec, origin=origin,
                                         permissions=action, mode=mode))  # type: ignore[arg-type]
    return CompiledTable(destination=destination, default_policy=default, rules=tuple(compiled)).with_version()  # type: ignore[arg-type]


class Holder:
    """A mutable current snapshot, as sidecar.state keeps it."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap
        self.listeners: list[Callable[[Snapshot], None]] = []

    def __call__(self) -> Snapshot:
        return self.snap

    def set(self, snap: Snapshot) -> None:
        self.snap = snap
        for cb in self.listeners:
            cb(snap)

    def update(self, **changes: object) -> None:
        self.set(dataclasses.replace(self.snap, version=self.snap.version + 1, **changes))  # type: ignore[arg-type]


def snapshot(service: str, creds: Credentials, *, protocol: str = "grpc", app_port: int = 0, public_port: int = 0,
             upstreams: dict[str, tuple[int, list[int], str]] | None = None,
             policy: CompiledTable | None = None, local_methods: dict[str, str] | None = None,
             methods: dict[str, dict[str, str]] | None = None) -> Snapshot:
    b = SnapshotBuilder()
    ups = tuple(UpstreamConfig(name, bind) for name, (bind, _, _) in (upstreams or {}).items())
    b.set_registration(Registration(service=service, service_id=f"{service}-1", proxy_id=f"{service}-1-sidecar-proxy",
                                    public_address="127.0.0.1", public_port=public_port,
                                    local_service_address="127.0.0.1", local_service_port=app_port,
                                    upstreams=ups, protocol=protocol))
    b.set_credentials(creds)
    b.set_policy(policy, policy.version if policy else "none")
    for name, (_, ports, proto) in (upstreams or {}).items():
        b.set_endpoints(name, [Endpoint("127.0.0.1", p, f"{name}-{p}") for p in ports])
        b.set_protocol(name, proto)
    for name, m in (methods or {}).items():
        b.set_methods(name, m)
    if local_methods:
        b.set_local_methods(local_methods)
    snap = b.build()
    assert snap is not None
    return snap


__all__ = ["Authority", "Holder", "snapshot", "table"]
