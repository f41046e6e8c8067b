"""The CA provider interface, its configuration and the trust bundle (no I/O).

A provider holds the CA's key material and turns validated CSRs into leaves. The built-in provider
(``ca.builtin``) is what Weft ships; an external CA (Vault, a cloud PCA) can be added later by
implementing :class:`Provider`. The gRPC service, the store and the CLI only talk to this interface.

The life of a provider:

- ``configure(config, trust_domain, state, now)``: load ``state`` (as returned by ``state()`` and
  kept encrypted in Consul KV by ``ca.store``), or with ``state=None`` generate a root and an
  intermediate;
- ``sign(request, ttl, now)``: sign a leaf from an already validated CSR (``ca.csr``);
- ``rotate(now)``: make a new active root; the old root cross-signs it, and new leaves' chains carry
  that cross-signed certificate so that peers still trusting only the old root accept them;
- ``maintain(now)``: drop retired roots once every leaf they signed has expired, renew an
  intermediate near its end; returns whether anything changed (the caller then persists and
  publishes);
- ``bundle(index)``: the trust bundle, in the shape of Consul's ``/v1/connect/ca/roots``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from ca.identity import SpiffeId

DAY = timedelta(days=1)
DEFAULT_ROOT_TTL = 3650 * DAY
DEFAULT_INTERMEDIATE_TTL = 365 * DAY
DEFAULT_LEAF_TTL = timedelta(hours=72)
MIN_LEAF_TTL = timedelta(seconds=2)  # for tests; production leaves live hours to days
DEFAULT_MAX_LEAF_TTL = timedelta(days=7)
MAX_CLOCK_SKEW = timedelta(minutes=1)


class CAError(Exception):
    """Base class of the CA's errors; the message is safe to send to the caller."""


class InvalidRequest(CAError):
    """The request itself is wrong (garbage CSR, wrong key type, bad SAN, bad TTL): INVALID_ARGUMENT."""


class NotAuthorized(CAError):
    """The caller may not have the identity it asks for: PERMISSION_DENIED."""


@dataclass(frozen=True, slots=True)
class CAConfig:
    """How the CA issues. Durations are ``timedelta``; all are configurable from the CLI."""

    root_ttl: timedelta = DEFAULT_ROOT_TTL
    intermediate_ttl: timedelta = DEFAULT_INTERMEDIATE_TTL
    leaf_ttl: timedelta = DEFAULT_LEAF_TTL
    max_leaf_ttl: timedelta = DEFAULT_MAX_LEAF_TTL
    min_leaf_ttl: timedelta = MIN_LEAF_TTL
    # tolerated clock difference between hosts: certificates are back-dated by up to this much, and a
    # retired root stays this much longer than its last leaf
    clock_skew: timedelta = MAX_CLOCK_SKEW

    def __post_init__(self) -> None:
        if self.min_leaf_ttl < MIN_LEAF_TTL:
            raise ValueError(f"minimum leaf TTL cannot be below {MIN_LEAF_TTL}")
        if not self.min_leaf_ttl <= self.leaf_ttl <= self.max_leaf_ttl:
            raise ValueError(
                f"leaf TTL {self.leaf_ttl} must lie between {self.min_leaf_ttl} and {self.max_leaf_ttl}"
            )
        if self.intermediate_ttl <= self.max_leaf_ttl:
            raise ValueError("intermediate TTL must be longer than the maximum leaf TTL")
        if self.root_ttl < self.intermediate_ttl:
            raise ValueError("root TTL must not be shorter than the intermediate TTL")
        if self.clock_skew < timedelta(0):
            raise ValueError("clock skew must not be negative")


@dataclass(frozen=True, slots=True)
class SignRequest:
    """A CSR that ``ca.csr.parse_csr`` has checked: its identity and its P-256 public key (DER)."""

    identity: SpiffeId
    csr_pem: bytes  # the request as received (PEM or DER)
    public_key_der: bytes
    public_key: Any = field(default=None, compare=False)  # the parsed key, to spare the provider a re-parse


@dataclass(frozen=True, slots=True)
class SignedLeaf:
    identity: SpiffeId
    cert_pem: str
    chain_pem: tuple[str, ...]  # intermediate first, then any cross-signed certificates
    serial: int
    not_before: datetime
    not_after: datetime
    root_id: str


