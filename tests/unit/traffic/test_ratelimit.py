"""Rate-limit documents, service-defaults RateLimits and the token buckets, with a fixed clock."""

from __future__ import annotations

import pytest

from sidecar.ratelimit import (
    CallerLimits,
    Limit,
    RateLimiter,
    RateLimitError,
    parse_document,
    parse_instance_level,
    retry_after_header,
)


def test_per_caller_limit_holds_and_other_callers_are_unaffected() -> None:
    doc = parse_document('{"PerCaller": {"RequestsPerSecond": 100, "RequestsMaxBurst": 100},'
                         ' "Callers": {"web": {"RequestsPerSecond": 5, "RequestsMaxBurst": 10}}}')
    limiter = RateLimiter(doc)
    web = [limiter.check("web", "/demo.v1.Greeter/SayHello", 0.0).allowed for _ in range(50)]
    other = [limiter.check("batch", "/demo.v1.Greeter/SayHello", 0.0).allowed for _ in range(50)]
    assert web.count(True) == 10 and all(other)
    v = limiter.check("web", "/x", 0.0)
    assert not v.allowed and v.source == "caller" and v.retry_after == pytest.approx(0.2)
    assert retry_after_header(v.retry_after) == "1"
    assert limiter.check("web", "/x", 0.2).allowed  # one token back after 1/rate seconds
    assert limiter.applies_to("web") and limiter.applies_to("anyone")


def test_callers_only_document_leaves_others_on_the_fast_path() -> None:
    limiter = RateLimiter(parse_document({"Callers": {"web": {"RequestsPerSecond": 1}}}))
    assert limiter.callers.callers["web"] == Limit(1.0, 1.0)  # burst defaults to the rate (at least 1)
    assert limiter.applies_to("web") and not limiter.applies_to("batch")


def test_instance_level_with_route_overrides() -> None:
    inst = parse_instance_level({"InstanceLevel": {"RequestsPerSecond": 2, "RequestsMaxBurst": 2, "Routes": [
        {"PathPrefix": "/demo.v1.Greeter/", "RequestsPerSecond": 1, "RequestsMaxBurst": 1}]}})
    limiter = RateLimiter(instance=inst)
    assert limiter.check("a", "/demo.v1.Greeter/SayHello", 0).allowed
    v = limiter.check("b", "/demo.v1.Greeter/SayHello", 0)
    assert not v.allowed and v.source == "route"
    assert limiter.check("a", "/other", 0).allowed and limiter.check("a", "/other", 0).allowed
    assert limiter.check("a", "/other", 0).source == "instance"


def test_update_keeps_limits_in_force() -> None:
    limiter = RateLimiter(CallerLimits(Limit(1, 1)))
    assert limiter.check("a", "/", 0).allowed and not limiter.check("a", "/", 0).allowed
    limiter.update(CallerLimits(Limit(1, 1)))  # same limits: the buckets stay
    assert not limiter.check("a", "/", 0).allowed
    limiter.update(CallerLimits(Limit(1, 5)))
    assert limiter.check("a", "/", 0).allowed


@pytest.mark.parametrize(("doc", "message"), [
    ("{", "document: not valid JSON"),
    ("[]", "document: expected a JSON object"),
    ("{}", "neither PerCaller nor Callers is set"),
    ('{"PerCaller": {"RequestsPerSecond": 0}}', "document.PerCaller.RequestsPerSecond: expected a number > 0"),
    ('{"PerCaller": {"RequestsPerSecond": 1, "RequestsMaxBurst": 0.5}}',
     "document.PerCaller.RequestsMaxBurst: expected a whole number >= 1"),
    ('{"PerCaller": {"RequestsPerSecond": 1, "Burst": 2}}', "document.PerCaller.Burst: unknown field"),
    ('{"Callers": {"web": 5}}', "document.Callers['web']: expected an object"),
    ('{"Callers": []}', "document.Callers: expected an object"),
    ('{"PerCallers": {}}', "document.PerCallers: unknown field"),
])
def test_bad_documents_name_the_field(doc: str, message: str) -> None:
    with pytest.raises(RateLimitError) as exc:
        parse_document(doc)
    assert message in str(exc.value)


def test_bad_instance_level() -> None:
    with pytest.raises(RateLimitError, match=r"Routes\[0\]: exactly one of PathExact"):
        parse_instance_level({"InstanceLevel": {"Routes": [{"RequestsPerSecond": 1}]}})
    with pytest.raises(RateLimitError, match=r"Routes\[0\].PathRegex: not a valid regular expression"):
        parse_instance_level({"InstanceLevel": {"Routes": [{"PathRegex": "(", "RequestsPerSecond": 1}]}})
