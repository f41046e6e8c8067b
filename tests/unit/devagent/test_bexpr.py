"""bexpr: Consul's filter expression language over JSON-shaped values."""

from __future__ import annotations

from typing import Any

import pytest

from devagent import bexpr

ENTRY: dict[str, Any] = {
    "Node": {"Node": "n1", "Meta": {"zone": "a"}},
    "Service": {"ID": "web-1", "Service": "web", "Tags": ["v1", "primary"], "Port": 8080,
                "Meta": {"version": "2", "my-key": "x"}, "EnableTagOverride": False, "Kind": "connect-proxy",
                "Proxy": {"DestinationServiceName": "api"}},
    "Checks": [{"CheckID": "serfHealth", "Status": "passing"}, {"CheckID": "c", "Status": "warning"}],
}


@pytest.mark.parametrize(("expr", "want"), [
    ('Service.Meta.version == "2"', True),
    ("Service.Meta.version == 2", True),
    ("Service.Meta.version != 2", False),
    ("Service.Port == 8080", True),
    ("Service.Port == 8081", False),
    ("v1 in Service.Tags", True),
    ('"v3" in Service.Tags', False),
    ('"v3" not in Service.Tags', True),
    ("Service.Tags contains primary", True),
    ("Service.Tags not contains primary", False),
    ("Service.Tags is empty", False),
    ("Service.Tags is not empty", True),
    ("Service.Meta is not empty", True),
    ("Service.Address is empty", True),
    ("version in Service.Meta", True),
    ('Service.Meta["my-key"] == x', True),
    ('Service.ID matches "^web-[0-9]+$"', True),
    ('Service.ID not matches "^api"', True),
    ("Service.EnableTagOverride == false", True),
    ("Checks.Status == warning", True),
    ("Checks.Status == critical", False),
    ("Checks.Status != critical", True),
    ("Service.Proxy.DestinationServiceName == api and Service.Kind == connect-proxy", True),
    ("Service.Port == 1 or Node.Meta.zone == a", True),
    ("not Service.Port == 8080", False),
    ("not (Service.Port == 1 or Service.Port == 2) and Node.Node == n1", True),
    ("Service.Missing == x", False),
])
def test_expressions(expr: str, want: bool) -> None:
    assert bexpr.compile(expr)(ENTRY) is want


@pytest.mark.parametrize("expr", ["", "Service.Port ==", "(Service.Port == 1", "and", "== x",
                                  "Service.Tags contains", "Service.Port is full", "a == b c == d",
                                  'Service.ID matches "("'])
def test_bad_expressions_raise(expr: str) -> None:
    with pytest.raises(bexpr.FilterError):
        bexpr.compile(expr)


def test_empty_filter_means_no_filtering() -> None:
    assert bexpr.check("") is None
    pred = bexpr.check("Service.Port == 8080")
    assert pred is not None and pred(ENTRY)
