"""Consul's service-defaults settings a sidecar applies (pure).

On the calling service's service-defaults, ``UpstreamConfig`` sets how it calls its upstreams:
``Defaults`` for every upstream, ``Overrides`` (each with the upstream's ``Name``) on top:
``Limits`` (``MaxConnections``, ``MaxPendingRequests``, ``MaxConcurrentRequests``),
``PassiveHealthCheck`` (see ``outlier.py``) and ``ConnectTimeoutMs``. On the called service's
service-defaults, ``LocalRequestTimeoutMs`` bounds a call to the local application, and
``RateLimits.InstanceLevel`` (see ``ratelimit.py``) limits calls into this instance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.outlier import PassiveHealthCheck, PassiveHealthCheckError, parse_passive_health_check
from sidecar.ratelimit import InstanceLimits, RateLimitError, parse_instance_level


class ServiceDefaultsError(ValueError):
    """A service-defaults field that cannot be applied; the message names it."""


@dataclass(frozen=True)
class UpstreamLimits:
    max_connections: int = 0  # 0: unlimited
    max_pending_requests: int = 0
    max_concurrent_requests: int = 0


@dataclass(frozen=True)
class UpstreamSettings:
    limits: UpstreamLimits = UpstreamLimits()
    passive_health_check: PassiveHealthCheck | None = None
    connect_timeout: float = 0.0  # seconds; 0: the chain's


@dataclass(frozen=True)
class LocalSettings:
    request_timeout: float = 0.0  # LocalRequestTimeoutMs, seconds; 0: none
    rate_limits: InstanceLimits = field(default_factory=InstanceLimits)


def _whole(obj: Mapping[str, Any], key: str, where: str) -> int | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ServiceDefaultsError(f"{where}.{key}: expected a whole number >= 0, got {v!r}")
    return v


def _apply(base: UpstreamSettings, raw: Any, where: str) -> UpstreamSettings:
    if raw is None:
        return base
    if not isinstance(raw, Mapping):
        raise ServiceDefaultsError(f"{where}: expected an object")
    limits = base.limits
    lim = raw.get("Limits")
    if lim is not None:
        if not isinstance(lim, Mapping):
            raise ServiceDefaultsError(f"{where}.Limits: expected an object")
        vals = {k: _whole(lim, k, f"{where}.Limits") for k in
                ("MaxConnections", "MaxPendingRequests", "MaxConcurrentRequests")}
        limits = UpstreamLimits(
            max_connections=vals["MaxConnections"] if vals["MaxConnections"] is not None else limits.max_connections,
            max_pending_requests=(vals["MaxPendingRequests"] if vals["MaxPendingRequests"] is not None
                                  else limits.max_pending_requests),
            max_concurrent_requests=(vals["MaxConcurrentRequests"] if vals["MaxConcurrentRequests"] is not None
                                     else limits.max_concurrent_requests))
    phc = base.passive_health_check
    if raw.get("PassiveHealthCheck") is not None:
        try:
            phc = parse_passive_health_check(raw["PassiveHealthCheck"], f"{where}.PassiveHealthCheck")
        except PassiveHealthCheckError as exc:
            raise ServiceDefaultsError(str(exc)) from None
    ct = _whole(raw, "ConnectTimeoutMs", where)
    return UpstreamSettings(limits=limits, passive_health_check=phc,
                            connect_timeout=ct / 1000 if ct else base.connect_timeout)


def upstream_settings(service_defaults: Mapping[str, Any] | None, upstream: str) -> UpstreamSettings:
    """What the caller's service-defaults say about calls to ``upstream``."""
    cfg = (service_defaults or {}).get("UpstreamConfig")
    if not cfg:
        return UpstreamSettings()
    if not isinstance(cfg, Mapping):
        raise ServiceDefaultsError("UpstreamConfig: expected an object")
    out = _apply(UpstreamSettings(), cfg.get("Defaults"), "UpstreamConfig.Defaults")
    overrides = cfg.get("Overrides") or []
    if not isinstance(overrides, list):
        raise ServiceDefaultsError("UpstreamConfig.Overrides: expected a list")
    for i, o in enumerate(overrides):
        if isinstance(o, Mapping) and o.get("Name") == upstream and not o.get("Peer"):
            out = _apply(out, o, f"UpstreamConfig.Overrides[{i}]")
    return out


def local_settings(service_defaults: Mapping[str, Any] | None) -> LocalSettings:
    sd = service_defaults or {}
    ms = _whole(sd, "LocalRequestTimeoutMs", "service-defaults")
    try:
        limits = parse_instance_level(sd.get("RateLimits"))
    except RateLimitError as exc:
        raise ServiceDefaultsError(str(exc)) from None
    return LocalSettings(request_timeout=(ms or 0) / 1000, rate_limits=limits)
