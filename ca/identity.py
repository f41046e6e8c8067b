"""SPIFFE service identities, as Consul Connect spells them (pure: no I/O).

A service's identity is ``spiffe://<trust-domain>/ns/<namespace>/dc/<datacenter>/svc/<service>``,
carried in the URI SAN of its leaf certificate. The trust domain is ``<cluster-id>.consul``; the
cluster id is created once and kept in Consul KV by the CA (see ``ca.store``).

Every leaf also carries the DNS SAN ``<service>.svc.<namespace>.<trust-domain>`` (see
:meth:`SpiffeId.dns_name`), because gRPC clients always check the server's host name: channels set
``grpc.ssl_target_name_override`` to that name.

This is the one module of ``ca`` that ``catalog``, ``policies`` and ``sidecar`` may import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "spiffe://"
TRUST_DOMAIN_SUFFIX = ".consul"
DEFAULT_NAMESPACE = "default"
DEFAULT_DATACENTER = "dc1"

# A trust domain is a DNS-like name: lowercase letters, digits, '-', '.', '_' (SPIFFE spec), dots
# separating non-empty labels.
_TRUST_DOMAIN = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
# A cluster id: a UUID in Consul, but any DNS label is accepted.
_CLUSTER_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Service, namespace and datacenter names become DNS labels of the DNS SAN, so no dots.
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?$")
_MAX_TRUST_DOMAIN = 255
_MAX_URI = 2048


class IdentityError(ValueError):
    """A SPIFFE ID, trust domain or name that is not valid; the message says what is wrong."""


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not value:
        raise IdentityError(f"{kind} must be a non-empty string")
    if not _NAME.match(value):
        raise IdentityError(
            f"{kind} {value!r} is not valid: use 1-63 letters, digits, '-' or '_', "
            "starting and ending with a letter or digit"
        )
    return value


def validate_trust_domain(trust_domain: str) -> str:
    """Return ``trust_domain`` if it is a valid SPIFFE trust domain name, else raise IdentityError."""
    if not isinstance(trust_domain, str) or not trust_domain:
        raise IdentityError("trust domain must be a non-empty string")
    if len(trust_domain) > _MAX_TRUST_DOMAIN:
        raise IdentityError(f"trust domain is longer than {_MAX_TRUST_DOMAIN} characters")
    if not _TRUST_DOMAIN.match(trust_domain):
        raise IdentityError(
            f"trust domain {trust_domain!r} is not valid: use lowercase letters, digits, '-', '_' "
            "and dots between non-empty labels"
        )
    return trust_domain


def validate_cluster_id(cluster_id: str) -> str:
    """Return ``cluster_id`` if it can form a trust domain (one lowercase DNS label), else raise."""
    if not isinstance(cluster_id, str) or not _CLUSTER_ID.match(cluster_id):
        raise IdentityError(
            f"cluster id {cluster_id!r} is not valid: use 1-63 lowercase letters, digits or '-' "
            "(a UUID, as Consul uses)"
        )
    return cluster_id


def trust_domain_for(cluster_id: str) -> str:
    """The trust domain of a cluster: ``<cluster-id>.consul``."""
    return validate_cluster_id(cluster_id) + TRUST_DOMAIN_SUFFIX


def cluster_id_of(trust_domain: str) -> str:
    """The cluster id of a Weft trust domain ``<cluster-id>.consul``; raises if it is not of that form."""
    validate_trust_domain(trust_domain)
    if not trust_domain.endswith(TRUST_DOMAIN_SUFFIX):
        raise IdentityError(f"trust domain {trust_domain!r} does not end in {TRUST_DOMAIN_SUFFIX!r}")
    return validate_cluster_id(trust_domain[: -len(TRUST_DOMAIN_SUFFIX)])


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """A service identity ``spiffe://<trust_domain>/ns/<namespace>/dc/<datacenter>/svc/<service>``.

    Construct with keyword arguments or :meth:`parse`; every field is validated on construction.
    ``str(identity)`` is the URI.
    """

    trust_domain: str
    namespace: str
    datacenter: str
    service: str

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        _check_name("namespace", self.namespace)
        _check_name("datacenter", self.datacenter)
        _check_name("service", self.service)

    @classmethod
    def for_service(cls, trust_domain: str, service: str, *, datacenter: str = DEFAULT_DATACENTER,
                    namespace: str = DEFAULT_NAMESPACE) -> SpiffeId:
        return cls(trust_domain=trust_domain, namespace=namespace, datacenter=datacenter, service=service)

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse a service SPIFFE ID; raise IdentityError naming what is wrong with anything else."""
        if not isinstance(uri, str):
            raise IdentityError(f"SPIFFE ID must be a string, not {type(uri).__name__}")
        if len(uri) > _MAX_URI:
            raise IdentityError(f"SPIFFE ID is longer than {_MAX_URI} characters")
        if not uri.lower().startswith(SCHEME):
            raise IdentityError(f"{uri!r} is not a SPIFFE ID: it must start with {SCHEME!r}")
        if not uri.startswith(SCHEME):
            raise IdentityError(f"{uri!r}: the scheme must be lowercase {SCHEME!r}")
        rest = uri[len(SCHEME):]
        forbidden = (("?", "a query"), ("#", "a fragment"), ("@", "user info"), ("%", "percent-encoding"))
        for bad, what in forbidden:
            if bad in rest:
                raise IdentityError(f"{uri!r}: a SPIFFE ID must not contain {what}")
        trust_domain, sep, path = rest.partition("/")
        if ":" in trust_domain:
            raise IdentityError(f"{uri!r}: the trust domain must not carry a port")
        validate_trust_domain(trust_domain)
        if not sep or not path:
            raise IdentityError(f"{uri!r} has no path; expected /ns/<ns>/dc/<dc>/svc/<service>")
        parts = path.split("/")
        if len(parts) != 6 or parts[0] != "ns" or parts[2] != "dc" or parts[4] != "svc":
            raise IdentityError(
                f"{uri!r} is not a service identity: expected the path /ns/<ns>/dc/<dc>/svc/<service>"
            )
        return cls(trust_domain=trust_domain, namespace=parts[1], datacenter=parts[3], service=parts[5])

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/dc/{self.datacenter}/svc/{self.service}"

    def __str__(self) -> str:
        return self.uri

    @property
    def dns_name(self) -> str:
        """The DNS SAN of this identity's leaf: ``<service>.svc.<namespace>.<trust-domain>``."""
        return dns_name(self.service, self.trust_domain, namespace=self.namespace)

    def in_trust_domain(self, trust_domain: str) -> bool:
        return self.trust_domain == trust_domain

    def require_trust_domain(self, trust_domain: str) -> SpiffeId:
        """Return self if it belongs to ``trust_domain``, else raise IdentityError saying so."""
        if self.trust_domain != trust_domain:
            raise IdentityError(
                f"SPIFFE ID {self.uri!r} belongs to trust domain {self.trust_domain!r}, "
                f"not to this cluster's {trust_domain!r}"
            )
        return self


def dns_name(service: str, trust_domain: str, *, namespace: str = DEFAULT_NAMESPACE) -> str:
    """The DNS SAN a service's leaf carries: ``<service>.svc.<namespace>.<trust-domain>``.

    Clients pass it as ``grpc.ssl_target_name_override`` when dialling that service.
    """
    _check_name("service", service)
    _check_name("namespace", namespace)
    validate_trust_domain(trust_domain)
    return f"{service}.svc.{namespace}.{trust_domain}"


def validate_service_name(service: str) -> str:
    """Return ``service`` if it can be a service identity's name, else raise IdentityError."""
    return _check_name("service", service)
