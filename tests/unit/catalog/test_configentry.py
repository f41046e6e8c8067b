"""Config entry files in HCL (Consul's HCL 1 forms from its docs) and JSON, with plain text."""

from __future__ import annotations

import pytest

from catalog.configentry import ConfigEntryFileError, hcl1_blocks_as_attributes, kind_and_name, parse

ROUTER_HCL = '''
Kind = "service-router"
Name = "web"
# a comment with a brace {
routes = [
  {
    match {
      http {
        path_prefix = "/admin"
        header = [ { name = "x-debug", exact = "1" } ]
      }
    }
    destination {
      service                  = "admin"
      prefix_rewrite           = "/"
      num_retries              = 5
      retry_on_connect_failure = true
      retry_on_status_codes    = [401, 409]
    }
  },
  {
    match { http { methods = ["GET"] } }
  },
]
'''

RESOLVER_HCL = '''
kind            = "service-resolver"
name            = "web"
default_subset  = "v1"
connect_timeout = "15s"
subsets = {
  "v1" = { filter = "Service.Meta.version == v1" }
  v2   = { filter = "Service.Meta.version == v2", only_passing = true }
}
failover = { "*" = { datacenters = ["dc3", "dc4"] } }
load_balancer {
  policy = "ring_hash"
  hash_policies = [ { field = "header", field_value = "x-user" } ]
}
meta { owner_team = "payments" }
'''


def test_hcl1_nested_blocks_become_objects() -> None:
    entry = parse(ROUTER_HCL, source="router.hcl")
    assert kind_and_name(entry) == ("service-router", "web")
    first, second = entry["routes"]
    assert first["match"] == {"http": {"path_prefix": "/admin", "header": [{"name": "x-debug", "exact": "1"}]}}
    assert first["destination"]["retry_on_status_codes"] == [401, 409]
    assert first["destination"]["retry_on_connect_failure"] is True
    assert second == {"match": {"http": {"methods": ["GET"]}}}


def test_blocks_collapse_and_user_maps_keep_their_keys() -> None:
    entry = parse(RESOLVER_HCL, source="resolver.hcl")
    assert entry["subsets"] == {"v1": {"filter": "Service.Meta.version == v1"},
                                "v2": {"filter": "Service.Meta.version == v2", "only_passing": True}}
    assert entry["failover"] == {"*": {"datacenters": ["dc3", "dc4"]}}
    assert entry["load_balancer"] == {"policy": "ring_hash",
                                      "hash_policies": [{"field": "header", "field_value": "x-user"}]}
    assert entry["meta"] == {"owner_team": "payments"}


def test_json_and_fixed_names() -> None:
    assert parse('{"Kind": "mesh"}') == {"Kind": "mesh"}
    assert kind_and_name({"kind": "mesh"}) == ("mesh", "mesh")
    assert kind_and_name({"Kind": "proxy-defaults"}) == ("proxy-defaults", "global")


def test_strings_and_comments_are_not_rewritten() -> None:
    text = 'a = [ { b = "c {" } ] // x {\n/* d { */'
    assert hcl1_blocks_as_attributes(text) == text


@pytest.mark.parametrize(("text", "source", "message"), [
    ('{"Name": "x"}', "e.json", "e.json: Payload does not contain a kind/Kind key at the top level"),
    ('{"Kind": 3}', "e.json", "Kind: must be a non-empty string"),
    ('{"Kind": "service-defaults", "Name": ["x"]}', "e.json", "Name: must be a string"),
    ("{nope", "e.json", "e.json: invalid JSON at line 1 column 2"),
    ('kind = "service-resolver"\nname = ', "e.hcl", "e.hcl: invalid HCL"),
    ("[1]", "e.json", "expected an object with Kind and Name"),
    ('kind = "service-resolver"\nname = "w"\nredirect { service = "a" }\nredirect { service = "b" }\n', "e.hcl",
     "redirect: given 2 times; expected one block"),
])
def test_bad_files_name_what_is_wrong(text: str, source: str, message: str) -> None:
    with pytest.raises(ConfigEntryFileError) as exc:
        parse(text, source=source)
    assert message in str(exc.value)
