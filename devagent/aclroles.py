"""ACL roles, auth methods and binding rules in the state store, validated with Consul's words (pure).

Tables (defined by ``api_acl_roles.setup``): ``acl_roles`` (key role ID, index ``name``),
``acl_auth_methods`` (key method name), ``acl_binding_rules`` (key rule ID, index ``method``).
Errors Consul's ACL RPCs return are ``aclstore.ACLError`` (answered 500 with the message, as Consul
does); malformed bodies are ``DecodeError`` (400).

Auth methods of Consul CE's types (``jwt``, ``kubernetes``, ``oidc``) are stored and their required
configuration checked; a single dev agent cannot verify their credentials (no Kubernetes API, no
identity provider), so ``login`` refuses them (see ``LOGIN_UNSUPPORTED``).
"""

from __future__ import annotations

import re
from typing import Any

from devagent import aclstore, bexpr
from devagent.codec import (
    SECOND,
    DecodeError,
    decode_struct,
    duration_value,
    expect_str,
    format_duration,
    is_uuid,
    new_uuid,
)
from devagent.state import Row, Store, Tx

ROLES, METHODS, RULES = "acl_roles", "acl_auth_methods", "acl_binding_rules"
_ROLE_NAME = re.compile(r"^[A-Za-z0-9\-_]{1,256}$")
_METHOD_NAME = re.compile(r"^[A-Za-z0-9\-_]{1,128}$")
_IDENTITY_NAME = re.compile(r"^[a-z0-9]([a-z0-9\-_]*[a-z0-9])?$")
METHOD_TYPES = ("jwt", "kubernetes", "oidc")  # Consul CE's registered auth method types, sorted
BIND_TYPES = ("service", "node", "role", "policy", "templated-policy")
TOKEN_TTL_MIN = 60 * SECOND  # Consul's acl token min/max expiration TTL
TOKEN_TTL_MAX = 24 * 3600 * SECOND
LOGIN_UNSUPPORTED = ("Login with auth method type {type!r} is not supported by the dev agent: it cannot "
                     "verify {what} on its own")
_LOGIN_WHAT = {"kubernetes": "Kubernetes service account tokens (no Kubernetes API to ask)",
               "jwt": "JWTs against the method's keys or discovery URL",
               "oidc": "OIDC logins (no identity provider to redirect to)"}

ROLE_SPEC: dict[str, Any] = {
    "ID": None, "Name": None, "Description": None, "Policies": [{"ID": None, "Name": None}],
    "ServiceIdentities": [{"ServiceName": None, "Datacenters": None}],
    "NodeIdentities": [{"NodeName": None, "Datacenter": None}], "Namespace": None, "Partition": None,
    "TemplatedPolicies": None,
}
METHOD_SPEC: dict[str, Any] = {
    "Name": None, "Type": None, "DisplayName": None, "Description": None, "MaxTokenTTL": None,
    "TokenLocality": None, "TokenNameFormat": None, "Config": None, "NamespaceRules": None, "Namespace": None,
    "Partition": None,
}
RULE_SPEC: dict[str, Any] = {
    "ID": None, "Description": None, "AuthMethod": None, "Selector": None, "BindType": None,
    "BindName": None, "BindVars": None, "Namespace": None, "Partition": None,
}


def install(store: Store) -> None:
    for table in (ROLES, METHODS, RULES):
        store.define_table(table)
    store.add_index(ROLES, "name", lambda row: [row["Name"]])
    store.add_index(RULES, "method", lambda row: [row["AuthMethod"]])


def decode(body: Any, spec: dict[str, Any], what: str) -> dict[str, Any]:
    if body is None:
        raise DecodeError("EOF")
    return decode_struct(body, spec, what=what)


# ----- roles -----
def role_by_name(store: Store, name: str) -> Row | None:
    found = store.by_index(ROLES, "name", name)
    return found[0] if found else None


