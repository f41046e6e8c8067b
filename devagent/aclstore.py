"""ACL tokens and policies in the state store, with Consul's validation (pure: no I/O).

Built-ins, created when ACLs are enabled: the ``global-management`` policy
(00000000-0000-0000-0000-000000000001), the anonymous token (00000000-0000-0000-0000-000000000002,
secret "anonymous", no policies) and, with ``-acl-initial-management``, the initial management
token, which counts as the bootstrap as in Consul.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
from typing import Any

from devagent import acl
from devagent.codec import (
    SECOND,
    DecodeError,
    decode_struct,
    expect_bool,
    expect_str,
    expect_str_list,
    format_duration,
    is_uuid,
    new_uuid,
    parse_duration,
)
from devagent.state import Row, Store, Tx

GLOBAL_MANAGEMENT_RULES = """acl = "write"
agent_prefix "" {
  policy = "write"
}
event_prefix "" {
  policy = "write"
}
key_prefix "" {
  policy = "write"
}
keyring = "write"
node_prefix "" {
  policy = "write"
}
operator = "write"
mesh = "write"
peering = "write"
query_prefix "" {
  policy = "write"
}
service_prefix "" {
  policy = "write"
  intentions = "write"
}
session_prefix "" {
  policy = "write"
}"""

REDACTED = "<hidden>"
BOOTSTRAP_KEY = "acl-bootstrap"
_POLICY_NAME = re.compile(r"^[A-Za-z0-9\-_]{1,128}$")
_SERVICE_NAME = re.compile(r"^[a-z0-9]([a-z0-9\-_]*[a-z0-9])?$")
_NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9\-_]*[a-z0-9])?$")

TOKEN_SPEC: dict[str, Any] = {
    "AccessorID": None, "SecretID": None, "Description": None,
    "Policies": [{"ID": None, "Name": None}],
    "Roles": [{"ID": None, "Name": None}],
    "ServiceIdentities": [{"ServiceName": None, "Datacenters": None}],
    "NodeIdentities": [{"NodeName": None, "Datacenter": None}],
    "Local": None, "ExpirationTime": None, "ExpirationTTL": None, "Namespace": None, "Partition": None,
}
POLICY_SPEC: dict[str, Any] = {"ID": None, "Name": None, "Description": None, "Rules": None,
                               "Datacenters": None, "Namespace": None, "Partition": None}


class ACLError(Exception):
    """A request Consul's ACL endpoints refuse (answered 500 with this message, as Consul does)."""


class NotFound(Exception):
    pass


class BootstrapNotAllowed(Exception):
    """Consul answers 403 ``Permission denied: ACL bootstrap no longer allowed (reset index: N)``."""

    def __init__(self, reset_index: int) -> None:
        super().__init__(f"Permission denied: ACL bootstrap no longer allowed (reset index: {reset_index})")


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _hash(doc: dict[str, Any]) -> str:
    return base64.b64encode(hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).digest()).decode()


def global_management_policy(index: int) -> Row:
    return {
        "ID": acl.GLOBAL_MANAGEMENT_ID,
        "Name": acl.GLOBAL_MANAGEMENT_NAME,
        "Description": "Builtin Policy that grants unlimited access",
        "Rules": GLOBAL_MANAGEMENT_RULES,
        "Datacenters": None,
        "Hash": _hash({"rules": GLOBAL_MANAGEMENT_RULES}),
        "CreateIndex": index,
        "ModifyIndex": index,
    }


def _token_row(accessor: str, secret: str, description: str, policies: list[dict[str, str]],
               index: int, create_index: int | None = None, **extra: Any) -> Row:
    row: Row = {
        "AccessorID": accessor,
        "SecretID": secret,
        "Description": description,
        "Policies": policies or None,
        "Roles": extra.get("Roles") or None,
        "ServiceIdentities": extra.get("ServiceIdentities") or None,
        "NodeIdentities": extra.get("NodeIdentities") or None,
        "Local": bool(extra.get("Local", False)),
        "CreateTime": extra.get("CreateTime") or now_rfc3339(),
        "CreateIndex": create_index if create_index is not None else index,
        "ModifyIndex": index,
    }
    row["Hash"] = _hash({k: row[k] for k in ("Description", "Policies", "Roles", "ServiceIdentities",
                                             "NodeIdentities", "Local")})
    return row


