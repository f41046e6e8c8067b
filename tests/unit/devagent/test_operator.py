"""The pure logic behind the operator endpoints and ACL templated policies (plain values, no I/O)."""

from __future__ import annotations

import pytest

from devagent import acltemplates, operator
from devagent.codec import DecodeError, uuid_index_error


def test_autopilot_put_decodes_onto_the_defaults() -> None:
    conf = operator.decode_autopilot({"cleanup_dead_servers": False, "LastContactThreshold": "1s",
                                      "ServerStabilizationTime": 5_000_000_000})
    assert conf["CleanupDeadServers"] is False and conf["LastContactThreshold"] == 1_000_000_000
    assert conf["ServerStabilizationTime"] == 5_000_000_000 and conf["MaxTrailingLogs"] == 250
    assert operator.decode_autopilot({}) == operator.AUTOPILOT_DEFAULTS
    assert operator.decode_autopilot({"Nope": 1}) == operator.AUTOPILOT_DEFAULTS  # Go's decoder ignores it
    view = operator.autopilot_view({**conf, "CreateIndex": 3, "ModifyIndex": 9})
    assert view["LastContactThreshold"] == "1s" and view["ServerStabilizationTime"] == "5s"
    for bad in ({"MaxTrailingLogs": -1}, {"MinQuorum": "2"}, {"LastContactThreshold": "x"},
                {"CleanupDeadServers": "yes"}, []):
        with pytest.raises(DecodeError):
            operator.decode_autopilot(bad)


def test_raft_refusals_on_one_server() -> None:
    kw = {"server_id": "id-1", "server_addr": "127.0.0.1:8300"}
    assert operator.remove_peer_error(**kw, by_id=None, by_address="10.0.0.1:8300") == \
        'address "10.0.0.1:8300" was not found in the Raft configuration'
    assert operator.remove_peer_error(**kw, by_id="id-2", by_address=None) == \
        'id "id-2" was not found in the Raft configuration'
    assert operator.remove_peer_error(**kw, by_id="id-1", by_address=None) == \
        "need at least one voter in configuration"
    assert operator.remove_peer_error(**kw, by_id=None, by_address="127.0.0.1:8300") == \
        "need at least one voter in configuration"
    assert operator.transfer_leader_error(server_id="id-1", target="") == "cannot find peer"
    assert operator.transfer_leader_error(server_id="id-1", target="id-1") == "cannot transfer leadership to itself"


def test_keyring_failure_text_is_go_multierror() -> None:
    text = operator.keyring_failure("node-a", "dc7", operator.KEYRING_LIST_DISABLED)
    assert text == ("4 errors occurred:\n"
                    "\t* WAN error: 1/1 nodes reported failure\n"
                    "\t* node-a.dc7: Keyring is empty (encryption not enabled)\n"
                    "\t* dc7 (LAN) error: 1/1 nodes reported failure\n"
                    "\t* node-a: Keyring is empty (encryption not enabled)\n\n")
    local = operator.keyring_failure("node-a", "dc7", operator.KEYRING_LIST_DISABLED, wan=False)
    assert local.startswith("2 errors occurred:\n\t* dc7 (LAN) error") and "WAN" not in local


def test_service_usage_counts() -> None:
    rows = [
        {"Service": "consul"}, {"Service": "web"}, {"Service": "web"},
        {"Service": "web-sidecar-proxy", "Kind": "connect-proxy"},
        {"Service": "native", "Connect": {"Native": True}},
        {"Service": "gw", "Kind": "mesh-gateway"},
    ]
    usage = operator.service_usage(rows, 2)
    assert usage["Services"] == 5 and usage["ServiceInstances"] == 6 and usage["Nodes"] == 2
    assert usage["BillableServiceInstances"] == 3  # web twice and native; not consul, proxies or gateways
    assert usage["ConnectServiceInstances"] == {"api-gateway": 0, "connect-native": 1, "connect-proxy": 1,
                                                "ingress-gateway": 0, "mesh-gateway": 1, "terminating-gateway": 0}


def test_uuid_index_error() -> None:
    assert uuid_index_error("00000000-DEAD-BEEF-0000-000000000000") is None
    assert uuid_index_error("unknown") == "index error: UUID must be 36 characters"
    assert uuid_index_error("0000000000000-0000-0000-000000000000") == "index error: UUID improperly formatted"
    assert uuid_index_error("g0000000-0000-0000-0000-000000000000") == \
        "index error: encoding/hex: invalid byte: U+0067 'g'"


def test_templated_policy_synthesis() -> None:
    t = acltemplates.TEMPLATES["builtin/service"]
    policy = acltemplates.synthetic_policy(t, "api")
    assert policy["Rules"] == ('\nservice "api" {\n\tpolicy = "write"\n}\nservice "api-sidecar-proxy" {\n'
                               '\tpolicy = "write"\n}\nservice_prefix "" {\n\tpolicy = "read"\n}\n'
                               'node_prefix "" {\n\tpolicy = "read"\n}')
    # Consul's ID: the rules' bytes in hex, then the FNV-128a hash of nothing (its Sum(b) appends)
    assert policy["ID"] == policy["Rules"].encode().hex() + "6c62272e07bb014262b821756295c58d"
    assert policy["Name"] == "synthetic-policy-" + policy["ID"]


def test_templated_policy_validation() -> None:
    svc = acltemplates.TEMPLATES["builtin/service"]
    assert acltemplates.validate_variables(svc, {"Name": "web"}) == "web"
    with pytest.raises(acltemplates.TemplateError, match="has an invalid name"):
        acltemplates.validate_variables(svc, {"Name": "Web"})
    with pytest.raises(acltemplates.TemplateError, match="name is required"):
        acltemplates.validate_variables(acltemplates.TEMPLATES["builtin/api-gateway"], None)
    assert acltemplates.validate_variables(acltemplates.TEMPLATES["builtin/dns"], None) == ""
    entries = acltemplates.decode_token_templates([
        {"TemplateName": "builtin/dns"}, {"TemplateName": "builtin/dns"},
        {"TemplateName": "builtin/node", "TemplateVariables": {"name": "n1"}, "Datacenters": ["dc1"]},
        {"TemplateName": "builtin/node", "TemplateVariables": {"Name": "n2"}},
    ])
    assert entries == [
        {"TemplateID": "00000000-0000-0000-0000-000000000005", "TemplateName": "builtin/dns"},
        {"TemplateID": "00000000-0000-0000-0000-000000000004", "TemplateName": "builtin/node",
         "TemplateVariables": {"name": "n1"}, "Datacenters": ["dc1"]},
        {"TemplateID": "00000000-0000-0000-0000-000000000004", "TemplateName": "builtin/node",
         "TemplateVariables": {"name": "n2"}},
    ]
    assert 'node "n1"' in acltemplates.rules_for(entries[1])
    with pytest.raises(acltemplates.TemplateError, match='templated policy "builtin/x" does not exist'):
        acltemplates.decode_token_templates([{"TemplateName": "builtin/x"}])
    with pytest.raises(DecodeError):
        acltemplates.decode_token_templates({"TemplateName": "builtin/dns"})
