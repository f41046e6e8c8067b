"""``/v1/operator/keyring``: gossip encryption keys. The dev agent gossips with no one and has no
gossip encryption, so, as a Consul agent started without ``-encrypt``, every operation (list, install,
use, remove) is answered 500 with each pool's refusal. The request is still checked as Consul checks
it first (body, ``?relay-factor``, ``?local-only``, ``keyring:read``/``keyring:write``)."""

from __future__ import annotations

from aiohttp import web

from devagent import operator
from devagent.agent import Agent
from devagent.codec import DecodeError, decode_struct, expect_str
from devagent.http import Endpoint, HTTPError, Req

MAX_RELAY_FACTOR = 5  # Consul's ParseRelayFactor bound
GO_TRUE = ("1", "t", "T", "TRUE", "true", "True")  # what Go's strconv.ParseBool accepts
GO_FALSE = ("0", "f", "F", "FALSE", "false", "False")


def routes(agent: Agent) -> list[Endpoint]:
    return [Endpoint("/v1/operator/keyring", {m: keyring for m in ("GET", "POST", "PUT", "DELETE")})]


async def keyring(r: Req) -> web.StreamResponse:
    if r.method != "GET":
        body = await r.json(required=True)
        try:
            expect_str(decode_struct(body, {"Key": None}, what="keyring request").get("Key"), "Key")
        except DecodeError as exc:
            raise HTTPError(400, f"Request decode failed: {exc}") from None
    relay = r.param("relay-factor")
    if relay:
        try:
            factor = int(relay)
        except ValueError:
            raise HTTPError(400, f'Error parsing relay factor: strconv.Atoi: parsing "{relay}": invalid syntax') \
                from None
        if not 0 <= factor <= MAX_RELAY_FACTOR:
            raise HTTPError(400, f"Invalid relay-factor: Relay factor must be in range: [0, {MAX_RELAY_FACTOR}]")
    local_only = r.param("local-only")
    local = local_only in GO_TRUE
    if local_only:
        if local_only not in GO_TRUE + GO_FALSE:
            raise HTTPError(400, f'Error parsing local-only: strconv.ParseBool: parsing "{local_only}": '
                                 "invalid syntax")
        if r.method != "GET" and local:
            raise HTTPError(400, "Invalid use of local-only: local-only can only be set for list requests")
    r.authz.check("keyring:read" if r.method == "GET" else "keyring:write")
    message = operator.KEYRING_LIST_DISABLED if r.method == "GET" else operator.KEYRING_MODIFY_DISABLED
    raise HTTPError(500, operator.keyring_failure(r.agent.node_name, r.agent.datacenter, message, wan=not local))
