"""sidecar.state with an in-memory Consul (blocking reads on a version counter) and a fake leaf manager."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from ca.client import Credentials as LeafCredentials
from ca.client import LeafManager
from ca.identity import SpiffeId
from ca.provider import RootInfo, TrustBundle
from catalog.client import ConsulClient, ConsulUnavailable
from catalog.models import KVEntry, ProxyConfig, ServiceInstance, ServiceRegistration, Upstream
from catalog.watch import WatchPolicy
from policies.model import CompiledRule, CompiledTable, Origin, table_key
from sidecar.methods import encode, methods_key
from sidecar.snapshot import Registration, Snapshot, UpstreamConfig
from sidecar.state import SidecarState
from tests.unit.sidecar.pki import TD, Authority


class FakeConsul:
    """Just the reads sidecar.state makes, with Consul's blocking semantics on one global index."""

    def __init__(self) -> None:
        self.index = 1
        self.kv: dict[str, bytes] = {}
        self.connect: dict[str, list[ServiceInstance]] = {}
        self.services: dict[str, list[ServiceInstance]] = {}  # the apps' own instances
        self.config: dict[tuple[str, str], dict[str, Any]] = {}
        self.agent: dict[str, ServiceRegistration] = {}
        self.down = False
        self._changed = asyncio.Event()

    def bump(self) -> None:
        self.index += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def _block(self, index: int, wait: float | None) -> None:
        if self.down:
            raise ConsulUnavailable("connection refused")
        if index and index >= self.index:
            ev = self._changed
            try:
                await asyncio.wait_for(ev.wait(), min(wait or 1.0, 1.0))
            except TimeoutError:
                pass
        if self.down:
            raise ConsulUnavailable("connection refused")

    async def kv_get(self, key: str, *, index: int = 0, wait: float | None = None) -> tuple[int, KVEntry | None]:
        await self._block(index, wait)
        v = self.kv.get(key)
        return self.index, (KVEntry(key=key, value=v) if v is not None else None)

    async def health_connect(self, service: str, *, passing: bool = True, index: int = 0,
                             wait: float | None = None) -> tuple[int, tuple[ServiceInstance, ...]]:
        await self._block(index, wait)
        return self.index, tuple(self.connect.get(service, ()))

    async def health_service(self, service: str, *, passing: bool = True) -> tuple[int, tuple[ServiceInstance, ...]]:
        if self.down:
            raise ConsulUnavailable("connection refused")
        return self.index, tuple(self.services.get(service, ()))

    async def config_list(self, kind: str, *, index: int = 0,
                          wait: float | None = None) -> tuple[int, tuple[dict[str, Any], ...]]:
        await self._block(index, wait)
        return self.index, tuple(v for (k, _), v in sorted(self.config.items()) if k == kind)

    async def kv_get_recurse(self, prefix: str, *, index: int = 0,
                             wait: float | None = None) -> tuple[int, tuple[KVEntry, ...]]:
        await self._block(index, wait)
        return self.index, tuple(KVEntry(key=k, value=v) for k, v in sorted(self.kv.items()) if k.startswith(prefix))

    async def agent_service(self, service_id: str, *, hash: str = "", wait: float | None = None,
                            ) -> tuple[str, ServiceRegistration | None]:
        await self._block(self.index if hash == str(self.index) else 0, wait)
        return str(self.index), self.agent.get(service_id)

    async def kv_put(self, key: str, value: bytes) -> bool:
        self.kv[key] = value
        self.bump()
        return True


class FakeLeaf:
    def __init__(self) -> None:
        self.callbacks: list[Callable[[LeafCredentials], None]] = []

    def subscribe(self, cb: Callable[[LeafCredentials], None]) -> Callable[[], None]:
        self.callbacks.append(cb)
        return lambda: None

    def publish(self, ca: Authority, serial: int) -> None:
        creds = ca.leaf("web", serial=serial)
        now = datetime.now(UTC)
        root = RootInfo(id="r1", name="root", serial_number=1, signing_key_id="k", not_before=now, not_after=now,
                        root_cert=ca.pem, intermediate_certs=(), active=True)
        bundle = TrustBundle(trust_domain=TD, active_root_id="r1", roots=(root,))
        leaf = LeafCredentials(SpiffeId.for_service(TD, "web"), creds.key_pem.encode(), creds.cert_pem.encode(), b"",
                               bundle, now, datetime.fromtimestamp(creds.not_after, UTC), serial, serial)
        for cb in self.callbacks:
            cb(leaf)


def rule_table(dest: str, action: str) -> CompiledTable:
    rule = CompiledRule(source="web", destination=dest, precedence=9, origin=Origin("kv", f"weft/intentions/{dest}"),
                        action=action)  # type: ignore[arg-type]
    return CompiledTable(destination=dest, default_policy="deny", rules=(rule,)).with_version()