def ensure_builtins(store: Store, initial_management: str | None) -> None:
    """Create the global-management policy, the anonymous token and the initial management token."""
    with store.write() as tx:
        if tx.get("acl_policies", acl.GLOBAL_MANAGEMENT_ID) is None:
            tx.put("acl_policies", acl.GLOBAL_MANAGEMENT_ID, global_management_policy(tx.index))
        if tx.get("acl_tokens", acl.ANONYMOUS_ACCESSOR) is None:
            tx.put("acl_tokens", acl.ANONYMOUS_ACCESSOR,
                   _token_row(acl.ANONYMOUS_ACCESSOR, acl.ANONYMOUS_SECRET, "Anonymous Token", [], tx.index))
        if initial_management and not store.by_index("acl_tokens", "secret", initial_management):
            accessor = new_uuid()
            tx.put("acl_tokens", accessor, _token_row(
                accessor, initial_management, "Initial Management Token",
                [{"ID": acl.GLOBAL_MANAGEMENT_ID, "Name": acl.GLOBAL_MANAGEMENT_NAME}], tx.index))
            if tx.get("meta", BOOTSTRAP_KEY) is None:
                tx.put("meta", BOOTSTRAP_KEY, {"ResetIndex": tx.index})


def bootstrap(tx: Tx, secret: str = "") -> Row:
    done = tx.get("meta", BOOTSTRAP_KEY)
    if done is not None:
        raise BootstrapNotAllowed(int(done["ResetIndex"]))
    if secret and not is_uuid(secret):
        raise ACLError("The bootstrap secret must be a valid UUID")
    accessor = new_uuid()
    row = _token_row(accessor, secret or new_uuid(), "Bootstrap Token (Global Management)",
                     [{"ID": acl.GLOBAL_MANAGEMENT_ID, "Name": acl.GLOBAL_MANAGEMENT_NAME}], tx.index)
    tx.put("acl_tokens", accessor, row)
    tx.put("meta", BOOTSTRAP_KEY, {"ResetIndex": tx.index})
    return row


def bootstrap_reset_index(store: Store) -> int | None:
    row = store.get("meta", BOOTSTRAP_KEY)
    return int(row["ResetIndex"]) if row else None


# ----- output -----
def live_policy_links(store: Store, links: list[dict[str, Any]] | None) -> list[dict[str, str]] | None:
    """Policy links with the policies' current names; links to deleted policies dropped (as Consul)."""
    return _live_links(store, "acl_policies", links)


def _live_links(store: Store, table: str, links: list[dict[str, Any]] | None) -> list[dict[str, str]] | None:
    out = []
    for link in links or []:
        row = store.get(table, str(link.get("ID", "")))
        if row is not None:
            out.append({"ID": str(row["ID"]), "Name": str(row["Name"])})
    return out or None


def token_view(store: Store, row: Row, *, show_secret: bool) -> Row:
    """A token as Consul answers it: policy and role links resolved to current names, dangling links dropped."""
    out = dict(row)
    out["Policies"] = live_policy_links(store, row.get("Policies"))
    if row.get("Roles"):
        out["Roles"] = _live_links(store, ROLES_TABLE, row.get("Roles"))
    if not show_secret:
        out["SecretID"] = REDACTED
    return _drop_empty(out)


def _drop_empty(token: Row) -> Row:
    # Consul omits empty Policies/ServiceIdentities/NodeIdentities (omitempty)
    return {k: v for k, v in token.items()
            if not (k in ("Policies", "ServiceIdentities", "NodeIdentities", "Roles") and not v)}