@dataclass(frozen=True, slots=True)
class RootInfo:
    """One root of the bundle, with the fields Consul's ``/v1/connect/ca/roots`` has."""

    id: str
    name: str
    serial_number: int
    signing_key_id: str
    not_before: datetime
    not_after: datetime
    root_cert: str
    intermediate_certs: tuple[str, ...]
    active: bool
    private_key_type: str = "ec"
    private_key_bits: int = 256
    create_index: int = 0
    modify_index: int = 0


def _rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_rfc3339(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).astimezone(UTC)


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """The roots every peer trusts; serialised exactly like Consul's ``/v1/connect/ca/roots``."""

    trust_domain: str
    active_root_id: str
    roots: tuple[RootInfo, ...]
    index: int = 0
    cluster_id: str = field(default="")

    @property
    def roots_pem(self) -> str:
        """Every root certificate, concatenated: what a peer loads as its CA file."""
        return "".join(r.root_cert if r.root_cert.endswith("\n") else r.root_cert + "\n" for r in self.roots)

    @property
    def root_ids(self) -> tuple[str, ...]:
        return tuple(r.id for r in self.roots)

    def to_consul(self) -> dict[str, Any]:
        return {
            "ActiveRootID": self.active_root_id,
            "TrustDomain": self.trust_domain,
            "Roots": [
                {
                    "ID": r.id,
                    "Name": r.name,
                    "SerialNumber": r.serial_number,
                    "SigningKeyID": r.signing_key_id,
                    "ExternalTrustDomain": self.cluster_id,
                    "NotBefore": _rfc3339(r.not_before),
                    "NotAfter": _rfc3339(r.not_after),
                    "RootCert": r.root_cert,
                    "IntermediateCerts": list(r.intermediate_certs),
                    "Active": r.active,
                    "PrivateKeyType": r.private_key_type,
                    "PrivateKeyBits": r.private_key_bits,
                    "CreateIndex": r.create_index,
                    "ModifyIndex": r.modify_index,
                }
                for r in self.roots
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_consul(), indent=2, sort_keys=False)

    @classmethod
    def from_consul(cls, doc: Any, index: int = 0) -> TrustBundle:
        """Parse the Consul roots shape; raises ValueError naming the missing or malformed field."""
        if not isinstance(doc, dict):
            raise ValueError("trust bundle must be a JSON object")
        try:
            roots = tuple(
                RootInfo(
                    id=str(r["ID"]),
                    name=str(r.get("Name", "")),
                    serial_number=int(r.get("SerialNumber", 0)),
                    signing_key_id=str(r.get("SigningKeyID", "")),
                    not_before=_parse_rfc3339(str(r["NotBefore"])),
                    not_after=_parse_rfc3339(str(r["NotAfter"])),
                    root_cert=str(r["RootCert"]),
                    intermediate_certs=tuple(str(c) for c in (r.get("IntermediateCerts") or [])),
                    active=bool(r.get("Active", False)),
                    private_key_type=str(r.get("PrivateKeyType", "ec")),
                    private_key_bits=int(r.get("PrivateKeyBits", 256)),
                    create_index=int(r.get("CreateIndex", 0)),
                    modify_index=int(r.get("ModifyIndex", 0)),
                )
                for r in doc["Roots"]
            )
            cluster_id = ""
            for r in doc["Roots"]:
                cluster_id = str(r.get("ExternalTrustDomain", "") or cluster_id)
            return cls(trust_domain=str(doc["TrustDomain"]), active_root_id=str(doc["ActiveRootID"]),
                       roots=roots, index=index, cluster_id=cluster_id)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed trust bundle: {exc!r}") from exc

    @classmethod
    def from_json(cls, text: str | bytes, index: int = 0) -> TrustBundle:
        return cls.from_consul(json.loads(text), index)


class Provider(Protocol):
    """What the CA needs from a certificate provider (see the module docstring)."""

    name: str

    def configure(self, config: CAConfig, trust_domain: str, state: dict[str, Any] | None,
                  now: datetime) -> None: ...

    def state(self) -> dict[str, Any]: ...

    def sign(self, request: SignRequest, ttl: timedelta, now: datetime) -> SignedLeaf: ...

    def rotate(self, now: datetime) -> str: ...

    def maintain(self, now: datetime) -> bool: ...

    def bundle(self, index: int) -> TrustBundle: ...

    def active_chain(self) -> tuple[str, ...]: ...

    @property
    def state_index(self) -> int:
        """Grows with every change of roots or chains; part of the state, so it survives failover."""
        ...
