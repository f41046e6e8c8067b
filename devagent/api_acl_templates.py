"""``/v1/acl/templated-policies``, ``/v1/acl/templated-policy/name/:name`` and
``/v1/acl/templated-policy/preview/:name``: Consul's builtin templated policies, listed, read and
rendered to the synthetic policy a token or role holding them is granted (``acl:read``)."""

from __future__ import annotations

from aiohttp import web

from devagent import aclstore, acltemplates
from devagent.agent import Agent
from devagent.codec import DecodeError, decode_struct
from devagent.http import ACLDisabled, Endpoint, HTTPError, Req, json_response


def routes(agent: Agent) -> list[Endpoint]:
    return [
        Endpoint("/v1/acl/templated-policies", {"GET": list_templates}),
        Endpoint("/v1/acl/templated-policy/name/{name:.*}", {"GET": read_template}),
        Endpoint("/v1/acl/templated-policy/preview/{name:.*}", {"POST": preview_template}),
    ]


def _begin(r: Req) -> None:
    if not r.agent.config.acl_enabled:
        raise ACLDisabled()
    r.check_dc()


async def list_templates(r: Req) -> web.StreamResponse:
    _begin(r)
    r.authz.check("acl:read")
    return json_response(r, {name: acltemplates.template_view(t) for name, t in sorted(acltemplates.TEMPLATES.items())})


def _template(r: Req) -> acltemplates.Template:
    name = r.match("name")
    if not name:
        raise HTTPError(400, "Missing templated policy Name")
    r.authz.check("acl:read")
    t = acltemplates.TEMPLATES.get(name)
    if t is None:
        raise HTTPError(400, f"Invalid templated policy Name: {name}")
    return t


async def read_template(r: Req) -> web.StreamResponse:
    _begin(r)
    return json_response(r, acltemplates.template_view(_template(r)))


async def preview_template(r: Req) -> web.StreamResponse:
    _begin(r)
    t = _template(r)
    body = await r.json(failed="Failed to decode request body")
    try:
        variables = decode_struct(body, {"Name": None}, what="templated policy variables") if body else None
        name = acltemplates.validate_variables(t, variables)
    except DecodeError as exc:
        raise HTTPError(400, f"Failed to decode request body: {exc}") from None
    except acltemplates.TemplateError as exc:
        raise HTTPError(400, f'validation error for templated policy: "{t.name}": {exc}') from None
    policy = acltemplates.synthetic_policy(t, name)
    policy["Hash"] = aclstore.content_hash({"name": policy["Name"], "description": policy["Description"],
                                            "rules": policy["Rules"], "dcs": policy["Datacenters"]})
    policy["CreateIndex"] = 0
    policy["ModifyIndex"] = 0
    return json_response(r, policy)
