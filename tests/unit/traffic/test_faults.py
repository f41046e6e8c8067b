"""Fault documents and fault decisions with a seeded random source."""

from __future__ import annotations

import random

import pytest

from sidecar.faults import NO_FAULT, FaultError, decide, parse_document


def test_abort_and_delay_shares() -> None:
    doc = parse_document('{"Delay": {"Percent": 20, "Duration": "200ms"}, "Abort": {"Percent": 30, "GrpcStatus": 14}}')
    rng = random.Random(5)
    faults = [decide(doc, "web", "/demo.v1.Greeter/SayHello", rng) for _ in range(10_000)]
    aborted = sum(f.abort for f in faults) / 10_000
    delayed = sum(f.delay == 0.2 for f in faults) / 10_000
    assert abs(aborted - 0.30) < 0.02 and abs(delayed - 0.20) < 0.02
    assert {f.grpc_status for f in faults if f.abort} == {14} and {f.http_status for f in faults if f.abort} == {503}


def test_sources_and_methods_narrow_it() -> None:
    doc = parse_document({"Abort": {"Percent": 100, "HttpStatus": 500}, "Sources": ["web"],
                          "Methods": ["/demo.v1.Greeter/SayHello", "/api/"]})
    rng = random.Random(1)
    assert decide(doc, "web", "/demo.v1.Greeter/SayHello", rng).abort
    assert decide(doc, "web", "/api/users?x=1", rng).http_status == 500
    assert decide(doc, "batch", "/demo.v1.Greeter/SayHello", rng) is NO_FAULT
    assert decide(doc, "web", "/demo.v1.Greeter/SayHelloAgain", rng) is NO_FAULT
    assert decide(None, "web", "/", rng) is NO_FAULT


@pytest.mark.parametrize(("doc", "message"), [
    ("{}", "neither Delay nor Abort is set"),
    ('{"Delay": {"Percent": 101, "Duration": "1s"}}', "document.Delay.Percent: expected a number from 0 to 100"),
    ('{"Delay": {"Percent": 10}}', "document.Delay.Duration: expected a duration"),
    ('{"Delay": {"Percent": 10, "Duration": "soon"}}', "document.Delay.Duration: invalid duration"),
    ('{"Delay": {"Percent": 10, "Duration": "2m"}}', "document.Delay.Duration: must be more than 0 and at most 60s"),
    ('{"Abort": {"Percent": 5, "GrpcStatus": 0}}', "document.Abort.GrpcStatus: expected a gRPC status code"),
    ('{"Abort": {"Percent": 5, "HttpStatus": 99}}', "document.Abort.HttpStatus: expected an HTTP status"),
    ('{"Abort": {"Percent": 5}, "Methods": ["SayHello"]}', "document.Methods[0]: must start with '/'"),
    ('{"Abort": {"Percent": 5}, "Sources": "web"}', "document.Sources: expected a list of non-empty strings"),
    ('{"Abort": {"Percent": 5}, "Extra": 1}', "document.Extra: unknown field"),
    ("not json", "document: not valid JSON"),
])
def test_bad_documents_name_the_field(doc: str, message: str) -> None:
    with pytest.raises(FaultError) as exc:
        parse_document(doc)
    assert message in str(exc.value)
