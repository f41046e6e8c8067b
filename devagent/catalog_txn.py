"""``/v1/txn`` Node, Service and Check operations (Consul's state/txn.go), served through
``api_txn.register_op``. Each handler runs inside the transaction's write (all or nothing);
an error names the failed op as Consul words it."""

from __future__ import annotations

from typing import Any

from devagent import registry
from devagent import services as sv
from devagent.api_txn import TxnOpError
from devagent.codec import DecodeError, decode_struct, expect_int, expect_str, expect_str_map
from devagent.http import Req
from devagent.state import Row, Tx

NODE_SPEC: dict[str, Any] = {"ID": None, "Node": None, "Address": None, "Datacenter": None,
                             "TaggedAddresses": None, "Meta": None, "ModifyIndex": None, "CreateIndex": None,
                             "Partition": None, "PeerName": None}
MISSING_NODE = "Missing node registration"
MISSING_SERVICE = "Missing service registration"


def is_write(op: dict[str, Any]) -> bool:
    return str(op.get("Verb", op.get("verb", ""))).lower() != "get"


def _verb(op: dict[str, Any]) -> str:
    for k, v in op.items():
        if k.lower() == "verb":
            return expect_str(v, "Verb")
    return ""


def _field(op: dict[str, Any], name: str) -> Any:
    for k, v in op.items():
        if k.lower() == name.lower():
            return v
    return None


# ----- Node -----
def node_op(tx: Tx, op: dict[str, Any], r: Req) -> list[dict[str, Any]]:
    verb = _verb(op)
    d = decode_struct(_field(op, "Node"), NODE_SPEC, what="Node")
    name = expect_str(d.get("Node"), "Node.Node")
    index = expect_int(d.get("ModifyIndex"), "Node.ModifyIndex")
    authz = r.authz
    existing = tx.get("nodes", name)
    if verb == "get":
        authz.check("node:read", name)
        if existing is None:
            raise TxnOpError(f'node "{name}" doesn\'t exist')
        return [{"Node": sv.public(existing)}]
    if verb not in ("set", "cas", "delete", "delete-cas"):
        raise TxnOpError(f'unknown Node verb "{verb}"')
    authz.check("node:write", name)
    if verb in ("delete", "delete-cas"):
        if verb == "delete-cas" and (existing is None or existing["ModifyIndex"] != index):
            raise TxnOpError(f'failed to delete node "{name}", index is stale')
        registry.remove_node(tx, name)
        return []
    if verb == "cas" and ((index == 0 and existing is not None)
                          or (index != 0 and (existing is None or existing["ModifyIndex"] != index))):
        raise TxnOpError(f'failed to set node "{name}", index is stale')
    if not name:
        raise TxnOpError("Must provide node")
    row = {
        "ID": expect_str(d.get("ID"), "Node.ID"),
        "Node": name,
        "Address": expect_str(d.get("Address"), "Node.Address"),
        "Datacenter": r.agent.datacenter,
        "TaggedAddresses": expect_str_map(d.get("TaggedAddresses"), "Node.TaggedAddresses"),
        "Meta": expect_str_map(d.get("Meta"), "Node.Meta"),
        "CreateIndex": existing["CreateIndex"] if existing else tx.index,
        "ModifyIndex": tx.index,
    }
    tx.put("nodes", name, row)
    return [{"Node": sv.public(row)}]