def token_stub(store: Store, row: Row, *, show_secret: bool) -> Row:
    view = token_view(store, row, show_secret=show_secret)
    view["Legacy"] = False
    return view


def policy_stub(row: Row) -> Row:
    return {k: row.get(k) for k in ("ID", "Name", "Description", "Datacenters", "Hash", "CreateIndex",
                                    "ModifyIndex")}


# ----- tokens -----
ROLES_TABLE = "acl_roles"  # defined by api_acl_roles (devagent.aclroles)


def content_hash(doc: dict[str, Any]) -> str:
    """Consul-style base64 SHA-256 ``Hash`` of an ACL object's content."""
    return _hash(doc)


def resolve_policy_links(store: Store, links: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    """Policy links by ID or Name -> ``[{ID, Name}]``; an unknown policy is Consul's error."""
    return _resolve_policy_links(store, links)


def _resolve_role_links(store: Store, links: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    return _resolve_links(store, ROLES_TABLE, links, "Roles", "role")


def _resolve_policy_links(store: Store, links: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    return _resolve_links(store, "acl_policies", links, "Policies", "policy")


def _resolve_links(store: Store, table: str, links: list[dict[str, Any]] | None, field: str,
                   kind: str) -> list[dict[str, str]]:
    """Links by ID or Name to rows of ``table`` (indexed by ``name``) -> ``[{ID, Name}]``, deduplicated;
    an unknown one is Consul's ``No such ACL <kind> with ID/name "…"``."""
    out: list[dict[str, str]] = []
    for link in links or []:
        lid = expect_str(link.get("ID"), f"{field}.ID")
        name = expect_str(link.get("Name"), f"{field}.Name")
        if lid:
            row = store.get(table, lid)
            if row is None:
                raise ACLError(f'No such ACL {kind} with ID "{lid}"')
        elif name:
            found = store.by_index(table, "name", name)
            if not found:
                raise ACLError(f'No such ACL {kind} with name "{name}"')
            row = found[0]
        else:
            raise ACLError(f"Encountered a Token with {field.lower()} linked by Name in the state store")
        entry = {"ID": str(row["ID"]), "Name": str(row["Name"])}
        if entry not in out:
            out.append(entry)
    return out


def _service_identities(raw: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    out = []
    for ident in raw or []:
        name = expect_str(ident.get("ServiceName"), "ServiceIdentities.ServiceName")
        if not name:
            raise ACLError("Service identity is missing the service name field on this token")
        if not _SERVICE_NAME.match(name):
            raise ACLError(f"Service identity \"{name}\" has an invalid name. Only lowercase alphanumeric "
                           "characters, '-' and '_' are allowed")
        item: dict[str, Any] = {"ServiceName": name}
        dcs = expect_str_list(ident.get("Datacenters"), "ServiceIdentities.Datacenters")
        if dcs:
            item["Datacenters"] = dcs
        out.append(item)
    return out


def _node_identities(raw: list[dict[str, Any]] | None, default_dc: str) -> list[dict[str, Any]]:
    out = []
    for ident in raw or []:
        name = expect_str(ident.get("NodeName"), "NodeIdentities.NodeName")
        if not name or not _NODE_NAME.match(name):
            raise ACLError(f"Node identity has an invalid name: \"{name}\"")
        dc = expect_str(ident.get("Datacenter"), "NodeIdentities.Datacenter")
        if not dc:
            raise ACLError(f"Node identity \"{name}\" is missing the datacenter field on this token")
        out.append({"NodeName": name, "Datacenter": dc})
    return out


def decode_token(body: Any) -> dict[str, Any]:
    if body is None:
        raise DecodeError("EOF")
    return decode_struct(body, TOKEN_SPEC, what="token")


def token_set(store: Store, tx: Tx, req: dict[str, Any], *, create: bool, accessor_in_url: str,
              caller_secret: str, datacenter: str) -> Row:
    accessor = expect_str(req.get("AccessorID"), "AccessorID")
    secret = expect_str(req.get("SecretID"), "SecretID")
    existing: Row | None = None
    if create:
        if accessor:
            if not is_uuid(accessor):
                raise ACLError("Invalid Token: AccessorID is not a valid UUID")
            if store.get("acl_tokens", accessor) is not None:
                raise ACLError("Invalid Token: AccessorID is already in use")
        else:
            accessor = new_uuid()
        if secret:
            if store.by_index("acl_tokens", "secret", secret):
                raise ACLError("Invalid Token: SecretID is already in use")
        else:
            secret = new_uuid()
    else:
        accessor = accessor or accessor_in_url
        if accessor != accessor_in_url:
            raise DecodeError("Token Accessor ID in URL and payload do not match")
        existing = store.get("acl_tokens", accessor)
        if existing is None:
            raise ACLError(f"Cannot find token \"{accessor}\"")
        if secret and secret != existing["SecretID"]:
            raise ACLError("Changing a token's SecretID is not permitted")
        secret = str(existing["SecretID"])
        if "Local" in req and req["Local"] is not None and bool(req["Local"]) != bool(existing["Local"]):
            raise ACLError("Cannot toggle local mode of " + accessor)
    roles = _resolve_role_links(store, req.get("Roles"))
    expiration = _expiration(req, existing)
    policies = _resolve_policy_links(store, req.get("Policies"))
    services = _service_identities(req.get("ServiceIdentities"))
    nodes = _node_identities(req.get("NodeIdentities"), datacenter)
    row = _token_row(
        accessor, secret, expect_str(req.get("Description"), "Description"), policies, tx.index,
        create_index=int(existing["CreateIndex"]) if existing else None,
        ServiceIdentities=services, NodeIdentities=nodes, Roles=roles,
        Local=expect_bool(req.get("Local"), "Local", default=bool(existing["Local"]) if existing else False),
        CreateTime=existing["CreateTime"] if existing else None,
    )
    if expiration is not None:
        row["ExpirationTime"] = expiration[0]
        if expiration[1]:
            row["ExpirationTTL"] = expiration[1]
    tx.put("acl_tokens", accessor, row)
    return row


EXPIRATION_MIN = 60 * SECOND
EXPIRATION_MAX = 24 * 3600 * SECOND


def _expiration(req: dict[str, Any], existing: Row | None) -> tuple[str, str] | None:
    """(ExpirationTime, ExpirationTTL) from a token request, validated as Consul does."""
    if existing is not None:
        if existing.get("ExpirationTime") is None:
            if req.get("ExpirationTime") or req.get("ExpirationTTL"):
                raise ACLError("Cannot change expiration time of " + str(existing["AccessorID"]))
            return None
        return str(existing["ExpirationTime"]), str(existing.get("ExpirationTTL") or "")
    ttl_text = expect_str(req.get("ExpirationTTL"), "ExpirationTTL")
    time_text = expect_str(req.get("ExpirationTime"), "ExpirationTime")
    if ttl_text and time_text:
        raise ACLError("Expiration TTL and Expiration Time cannot both be set")
    now = datetime.datetime.now(datetime.UTC)
    if ttl_text:
        try:
            ttl = parse_duration(ttl_text)
        except DecodeError as exc:
            raise ACLError(f"Token Expiration TTL '{ttl_text}' invalid: {exc}") from None
        if ttl < 0:
            raise ACLError(f"Token Expiration TTL '{ttl_text}' should be > 0")
        if not EXPIRATION_MIN <= ttl <= EXPIRATION_MAX:
            raise ACLError(f"Token Expiration TTL '{ttl_text}' should be between 1m0s and 24h0m0s")
        when = now + datetime.timedelta(microseconds=ttl // 1000)
        return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), format_duration(ttl)
    if time_text:
        at = parse_time(time_text)
        if at is None:
            raise ACLError(f"Token Expiration Time '{time_text}' is not RFC 3339")
        delta = (at - now).total_seconds()
        if not EXPIRATION_MIN / SECOND <= delta <= EXPIRATION_MAX / SECOND:
            raise ACLError("Token Expiration Time should be between 1m0s and 24h0m0s in the future")
        return at.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), ""
    return None


def parse_time(text: str) -> datetime.datetime | None:
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.UTC)


def expired(row: Row, now: datetime.datetime | None = None) -> bool:
    text = row.get("ExpirationTime")
    if not text:
        return False
    when = parse_time(str(text))
    return when is not None and when <= (now or datetime.datetime.now(datetime.UTC))


def token_delete(store: Store, tx: Tx, accessor: str, caller_secret: str) -> None:
    row = store.get("acl_tokens", accessor)
    if row is None:
        raise NotFound()
    if accessor == acl.ANONYMOUS_ACCESSOR:
        raise ACLError("Delete operation not permitted on the anonymous token")
    if row["SecretID"] == caller_secret:
        raise ACLError("Deletion of the request's authorization token is not permitted")
    tx.delete("acl_tokens", accessor)


# ----- policies -----
def decode_policy(body: Any) -> dict[str, Any]:
    if body is None:
        raise DecodeError("EOF")
    return decode_struct(body, POLICY_SPEC, what="policy")


def policy_set(store: Store, tx: Tx, req: dict[str, Any], *, create: bool, id_in_url: str) -> Row:
    pid = expect_str(req.get("ID"), "ID")
    if create:
        if pid:
            raise DecodeError("Cannot specify the ID when creating a new policy")
        pid = new_uuid()
        existing = None
    else:
        if pid and pid != id_in_url:
            raise DecodeError("Policy ID in URL and payload do not match")
        pid = pid or id_in_url
        existing = store.get("acl_policies", pid)
        if existing is None:
            raise ACLError(f"Cannot find policy {pid}")
    name = expect_str(req.get("Name"), "Name")
    if not _POLICY_NAME.match(name):
        raise ACLError("Invalid Policy: invalid Name. Only alphanumeric characters, '-' and '_' are allowed")
    same_name = [p for p in store.by_index("acl_policies", "name", name) if p["ID"] != pid]
    if same_name:
        raise ACLError(f"Invalid Policy: A Policy with Name \"{name}\" already exists")
    rules = expect_str(req.get("Rules"), "Rules")
    if pid == acl.GLOBAL_MANAGEMENT_ID:
        if rules != GLOBAL_MANAGEMENT_RULES:
            raise ACLError("Changing the Rules for the builtin global-management policy is not permitted")
        if req.get("Datacenters"):
            raise ACLError("Changing the Datacenters of the builtin global-management policy is not permitted")
    try:
        acl.parse_rules(rules)
    except acl.RuleError as exc:
        raise ACLError(f"Invalid Policy: {exc}") from None
    dcs = expect_str_list(req.get("Datacenters"), "Datacenters") or None
    description = expect_str(req.get("Description"), "Description")
    row: Row = {
        "ID": pid,
        "Name": name,
        "Description": description,
        "Rules": rules,
        "Datacenters": dcs,
        "Hash": _hash({"name": name, "description": description, "rules": rules, "dcs": dcs}),
        "CreateIndex": int(existing["CreateIndex"]) if existing else tx.index,
        "ModifyIndex": tx.index,
    }
    tx.put("acl_policies", pid, row)
    return row


def policy_delete(store: Store, tx: Tx, pid: str) -> None:
    if pid == acl.GLOBAL_MANAGEMENT_ID:
        raise ACLError("Delete operation not permitted on the builtin global-management policy")
    if store.get("acl_policies", pid) is None:
        raise NotFound()
    tx.delete("acl_policies", pid)
