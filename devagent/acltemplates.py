"""Consul's builtin ACL templated policies (CE): their names, IDs, variable schemas and rule templates,
the validation a token's ``TemplatedPolicies`` get, and the synthetic policy a template renders to
(``/v1/acl/templated-policy/preview``, and what a token holding it is granted).

Pure logic; ``api_acl_templates.py`` serves it and ``aclstore.py`` stores it on tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from devagent.codec import DecodeError, decode_struct, expect_str, expect_str_list

# The schema Consul ships for templates that take a name (builtin/service, builtin/node,
# builtin/api-gateway): one required string "name" of length at least one.
NAME_SCHEMA = (
    '{\n\t"type": "object",\n\t"properties": {\n\t\t"name": '
    '{ "type": "string", "$ref": "#/definitions/min-length-one" }'
    '\n\t},\n\t"required": ["name"],\n\t"definitions": {\n\t\t"min-length-one": {\n\t\t\t\t"type": "string",'
    '\n\t\t\t\t"minLength": 1\n\t\t}\n\t}\n}'
)


@dataclass(frozen=True)
class Template:
    name: str
    template_id: str
    schema: str  # "" when the template takes no variables
    rules: str  # Go text/template source; only {{.Name}} is used by the builtins
    description: str

    def render(self, name: str) -> str:
        return self.rules.replace("{{.Name}}", name)


def _rules(*blocks: str) -> str:
    return "\n" + "\n".join(blocks)


def _block(kind: str, segment: str, policy: str) -> str:
    return f'{kind} "{segment}" {{\n\tpolicy = "{policy}"\n}}'


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("builtin/service", "00000000-0000-0000-0000-000000000003", NAME_SCHEMA,
             _rules(_block("service", "{{.Name}}", "write"), _block("service", "{{.Name}}-sidecar-proxy", "write"),
                    _block("service_prefix", "", "read"), _block("node_prefix", "", "read")),
             "Gives the token or role permissions to register a service and discover services in the Consul "
             "catalog. It also gives the specified service's sidecar proxy the permission to discover and route "
             "traffic to other services."),
    Template("builtin/node", "00000000-0000-0000-0000-000000000004", NAME_SCHEMA,
             _rules(_block("node", "{{.Name}}", "write"), _block("service_prefix", "", "read")),
             "Gives the token or role permissions for a register an agent/node into the catalog. A node is "
             "typically a consul agent but can also be a physical server, cloud instance or a container."),
    Template("builtin/dns", "00000000-0000-0000-0000-000000000005", "",
             _rules(_block("node_prefix", "", "read"), _block("service_prefix", "", "read"),
                    _block("query_prefix", "", "read")),
             "Gives the token or role permissions for the Consul DNS to query services in the network."),
    Template("builtin/nomad-server", "00000000-0000-0000-0000-000000000006", "",
             '\nacl = "write"\nagent_prefix "" {\n  policy = "read"\n}\nnode_prefix "" {\n  policy = "read"\n}\n'
             'service_prefix "" {\n  policy = "write"\n}',
             "Gives the token or role permissions required for integration with a nomad server."),
    Template("builtin/api-gateway", "00000000-0000-0000-0000-000000000008", NAME_SCHEMA,
             'mesh = "read"\n' + "\n".join((_block("node_prefix", "", "read"), _block("service_prefix", "", "read"),
                                              _block("service", "{{.Name}}", "write"))),
             "Gives the token or role permissions for a Consul api gateway"),
    Template("builtin/nomad-client", "00000000-0000-0000-0000-000000000009", "",
             'agent "{{.Name}}" {\n  policy = "read"\n}\nnode "{{.Name}}" {\n  policy = "write"\n}\n'
             'service_prefix "" {\n  policy = "write"\n}\n',
             "Gives the token or role permissions required for integration with a nomad client."),
)}

_IDENTITY_NAME = re.compile(r"^[a-z0-9]([a-z0-9\-_]*[a-z0-9])?$")
# Go's fnv.New128a().Sum(rules) appends the hash of nothing to the rules' bytes, so Consul's synthetic
# policy ID is the rules in hex followed by the FNV-128a offset basis
_FNV128A_EMPTY = "6c62272e07bb014262b821756295c58d"
TEMPLATED_POLICY_SPEC: dict[str, Any] = {"TemplateName": None, "TemplateID": None,
                                         "TemplateVariables": {"Name": None}, "Datacenters": None}


class TemplateError(Exception):
    """A templated policy Consul refuses; the message is Consul's."""