# ----- Service -----
def service_op(tx: Tx, op: dict[str, Any], r: Req) -> list[dict[str, Any]]:
    verb = _verb(op)
    node = expect_str(_field(op, "Node"), "Node")
    raw = _field(op, "Service") or {}
    if not isinstance(raw, dict):
        raise DecodeError("Service: expected an object")
    index = expect_int(next((v for k, v in raw.items() if k.lower() == "modifyindex"), None), "Service.ModifyIndex")
    dec = sv.decode_service({k: v for k, v in raw.items() if k.lower() not in ("modifyindex", "createindex")},
                            what="Service")
    svc = sv.normalize_service(dec["service"]) if dec["service"]["Service"] or dec["service"]["ID"] else \
        dec["service"]
    sid = svc.get("ID") or ""
    key = registry.service_key(node, sid)
    existing = tx.get("services", key)
    authz = r.authz
    if verb == "get":
        if existing is None:
            raise TxnOpError(f'service "{sid}" on node "{node}" doesn\'t exist')
        authz.check("service:read", existing["Service"])
        return [{"Service": sv.node_service(existing)}]
    if verb not in ("set", "cas", "delete", "delete-cas"):
        raise TxnOpError(f'unknown Service verb "{verb}"')
    if verb in ("delete", "delete-cas"):
        if existing is not None:
            authz.check("service:write", existing["Service"])
        if verb == "delete-cas" and (existing is None or existing["ModifyIndex"] != index):
            raise TxnOpError(f'failed to delete service "{sid}" on node "{node}", index is stale')
        registry.remove_service(tx, node, sid)
        return []
    if not svc.get("Service"):
        raise TxnOpError("Must provide service name with ID")
    authz.check("service:write", svc["Service"])
    if tx.get("nodes", node) is None:
        raise TxnOpError(MISSING_NODE)
    if verb == "cas" and ((index == 0 and existing is not None)
                          or (index != 0 and (existing is None or existing["ModifyIndex"] != index))):
        raise TxnOpError(f'failed to set service "{sid}" on node "{node}", index is stale')
    try:
        sv.validate_service(svc, for_agent=False)
    except sv.ServiceError as exc:
        raise TxnOpError(str(exc)) from None
    row = registry.put_service(tx, node, svc)
    return [{"Service": sv.node_service(row)}]


# ----- Check -----
CHECK_SPEC: dict[str, Any] = {
    "Node": None, "CheckID": None, "Name": None, "Status": None, "Notes": None, "Output": None,
    "ServiceID": None, "ServiceName": None, "ServiceTags": None, "Type": None, "Interval": None,
    "Timeout": None, "Definition": None, "ModifyIndex": None, "CreateIndex": None, "ExposedPort": None,
    "Namespace": None, "Partition": None, "PeerName": None,
}


def check_op(tx: Tx, op: dict[str, Any], r: Req) -> list[dict[str, Any]]:
    verb = _verb(op)
    d = decode_struct(_field(op, "Check"), CHECK_SPEC, what="Check")
    node = expect_str(d.get("Node"), "Check.Node")
    cid = expect_str(d.get("CheckID"), "Check.CheckID")
    index = expect_int(d.get("ModifyIndex"), "Check.ModifyIndex")
    key = f"{node}/{cid}"
    existing = tx.get("checks", key)
    authz = r.authz

    def vet(row: Row | dict[str, Any]) -> None:
        if row.get("ServiceName"):
            authz.check("service:write", str(row["ServiceName"]))
        else:
            authz.check("node:write", node)

    if verb == "get":
        if existing is None:
            raise TxnOpError(f'check "{cid}" on node "{node}" doesn\'t exist')
        return [{"Check": sv.check_out(existing)}]
    if verb not in ("set", "cas", "delete", "delete-cas"):
        raise TxnOpError(f'unknown Check verb "{verb}"')
    if verb in ("delete", "delete-cas"):
        if existing is not None:
            vet(existing)
        if verb == "delete-cas" and (existing is None or existing["ModifyIndex"] != index):
            raise TxnOpError(f'failed to delete check "{cid}" on node "{node}", index is stale')
        tx.delete("checks", key)
        return []
    if tx.get("nodes", node) is None:
        raise TxnOpError(MISSING_NODE)
    sid = expect_str(d.get("ServiceID"), "Check.ServiceID")
    service = None
    if sid:
        service = tx.get("services", registry.service_key(node, sid))
        if service is None:
            raise TxnOpError(MISSING_SERVICE)
    vet({"ServiceName": service["Service"] if service else ""})
    if verb == "cas" and ((index == 0 and existing is not None)
                          or (index != 0 and (existing is None or existing["ModifyIndex"] != index))):
        raise TxnOpError(f'failed to set check "{cid}" on node "{node}", index is stale')
    status = expect_str(d.get("Status"), "Check.Status") or sv.CRITICAL
    if status not in (*sv.STATUSES, sv.MAINT):
        raise TxnOpError(f'invalid check status "{status}"')
    ct = sv.decode_check_type(d.get("Definition") or {}, "Check.Definition")
    ct.update({"Name": expect_str(d.get("Name"), "Check.Name"), "Notes": expect_str(d.get("Notes"), "Check.Notes")})
    row = sv.health_check_row(node, cid, ct, service, create_index=existing["CreateIndex"] if existing else tx.index,
                              modify_index=tx.index, status=status,
                              output=expect_str(d.get("Output"), "Check.Output"))
    row.pop("_Type", None)  # catalog checks are stored, not run
    tx.put("checks", key, row)
    return [{"Check": sv.check_out(row)}]
