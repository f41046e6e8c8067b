"""Pure logic behind the ``/v1/operator/*`` endpoints of the single-server dev cluster: the autopilot
configuration (Consul's defaults, decoding a PUT body as ``api.AutopilotConfiguration``), the raft
peer lookups that refuse what a one-server configuration does not hold, the keyring answer of an
agent without gossip encryption, and the catalog usage counts of ``/v1/operator/usage``.

No I/O here; ``api_operator.py`` and ``api_keyring.py`` are the HTTP adapters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from devagent.codec import DecodeError, decode_struct, duration_value, expect_bool, expect_str, format_duration
from devagent.services import CONNECT_PROXY

MS = 1_000_000
SECOND = 1_000 * MS

# Consul's autopilot defaults (agent/config/default.go), which a dev server starts with
AUTOPILOT_DEFAULTS: dict[str, Any] = {
    "CleanupDeadServers": True,
    "LastContactThreshold": 200 * MS,
    "MaxTrailingLogs": 250,
    "MinQuorum": 0,
    "ServerStabilizationTime": 10 * SECOND,
    "RedundancyZoneTag": "",
    "DisableUpgradeMigration": False,
    "UpgradeVersionTag": "",
}
_DURATIONS = ("LastContactThreshold", "ServerStabilizationTime")
_UINTS = ("MaxTrailingLogs", "MinQuorum")
AUTOPILOT_SPEC: dict[str, Any] = {k: None for k in (*AUTOPILOT_DEFAULTS, "CreateIndex", "ModifyIndex")}


def decode_autopilot(body: Any) -> dict[str, Any]:
    """A PUT body as Consul decodes it: onto ``api.NewAutopilotConfiguration()`` (the defaults), so
    fields left out take the default, not the current value. Durations are Go strings or nanoseconds."""
    if not isinstance(body, dict):
        raise DecodeError("expected a JSON object")
    d = decode_struct(body, AUTOPILOT_SPEC, what="autopilot config")
    conf = dict(AUTOPILOT_DEFAULTS)
    for name in _DURATIONS:
        if d.get(name) is not None:
            conf[name] = duration_value(d[name], what=name)
    for name in _UINTS:
        value = d.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise DecodeError(f"{name}: expected a non-negative integer")
            conf[name] = value
    for name in ("CleanupDeadServers", "DisableUpgradeMigration"):
        if d.get(name) is not None:
            conf[name] = expect_bool(d[name], name)
    for name in ("RedundancyZoneTag", "UpgradeVersionTag"):
        conf[name] = expect_str(d.get(name), name)
    return conf


def autopilot_view(conf: Mapping[str, Any]) -> dict[str, Any]:
    """The stored configuration as ``GET /v1/operator/autopilot/configuration`` answers it."""
    out = {k: conf[k] for k in AUTOPILOT_DEFAULTS}
    for name in _DURATIONS:
        out[name] = format_duration(int(conf[name]))
    out["CreateIndex"] = conf["CreateIndex"]
    out["ModifyIndex"] = conf["ModifyIndex"]
    return out


def remove_peer_error(*, server_id: str, server_addr: str, by_id: str | None, by_address: str | None) -> str:
    """Why ``DELETE /v1/operator/raft/peer`` fails on a one-server configuration (always: the named
    peer is either unknown or the last voter, which raft refuses to remove)."""
    if by_address is not None and by_address != server_addr:
        return f'address "{by_address}" was not found in the Raft configuration'
    if by_id is not None and by_id != server_id:
        return f'id "{by_id}" was not found in the Raft configuration'
    return "need at least one voter in configuration"


def transfer_leader_error(*, server_id: str, target: str) -> str:
    """Why ``POST /v1/operator/raft/transfer-leader`` fails with no other server to hand over to."""
    if not target:
        return "cannot find peer"  # raft's LeadershipTransfer with no other voter
    if target == server_id:
        return "cannot transfer leadership to itself"
    return f"Could not find address for server id {target}"


def keyring_failure(node: str, datacenter: str, message: str, *, wan: bool = True) -> str:
    """Consul's answer to a keyring operation when gossip encryption is off: each pool (WAN, then the
    LAN of the datacenter; only the LAN for a ``?local-only`` list) reports its one node's refusal,
    joined as go-multierror words it."""
    errors = ["WAN error: 1/1 nodes reported failure", f"{node}.{datacenter}: {message}"] if wan else []
    errors += [f"{datacenter} (LAN) error: 1/1 nodes reported failure", f"{node}: {message}"]
    return f"{len(errors)} errors occurred:\n" + "".join(f"\t* {e}\n" for e in errors) + "\n"


KEYRING_LIST_DISABLED = "Keyring is empty (encryption not enabled)"
KEYRING_MODIFY_DISABLED = "No keyring to modify (encryption not enabled)"
CONNECT_KINDS = ("api-gateway", "connect-native", CONNECT_PROXY, "ingress-gateway", "mesh-gateway",
                 "terminating-gateway")


def service_usage(services: Iterable[Mapping[str, Any]], node_count: int) -> dict[str, Any]:
    """One datacenter's ``ServiceUsage``: distinct names, instances, instances per connect kind
    (connect-native counted by its flag), and billable instances (typical services other than the
    servers' own ``consul``)."""
    names: set[str] = set()
    instances = billable = 0
    per_kind = dict.fromkeys(CONNECT_KINDS, 0)
    for svc in services:
        instances += 1
        names.add(str(svc["Service"]))
        kind = str(svc.get("Kind") or "")
        if kind:
            if kind in per_kind:
                per_kind[kind] += 1
            continue
        if (svc.get("Connect") or {}).get("Native"):
            per_kind["connect-native"] += 1
        if svc["Service"] != "consul":
            billable += 1
    return {"Services": len(names), "ServiceInstances": instances, "ConnectServiceInstances": per_kind,
            "BillableServiceInstances": billable, "Nodes": node_count}