def _role_identities(req: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    services: list[dict[str, Any]] = []
    for ident in req.get("ServiceIdentities") or []:
        name = expect_str(ident.get("ServiceName"), "ServiceIdentities.ServiceName")
        if not name:
            raise aclstore.ACLError("Service identity is missing the service name field on this role")
        if not _IDENTITY_NAME.match(name):
            raise aclstore.ACLError(f'Service identity "{name}" has an invalid name. Only alphanumeric '
                                    "characters, '-' and '_' are allowed")
        item: dict[str, Any] = {"ServiceName": name}
        dcs = ident.get("Datacenters")
        if dcs:
            if not isinstance(dcs, list) or not all(isinstance(d, str) for d in dcs):
                raise DecodeError("ServiceIdentities.Datacenters: expected a list of strings")
            item["Datacenters"] = list(dcs)
        if item not in services:
            services.append(item)
    nodes: list[dict[str, Any]] = []
    for ident in req.get("NodeIdentities") or []:
        name = expect_str(ident.get("NodeName"), "NodeIdentities.NodeName")
        dc = expect_str(ident.get("Datacenter"), "NodeIdentities.Datacenter")
        if not name:
            raise aclstore.ACLError("Node identity is missing the node name field on this role")
        if not dc:
            raise aclstore.ACLError("Node identity is missing the datacenter field on this role")
        if not _IDENTITY_NAME.match(name):
            raise aclstore.ACLError("Node identity has an invalid name. Only alphanumeric characters, '-' and "
                                    "'_' are allowed")
        if {"NodeName": name, "Datacenter": dc} not in nodes:
            nodes.append({"NodeName": name, "Datacenter": dc})
    return services, nodes


def role_set(store: Store, tx: Tx, req: dict[str, Any]) -> Row:
    """Consul's ACL.RoleSet: ``req["ID"]`` empty creates, else updates that role."""
    name = expect_str(req.get("Name"), "Name")
    rid = expect_str(req.get("ID"), "ID")
    if not name:
        raise aclstore.ACLError("Invalid Role: no Name is set")
    if not _ROLE_NAME.match(name):
        raise aclstore.ACLError("Invalid Role: invalid Name. Only alphanumeric characters, '-' and '_' are allowed")
    existing: Row | None = None
    if not rid:
        rid = new_uuid()
        if role_by_name(store, name) is not None:
            raise aclstore.ACLError(f'Invalid Role: A Role with Name "{name}" already exists')
    else:
        if not is_uuid(rid):
            raise aclstore.ACLError("Role ID invalid UUID")
        existing = store.get(ROLES, rid)
        if existing is None:
            raise aclstore.ACLError(f"cannot find role {rid}")
        other = role_by_name(store, name)
        if other is not None and other["ID"] != rid:
            raise aclstore.ACLError(f'Invalid Role: A role with name "{name}" already exists')
    if req.get("TemplatedPolicies"):
        raise aclstore.ACLError("Templated policies are not supported by the dev agent")
    policies = aclstore.resolve_policy_links(store, req.get("Policies"))
    services, nodes = _role_identities(req)
    description = expect_str(req.get("Description"), "Description")
    row: Row = {"ID": rid, "Name": name, "Description": description, "Policies": policies,
                "ServiceIdentities": services, "NodeIdentities": nodes}
    row["Hash"] = aclstore.content_hash({k: row[k] for k in ("Name", "Description", "Policies",
                                                             "ServiceIdentities", "NodeIdentities")})
    row["CreateIndex"] = int(existing["CreateIndex"]) if existing else tx.index
    row["ModifyIndex"] = tx.index
    tx.put(ROLES, rid, row)
    return row


def role_view(store: Store, row: Row) -> Row:
    """A role as Consul answers it: policy links with current names, empty lists omitted."""
    out = dict(row)
    out["Policies"] = aclstore.live_policy_links(store, row.get("Policies"))
    return {k: v for k, v in out.items()
            if not (k in ("Policies", "ServiceIdentities", "NodeIdentities") and not v)}


# ----- auth methods -----
def _method_config(kind: str, config: Any) -> dict[str, Any]:
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise DecodeError("Config: expected an object")

    def need(*keys: str) -> None:
        for key in keys:
            if not config.get(key):
                raise aclstore.ACLError(f"Invalid Auth Method: Config.{key} is required")

    if kind == "kubernetes":
        need("Host", "CACert", "ServiceAccountJWT")
    elif kind == "jwt":
        given = [k for k in ("JWTValidationPubKeys", "JWKSURL", "OIDCDiscoveryURL") if config.get(k)]
        if len(given) != 1:
            raise aclstore.ACLError("Invalid Auth Method: exactly one of 'JWTValidationPubKeys', 'JWKSURL', or "
                                    "'OIDCDiscoveryURL' must be set for type \"jwt\"")
    elif kind == "oidc":
        need("OIDCDiscoveryURL", "OIDCClientID", "OIDCClientSecret")
        if not config.get("AllowedRedirectURIs"):
            raise aclstore.ACLError("Invalid Auth Method: Config.AllowedRedirectURIs is required")
    return dict(config)


def method_set(store: Store, tx: Tx, req: dict[str, Any]) -> Row:
    """Consul's ACL.AuthMethodSet (create or update by Name)."""
    name = expect_str(req.get("Name"), "Name")
    if not name:
        raise aclstore.ACLError("Invalid Auth Method: no Name is set")
    if not _METHOD_NAME.match(name):
        raise aclstore.ACLError("Invalid Auth Method: invalid Name. Only alphanumeric characters, '-' and '_' "
                                "are allowed")
    kind = expect_str(req.get("Type"), "Type")
    existing = store.get(METHODS, name)
    if existing is not None:
        if not kind:
            kind = str(existing["Type"])
        elif kind != existing["Type"]:
            raise aclstore.ACLError("the Type field of an Auth Method is immutable")
    if kind not in METHOD_TYPES:
        raise aclstore.ACLError(f"Invalid Auth Method: Type should be one of: [{' '.join(METHOD_TYPES)}]")
    ttl = duration_value(req.get("MaxTokenTTL"), what="MaxTokenTTL") if req.get("MaxTokenTTL") else 0
    if ttl:
        if ttl > TOKEN_TTL_MAX:
            raise aclstore.ACLError(f"MaxTokenTTL {format_duration(ttl)} cannot be more than "
                                    f"{format_duration(TOKEN_TTL_MAX)}")
        if ttl < TOKEN_TTL_MIN:
            raise aclstore.ACLError(f"MaxTokenTTL {format_duration(ttl)} cannot be less than "
                                    f"{format_duration(TOKEN_TTL_MIN)}")
    locality = expect_str(req.get("TokenLocality"), "TokenLocality")
    if locality not in ("", "local", "global"):
        raise aclstore.ACLError("Invalid Auth Method: TokenLocality should be one of 'local' or 'global'")
    config = _method_config(kind, req.get("Config"))
    row: Row = {"Name": name, "Type": kind}
    display = expect_str(req.get("DisplayName"), "DisplayName")
    if display:
        row["DisplayName"] = display
    row["Description"] = expect_str(req.get("Description"), "Description")
    if ttl:
        row["MaxTokenTTL"] = format_duration(ttl)
    if locality:
        row["TokenLocality"] = locality
    name_format = expect_str(req.get("TokenNameFormat"), "TokenNameFormat")
    if name_format:
        row["TokenNameFormat"] = name_format
    row["Config"] = config
    row["CreateIndex"] = int(existing["CreateIndex"]) if existing else tx.index
    row["ModifyIndex"] = tx.index
    tx.put(METHODS, name, row)
    return row


def method_stub(row: Row) -> Row:
    return {k: v for k, v in row.items() if k != "Config"}


def method_delete(store: Store, tx: Tx, name: str) -> None:
    """Delete a method with its binding rules and the tokens it issued (as Consul); unknown: nothing."""
    if store.get(METHODS, name) is None:
        return
    for rule in list(store.by_index(RULES, "method", name)):
        tx.delete(RULES, str(rule["ID"]))
    for token in list(store.rows("acl_tokens").values()):
        if token.get("AuthMethod") == name:
            tx.delete("acl_tokens", str(token["AccessorID"]))
    tx.delete(METHODS, name)


def login_refusal(method: Row) -> str:
    kind = str(method.get("Type", ""))
    return LOGIN_UNSUPPORTED.format(type=kind, what=_LOGIN_WHAT.get(kind, "its credentials"))


# ----- binding rules -----
def rule_set(store: Store, tx: Tx, req: dict[str, Any]) -> Row:
    """Consul's ACL.BindingRuleSet: ``req["ID"]`` empty creates, else updates."""
    rid = expect_str(req.get("ID"), "ID")
    method_name = expect_str(req.get("AuthMethod"), "AuthMethod")
    existing: Row | None = None
    if not rid:
        rid = new_uuid()
    else:
        if not is_uuid(rid):
            raise aclstore.ACLError("Binding Rule ID invalid UUID")
        existing = store.get(RULES, rid)
        if existing is None:
            raise aclstore.ACLError(f"cannot find binding rule {rid}")
        if not method_name:
            method_name = str(existing["AuthMethod"])
        elif method_name != existing["AuthMethod"]:
            raise aclstore.ACLError("the AuthMethod field of an Binding Rule is immutable")
    if not method_name:
        raise aclstore.ACLError("Invalid Binding Rule: no AuthMethod is set")
    if store.get(METHODS, method_name) is None:
        raise aclstore.ACLError(f'cannot find auth method with name "{method_name}"')
    selector = expect_str(req.get("Selector"), "Selector")
    if selector:
        try:
            bexpr.compile(selector)
        except bexpr.FilterError as exc:
            raise aclstore.ACLError(f"invalid Binding Rule: Selector is invalid: {exc}") from None
    bind_type = expect_str(req.get("BindType"), "BindType")
    bind_name = expect_str(req.get("BindName"), "BindName")
    if not bind_type:
        raise aclstore.ACLError("Invalid Binding Rule: no BindType is set")
    if not bind_name:
        raise aclstore.ACLError("Invalid Binding Rule: no BindName is set")
    if bind_type not in BIND_TYPES:
        raise aclstore.ACLError(f'Invalid Binding Rule: unknown BindType "{bind_type}"')
    if "${" not in bind_name and bind_type in ("service", "node") and not _IDENTITY_NAME.match(bind_name):
        raise aclstore.ACLError("Invalid Binding Rule: invalid BindName")
    bind_vars = req.get("BindVars")
    if bind_vars is not None and not isinstance(bind_vars, dict):
        raise DecodeError("BindVars: expected an object")
    row: Row = {"ID": rid, "Description": expect_str(req.get("Description"), "Description"),
                "AuthMethod": method_name, "Selector": selector, "BindType": bind_type, "BindName": bind_name}
    if bind_vars:
        row["BindVars"] = dict(bind_vars)
    row["CreateIndex"] = int(existing["CreateIndex"]) if existing else tx.index
    row["ModifyIndex"] = tx.index
    tx.put(RULES, rid, row)
    return row