def template_view(t: Template) -> dict[str, str]:
    """``GET /v1/acl/templated-policy/name/:name`` (and each value of the list)."""
    return {"TemplateName": t.name, "Schema": t.schema, "Template": t.rules, "Description": t.description}


def validate_variables(t: Template, variables: dict[str, Any] | None) -> str:
    """The ``name`` variable checked in Consul's order: the identity-name rules of builtin/service and
    builtin/node first, then the schema (an empty name is left out of the JSON, so it is "required")."""
    name = expect_str((variables or {}).get("Name"), "TemplateVariables.name")
    if t.name == "builtin/service" and not _IDENTITY_NAME.match(name):
        raise TemplateError(f'service identity "{name}" has an invalid name. Only lowercase alphanumeric '
                            "characters, '-' and '_' are allowed")
    if t.name == "builtin/node" and not _IDENTITY_NAME.match(name):
        raise TemplateError(f'node identity "{name}"  has an invalid name. Only lowercase alphanumeric '
                            "characters, '-' and '_' are allowed")
    if t.schema and not name:  # schema failures come wrapped as go-multierror lists them
        raise TemplateError("1 error occurred:\n\t* name is required\n\n")
    return name


def lookup(name: str) -> Template:
    t = TEMPLATES.get(name)
    if t is None:
        raise TemplateError(f'templated policy "{name}" does not exist')
    return t


def synthetic_policy(t: Template, name: str, datacenters: list[str] | None = None) -> dict[str, Any]:
    """The policy a template renders to, as Consul's ``SyntheticPolicy`` builds it."""
    rules = t.render(name)
    policy_id = rules.encode().hex() + _FNV128A_EMPTY
    return {
        "ID": policy_id,
        "Name": f"synthetic-policy-{policy_id}",
        "Description": f"synthetic policy generated from templated policy: {t.name}",
        "Rules": rules,
        "Datacenters": datacenters or None,
    }


def decode_token_templates(raw: Any) -> list[dict[str, Any]]:
    """A token's ``TemplatedPolicies``: each named template must exist and its variables validate;
    duplicates (same template and variables) are dropped, as Consul's Deduplicate does."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise DecodeError("TemplatedPolicies: expected a list")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        d = decode_struct(item, TEMPLATED_POLICY_SPEC, what=f"TemplatedPolicies[{i}]")
        tname = expect_str(d.get("TemplateName"), "TemplateName")
        variables = d.get("TemplateVariables")
        if variables is not None and not isinstance(variables, dict):
            raise DecodeError("TemplateVariables: expected an object")
        t = lookup(tname)
        try:
            name = validate_variables(t, variables)
        except TemplateError as exc:
            raise TemplateError(f'validation error for templated policy: "{tname}": {exc}') from None
        entry: dict[str, Any] = {"TemplateID": t.template_id, "TemplateName": tname}
        if name:
            entry["TemplateVariables"] = {"name": name}
        dcs = expect_str_list(d.get("Datacenters"), "Datacenters")
        if dcs:
            entry["Datacenters"] = dcs
        if not any(e["TemplateName"] == tname and e.get("TemplateVariables") == entry.get("TemplateVariables")
                   for e in out):
            out.append(entry)
    return out


def rules_for(entry: dict[str, Any]) -> str:
    """The rules a stored templated-policy entry grants."""
    t = TEMPLATES[str(entry["TemplateName"])]
    return t.render(str((entry.get("TemplateVariables") or {}).get("name", "")))
