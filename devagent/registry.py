"""Service and check writes on the state store, shared by the agent and catalog endpoints (pure).

``install(store)`` adds the secondary indexes and the triggers that touch the topics the read
endpoints block on:

- ``("service", name)``: an instance of service ``name`` or one of its checks changed (on any node);
- ``("connect", name)``: a connect-proxy for ``name`` (or a Connect-native ``name``) or its checks changed;
- ``("nodehealth", node)``: the node row or a node-level check (no ServiceID) changed;
- ``("node", node)``: anything on the node changed (node, services, checks);
- ``("svcchecks", node, service_id)``: that service instance or one of its checks changed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from devagent import services as sv
from devagent.state import Row, Store, Tx


def _connect_names(row: Row | None) -> list[str]:
    if row is None:
        return []
    if row.get("Kind") == sv.CONNECT_PROXY:
        dest = (row.get("Proxy") or {}).get("DestinationServiceName")
        return [str(dest)] if dest else []
    if (row.get("Connect") or {}).get("Native"):
        return [str(row["Service"])]
    return []


def install(store: Store) -> None:
    store.add_index("services", "name", lambda row: [row["Service"]])
    store.add_index("services", "connect", _connect_names)
    store.add_index("checks", "service",
                    lambda row: [f"{row['Node']}/{row['ServiceID']}"] if row.get("ServiceID") else [])
    store.add_index("checks", "nodelevel", lambda row: [] if row.get("ServiceID") else [row["Node"]])

    def on_service(tx: Tx, key: str, old: Row | None, new: Row | None) -> None:
        topics: set[Any] = set()
        for row in (old, new):
            if row is not None:
                topics.add(("service", row["Service"]))
                topics.add(("node", row["Node"]))
                topics.add(("svcchecks", row["Node"], row["ID"]))
                topics.update(("connect", n) for n in _connect_names(row))
        tx.touch(*topics)

    def on_check(tx: Tx, key: str, old: Row | None, new: Row | None) -> None:
        topics: set[Any] = set()
        for row in (old, new):
            if row is None:
                continue
            topics.add(("node", row["Node"]))
            if row.get("ServiceID"):
                topics.add(("service", row.get("ServiceName", "")))
                topics.add(("svcchecks", row["Node"], row["ServiceID"]))
                svc = tx.get("services", f"{row['Node']}/{row['ServiceID']}")
                topics.update(("connect", n) for n in _connect_names(svc))
            else:
                topics.add(("nodehealth", row["Node"]))
        tx.touch(*topics)

    def on_node(tx: Tx, key: str, old: Row | None, new: Row | None) -> None:
        tx.touch(("nodehealth", key), ("node", key))

    store.on_put("services", on_service)
    store.on_delete("services", on_service)
    store.on_put("checks", on_check)
    store.on_delete("checks", on_check)
    store.on_put("nodes", on_node)
    store.on_delete("nodes", on_node)


def service_key(node: str, service_id: str) -> str:
    return f"{node}/{service_id}"


def service_checks(store: Store, node: str, service_id: str) -> list[Row]:
    return store.by_index("checks", "service", service_key(node, service_id))


def put_service(tx: Tx, node: str, svc: dict[str, Any], *, sidecar: bool = False) -> Row:
    """Store a normalized NodeService on ``node``; returns the row."""
    key = service_key(node, svc["ID"])
    old = tx.get("services", key)
    row = {**svc, "Node": node, "CreateIndex": old["CreateIndex"] if old else tx.index,
           "ModifyIndex": tx.index, "_Sidecar": sidecar}
    tx.put("services", key, row)
    # keep the service fields of its existing checks current (ServiceName, ServiceTags)
    for chk in tx._store.by_index("checks", "service", key):
        if chk.get("ServiceName") != row["Service"] or chk.get("ServiceTags") != row.get("Tags"):
            tx.put("checks", f"{node}/{chk['CheckID']}",
                   {**chk, "ServiceName": row["Service"], "ServiceTags": list(row.get("Tags") or []),
                    "ModifyIndex": tx.index})
    return row


def put_check(tx: Tx, node: str, check_id: str, ct: dict[str, Any], service: Row | None,
              *, status: str | None = None, output: str | None = None) -> Row:
    """Store a check. A new check starts with the definition's ``Status`` (critical when none is
    given); an existing check with the same ID keeps its status and output, even when the new
    definition gives a Status, as Consul's agent does (it restores a re-registered check's state
    from a snapshot "to avoid flapping"). ``status`` forces a status (callers that are not the agent)."""
    key = f"{node}/{check_id}"
    old = tx.get("checks", key)
    keep = old is not None and status is None
    row = sv.health_check_row(
        node, check_id, ct, service,
        create_index=old["CreateIndex"] if old else tx.index, modify_index=tx.index,
        status=old["Status"] if keep and old else status,
        output=(old["Output"] if keep and old else output) or "")
    tx.put("checks", key, row)
    return row


def add_service_with_checks(tx: Tx, node: str, svc: dict[str, Any], cts: list[dict[str, Any]], *,
                            sidecar: bool = False, replace_existing_checks: bool = False) -> Row:
    row = put_service(tx, node, svc, sidecar=sidecar)
    ids = sv.service_check_ids(svc["ID"], cts)
    if replace_existing_checks:
        for chk in tx._store.by_index("checks", "service", service_key(node, svc["ID"])):
            if chk["CheckID"] not in ids and not chk["CheckID"].startswith(sv.SERVICE_MAINT_PREFIX):
                tx.delete("checks", f"{node}/{chk['CheckID']}")
    for cid, ct in zip(ids, cts, strict=False):
        ct = {**ct, "Name": sv.default_check_name(ct, svc["Service"]), "CheckID": cid}
        put_check(tx, node, cid, ct, row)
    return row


def is_agent_local(row: Row) -> bool:
    """A service or check the agent itself holds (listed by ``/v1/agent/*``): not the ``consul``
    service nor the ``serfHealth`` check, which a Consul server's leader writes into the catalog only."""
    return not row.get("_Server")


def put_server_service(tx: Tx, node: str, meta: dict[str, str], port: int) -> None:
    """The ``consul`` service a Consul server's leader registers for every server node (ID and name
    ``consul``, the server RPC port, no address, no tags, no checks of its own: the node's serfHealth
    covers it). Written only when it is missing or differs."""
    key = service_key(node, sv.CONSUL_SERVICE_ID)
    old = tx.get("services", key)
    want: dict[str, Any] = {
        "Kind": "", "ID": sv.CONSUL_SERVICE_ID, "Service": sv.CONSUL_SERVICE_ID, "Tags": [], "Address": "",
        "TaggedAddresses": {}, "Meta": dict(meta), "Port": port, "SocketPath": "",
        "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": False, "Proxy": {}, "Connect": {},
    }
    if old is not None and old.get("_Server") and all(old.get(k) == v for k, v in want.items()):
        return
    tx.put("services", key, {**want, "Node": node, "CreateIndex": old["CreateIndex"] if old else tx.index,
                             "ModifyIndex": tx.index, "_Sidecar": False, "_Server": True})


def remove_service(tx: Tx, node: str, service_id: str) -> Row | None:
    """Delete a service and its checks; returns the deleted row (None when unknown)."""
    key = service_key(node, service_id)
    for chk in list(tx._store.by_index("checks", "service", key)):
        tx.delete("checks", f"{node}/{chk['CheckID']}")
    return tx.delete("services", key)


def remove_node(tx: Tx, node: str) -> bool:
    store = tx._store
    for row in list(store.by_index("services", "node", node)):
        remove_service(tx, node, row["ID"])
    for chk in list(store.by_index("checks", "node", node)):
        tx.delete("checks", f"{node}/{chk['CheckID']}")
    return tx.delete("nodes", node) is not None


def set_status(tx: Tx, node: str, check_id: str, status: str, output: str) -> bool:
    """Update a check's status/output; writes (and bumps ModifyIndex) only when something changed."""
    key = f"{node}/{check_id}"
    row = tx.get("checks", key)
    if row is None:
        return False
    if row["Status"] == status and row["Output"] == output:
        return True
    tx.put("checks", key, {**row, "Status": status, "Output": output, "ModifyIndex": tx.index})
    return True


def used_ports(store: Store, node: str) -> dict[str, int]:
    return {row["ID"]: int(row.get("Port") or 0) for row in store.by_index("services", "node", node)}


def instances(store: Store, name: str) -> list[Row]:
    return store.by_index("services", "name", name)


def node_names(rows: Iterable[Row]) -> set[str]:
    return {str(r["Node"]) for r in rows}