def proxy_reg(*ups: str) -> ServiceRegistration:
    return ServiceRegistration(name="web-sidecar-proxy", id="web-1-sidecar-proxy", kind="connect-proxy", port=21000,
                               proxy=ProxyConfig(destination_service_name="web", destination_service_id="web-1",
                                                 local_service_port=8080,
                                                 upstreams=tuple(Upstream(u, 9000 + i) for i, u in enumerate(ups))))


def app_instance(service: str, port: int, protocol: str) -> ServiceInstance:
    return ServiceInstance(node="n1", node_address="127.0.0.1", service_id=f"{service}-1", service=service,
                           address="127.0.0.1", port=port, meta=(("protocol", protocol),))


def instance(service: str, port: int, protocol: str = "") -> ServiceInstance:
    meta = (("protocol", protocol),) if protocol else ()
    return ServiceInstance(node="n1", node_address="127.0.0.1", service_id=f"{service}-{port}-sidecar-proxy",
                           service=f"{service}-sidecar-proxy", address="127.0.0.1", port=port, meta=meta,
                           kind="connect-proxy")


def cur(state: Any) -> Any:
    return state.current


async def wait_until(pred: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out: {what}")


@pytest.fixture
async def world() -> Any:
    consul = FakeConsul()
    consul.agent["web-1-sidecar-proxy"] = proxy_reg("api")
    leaf = FakeLeaf()
    reg = Registration(service="web", service_id="web-1", proxy_id="web-1-sidecar-proxy", public_address="127.0.0.1",
                       public_port=21000, local_service_address="127.0.0.1", local_service_port=8080,
                       upstreams=(UpstreamConfig("api", 9000),), protocol="http")
    state = SidecarState(cast(ConsulClient, consul), cast(LeafManager, leaf), reg, app_protocol_meta="http",
                         watch_policy=WatchPolicy(wait=1.0, min_interval=0.0, backoff_base=0.01, backoff_max=0.05,
                                                  recovery_wait=0.1),
                         reflect=False)
    snaps: list[Snapshot] = []
    state.listeners.append(snaps.append)
    state.start()
    try:
        yield consul, leaf, state, snaps
    finally:
        await state.close()


async def test_published_when_complete_then_follows_changes(world: Any) -> None:
    consul, leaf, state, _snaps = world
    ca = Authority.root()
    consul.connect["api"] = [instance("api", 21001, "grpc")]
    consul.bump()
    await asyncio.sleep(0.1)
    assert cur(state) is None  # no leaf yet
    leaf.publish(ca, 1)
    # no table at all: published, with no policy (deny all)
    await wait_until(lambda: cur(state) is not None, "first snapshot")
    snap = cur(state)
    assert snap.policy is None and snap.policy_version.startswith("none")
    assert [e.port for e in snap.upstreams["api"].endpoints] == [21001]
    assert snap.upstreams["api"].protocol == "grpc"  # from the sidecars' meta
    assert snap.registration.protocol == "http"

    # the wildcard table governs until the own table appears
    consul.kv[table_key("*")] = rule_table("*", "allow").dumps().encode()
    consul.bump()
    await wait_until(lambda: cur(state).policy is not None and cur(state).policy.destination == "*", "wild")
    consul.kv[table_key("web")] = rule_table("web", "deny").dumps().encode()
    consul.bump()
    await wait_until(lambda: cur(state).policy.destination == "web", "own table")

    # service-defaults beats meta; methods are read from KV
    consul.config[("service-defaults", "api")] = {"Kind": "service-defaults", "Name": "api", "Protocol": "http"}
    consul.kv[methods_key("api")] = encode("api", {"/p.S/M": "unary"})
    consul.bump()
    await wait_until(lambda: cur(state).upstreams["api"].protocol == "http"
                     and dict(cur(state).upstreams["api"].methods) == {"/p.S/M": "unary"}, "protocol+methods")

    # a bad table is refused and the last good one stays
    version = cur(state).policy_version
    consul.kv[table_key("web")] = b"{not json"
    consul.bump()
    await asyncio.sleep(0.2)
    assert cur(state).policy_version == version

    # a new upstream in the registration gets its watches
    consul.agent["web-1-sidecar-proxy"] = proxy_reg("api", "db")
    consul.connect["db"] = [instance("db", 21002)]
    consul.bump()
    await wait_until(lambda: "db" in cur(state).upstreams and cur(state).upstreams["db"].endpoints, "db")
    assert cur(state).upstreams["db"].protocol == "tcp"


async def test_consul_down_keeps_last_snapshot(world: Any) -> None:
    consul, leaf, state, _snaps = world
    ca = Authority.root()
    consul.connect["api"] = [instance("api", 21001), instance("api", 21003)]
    consul.bump()
    leaf.publish(ca, 1)
    await wait_until(lambda: cur(state) is not None and len(cur(state).upstreams["api"].endpoints) == 2, "2 eps")
    consul.down = True
    consul.bump()
    await asyncio.sleep(0.3)
    assert len(cur(state).upstreams["api"].endpoints) == 2
    # the leaf still rotates while Consul is away
    leaf.publish(ca, 2)
    await wait_until(lambda: cur(state).credentials.serial == "2", "rotated")
    consul.down = False
    consul.connect["api"] = [instance("api", 21001)]
    consul.bump()
    await wait_until(lambda: len(cur(state).upstreams["api"].endpoints) == 1, "recovered")


def test_methods_value_shape() -> None:
    assert json.loads(encode("api", {"/a.B/C": "unary"})) == {"Methods": {"/a.B/C": "unary"}, "Service": "api"}


async def test_an_upstream_without_sidecars_yet_takes_the_protocol_its_app_declares(world: Any) -> None:
    """At start-up the upstream's sidecar may not be registered yet: its listener must not be opened as
    TCP (and reopened as gRPC a moment later) when the upstream's own registration says grpc."""
    consul, leaf, state, snaps = world
    consul.services["api"] = [app_instance("api", 8081, "grpc")]
    consul.bump()
    leaf.publish(Authority.root(), 1)
    await wait_until(lambda: cur(state) is not None, "first snapshot")
    assert cur(state).upstreams["api"].endpoints == ()
    assert [s.upstreams["api"].protocol for s in snaps] == ["grpc"] * len(snaps)
    consul.connect["api"] = [instance("api", 21001, "grpc")]
    consul.bump()
    await wait_until(lambda: len(cur(state).upstreams["api"].endpoints) == 1, "the upstream's sidecar")
    assert {s.upstreams["api"].protocol for s in snaps} == {"grpc"}


def test_config_reports_the_address_the_public_listener_is_bound_to() -> None:
    """/config shows where the public listener really is: `--bind 127.0.0.1` on a registration without an
    address is 127.0.0.1, not 0.0.0.0."""
    from sidecar.state import registration_of

    app = ServiceRegistration(name="web", id="web-1", port=8080)
    bound = registration_of(proxy_reg("api"), app, protocol="grpc", bind="127.0.0.1")
    assert bound.public_address == "127.0.0.1"
    snap_view = Snapshot(registration=bound, credentials=_creds(), policy=None, policy_version="none",
                         upstreams={}).describe()
    assert snap_view["public_listener"] == "127.0.0.1:21000"
    assert registration_of(proxy_reg("api"), app, protocol="grpc").public_address == "0.0.0.0"


def _creds() -> Any:
    from sidecar.state import credentials_of

    leaf = FakeLeaf()
    got: list[LeafCredentials] = []
    leaf.callbacks.append(got.append)
    leaf.publish(Authority.root(), 1)
    return credentials_of(got[0])


async def test_tap_settings_follow_kv_and_a_bad_document_keeps_the_last_good(world: Any) -> None:
    from sidecar.tap import OFF, tap_key

    consul, leaf, state, _snaps = world
    consul.connect["api"] = [instance("api", 21001)]
    consul.bump()
    leaf.publish(Authority.root(), 1)
    await wait_until(lambda: cur(state) is not None, "first snapshot")
    assert cur(state).tap == OFF  # no document: payloads off
    consul.kv[tap_key("web")] = b'{"Payload": true, "MaxBytes": 64, "Redact": ["password"]}'
    consul.bump()
    await wait_until(lambda: cur(state).tap.payload and cur(state).tap.max_bytes == 64, "tap settings")
    consul.kv[tap_key("web")] = b'{"Payload": true, "MaxBytes": "lots"}'
    consul.bump()
    await asyncio.sleep(0.2)
    assert cur(state).tap.max_bytes == 64 and cur(state).tap.redact == ("password",)
    assert cur(state).describe()["tap"]["payload"] is True
    del consul.kv[tap_key("web")]
    consul.bump()
    await wait_until(lambda: cur(state).tap == OFF, "tap settings removed")


async def test_first_snapshot_at_once_then_a_burst_is_one_publish(world: Any) -> None:
    """Coalesced publishing (sidecar.coalesce): readiness does not wait for a window; changes made
    together are published once, with the latest state."""
    consul, leaf, state, snaps = world
    ca = Authority.root()
    consul.connect["api"] = [instance("api", 21001)]
    consul.bump()
    await wait_until(lambda: state.builder.missing() == ["leaf certificate"], "all but the leaf")
    leaf.publish(ca, 1)  # the last missing input: the snapshot is published in this very call
    assert state.ready.is_set() and cur(state).credentials.serial == "1" and len(snaps) == 1
    for serial in (2, 3, 4):
        leaf.publish(ca, serial)
    assert cur(state).credentials.serial == "1"  # within the window: not yet
    await wait_until(lambda: cur(state).credentials.serial == "4", "the burst published")
    serials = [s.credentials.serial for s in snaps]
    assert "2" not in serials and "3" not in serials  # other watches may publish too, never the burst's middle
