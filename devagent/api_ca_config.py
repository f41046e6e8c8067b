"""``/v1/connect/ca/configuration`` GET and PUT: the Weft CA reported as the Connect CA provider.

The Weft CA (``weft ca serve``) is not part of the dev agent: it keeps its state in KV
(``weft/ca/roots``: the trust bundle; ``weft/ca/state``: its keys, sealed; ``weft/ca/cluster-id``;
``weft/ca/leader``: the active replica's lock). GET answers Consul's CAConfiguration shape with
``Provider: "weft"``, the stored ``Config``, and a ``State`` read from those keys (the bundle's
active root and trust domain, how the state is sealed, the cluster id, whether a replica holds
the lock). The JSON is read straight from KV: the dev agent imports nothing of the mesh.

PUT keeps ``Config`` (checked as Consul checks the common provider settings) for the same provider
and refuses another provider: switching the dev agent to Consul's built-in CA, Vault or AWS is not
something it can do. The CA takes its own settings from its flags (``--leaf-ttl``), not from here.
ACLs: ``operator:read`` to read, ``operator:write`` to write, as Consul.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from devagent.agent import Agent
from devagent.api_connect import roots_from_kv
from devagent.codec import HOUR, DecodeError, decode_struct, duration_value, expect_bool, expect_str, unb64
from devagent.http import Endpoint, HTTPError, Req, json_response, meta_headers
from devagent.state import Row, Store

PROVIDER = "weft"
TABLE = "connect_ca_config"
ROW_KEY = "config"
KEY_STATE = "weft/ca/state"
KEY_CLUSTER_ID = "weft/ca/cluster-id"
KEY_LEADER = "weft/ca/leader"
DEFAULT_CONFIG: dict[str, Any] = {"LeafCertTTL": "72h", "IntermediateCertTTL": "8760h", "RootCertTTL": "87600h",
                                  "RotationPeriod": "2160h", "PrivateKeyType": "ec", "PrivateKeyBits": 256}
BODY_SPEC: dict[str, Any] = {"Provider": None, "Config": None, "State": None, "ForceWithoutCrossSigning": None,
                             "CreateIndex": None, "ModifyIndex": None}
PROVIDER_REFUSED = ('the dev agent\'s CA provider is "weft" (the Weft CA, weft ca serve); it cannot be switched '
                    'to "{provider}": run Consul itself to use another CA provider')


def setup(agent: Agent) -> None:
    agent.store.define_table(TABLE)


def routes(agent: Agent) -> list[Endpoint]:
    return [Endpoint("/v1/connect/ca/configuration", {"GET": get, "PUT": put})]


def _kv_json(store: Store, key: str) -> Any:
    row = store.get("kvs", key)
    if row is None or not row.get("Value"):
        return None
    try:
        return json.loads(unb64(row["Value"]))
    except (ValueError, DecodeError):
        return None


def _kv_text(store: Store, key: str) -> str:
    row = store.get("kvs", key)
    if row is None or not row.get("Value"):
        return ""
    try:
        return unb64(row["Value"]).decode(errors="replace").strip()
    except DecodeError:
        return ""


def ca_state(store: Store) -> dict[str, str]:
    """What the KV keys the Weft CA writes say about it (strings only: Consul's State is a string map)."""
    roots = roots_from_kv(store.get("kvs", "weft/ca/roots"))
    envelope = _kv_json(store, KEY_STATE)
    leader = store.get("kvs", KEY_LEADER)
    state = {
        "ActiveRootID": str(roots.get("ActiveRootID") or ""),
        "TrustDomain": str(roots.get("TrustDomain") or ""),
        "Roots": str(len(roots.get("Roots") or [])),
        "ClusterID": _kv_text(store, KEY_CLUSTER_ID),
        "StateStored": "true" if envelope is not None else "false",
        "LeaderLockHeld": "true" if leader is not None and leader.get("Session") else "false",
    }
    if isinstance(envelope, dict):
        state["StateSealedWith"] = str(envelope.get("alg", ""))
        state["StateKEKFingerprint"] = str(envelope.get("kek", ""))
    return state


def _row(store: Store) -> Row:
    row = store.get(TABLE, ROW_KEY)
    return row if row is not None else {"Config": DEFAULT_CONFIG, "ForceWithoutCrossSigning": False,
                                        "CreateIndex": 0, "ModifyIndex": 0}


async def get(r: Req) -> web.StreamResponse:
    r.check_dc()
    r.authz.check("operator:read")
    store = r.agent.store
    row = _row(store)
    body = {"Provider": PROVIDER, "Config": row["Config"], "State": ca_state(store),
            "ForceWithoutCrossSigning": row["ForceWithoutCrossSigning"],
            "CreateIndex": row["CreateIndex"], "ModifyIndex": row["ModifyIndex"]}
    index = max(row["ModifyIndex"], store.topic_index(("kvs", "weft/ca/roots")), 1)
    return json_response(r, body, headers=meta_headers(r, index))


def check_config(config: dict[str, Any]) -> None:
    """Consul's CommonCAProviderConfig checks (its messages; Consul answers them with 500)."""
    def ttl(name: str) -> int:
        value = config.get(name)
        if value is None:
            return 0
        try:
            return duration_value(value, what=name)
        except DecodeError as exc:
            raise HTTPError(500, f"error parsing CA config: {exc}") from None

    leaf = ttl("LeafCertTTL")
    if leaf and leaf < HOUR:
        raise HTTPError(500, "LeafCertTTL must be at least 1h")
    if leaf > 8760 * HOUR:
        raise HTTPError(500, "LeafCertTTL must be less than 8760h")
    inter = ttl("IntermediateCertTTL")
    if inter and inter < HOUR:
        raise HTTPError(500, "IntermediateCertTTL must be at least 1h")
    if inter and leaf and inter < 3 * leaf:
        raise HTTPError(500, "Intermediate Cert TTL must be greater or equal than 3x of the Leaf Cert TTL")
    root = ttl("RootCertTTL")
    if root and root < HOUR:
        raise HTTPError(500, "RootCertTTL must be at least 1h")
    kind = config.get("PrivateKeyType")
    if kind is not None and kind not in ("ec", "rsa"):
        raise HTTPError(500, f"invalid private key type {kind!r}".replace("'", '"'))


async def put(r: Req) -> web.StreamResponse:
    r.check_dc()
    r.authz.check("operator:write")
    raw = await r.json(required=True)
    try:
        body = decode_struct(raw, BODY_SPEC, what="CAConfiguration")
        provider = expect_str(body.get("Provider"), "Provider")
        force = expect_bool(body.get("ForceWithoutCrossSigning"), "ForceWithoutCrossSigning")
    except DecodeError as exc:
        raise HTTPError(400, f"Request decode failed: {exc}") from None
    config = body.get("Config")
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise HTTPError(400, "Request decode failed: Config: expected an object")
    if provider != PROVIDER:
        raise HTTPError(400, PROVIDER_REFUSED.format(provider=provider))
    check_config(config)
    with r.agent.store.write() as tx:
        old = tx.get(TABLE, ROW_KEY)
        tx.put(TABLE, ROW_KEY, {"Config": {**DEFAULT_CONFIG, **config}, "ForceWithoutCrossSigning": force,
                                "CreateIndex": old["CreateIndex"] if old else tx.index, "ModifyIndex": tx.index})
    return web.Response(status=200)  # Consul answers an empty 200
