"""`SidecarConfig`: everything one sidecar is told at start-up, typed and checked.

`weft sidecar`'s flags become one of these (`weft/cmd_sidecar.py`); `sidecar.app.Sidecar` runs from it.
Pure: no I/O (the CLI reads the descriptor-set file and passes the methods it found).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from sidecar.limits import Limits


class ConfigError(ValueError):
    """A setting is out of range; the message names the flag."""


@dataclass(frozen=True)
class SidecarConfig:
    service_id: str                                  # --sidecar-for: the app's ID with the local agent
    admin_port: int = 19000                          # 0: a free port
    admin_bind: str = "127.0.0.1"
    ca_addr: str = ""                                # "": Consul service weft-ca
    public_port: int = 0                             # used without a proxy registration that gives one
    bind: str = ""                                   # "": the proxy's address, else 0.0.0.0
    upstreams: tuple[tuple[str, int], ...] = ()      # --upstream NAME:PORT, without a proxy registration
    token: str | None = None                         # None: the Consul client's token
    ttl: str = "10s"
    deregister_after: str = "1m"
    drain_timeout: float = 10.0
    max_message_bytes: int = 4 * 1024 * 1024
    access_log_rate: float = 20.0
    access_log_sample: float = 0.01
    descriptor_methods: Mapping[str, str] | None = None  # from --descriptor-set
    reflect: bool = True
    passthrough: bool = True
    leaf_ttl: timedelta | None = None                # None: the CA's
    watch_wait: float = 60.0
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if not self.service_id:
            raise ConfigError("--sidecar-for: a service ID is required")
        if not 0 <= self.admin_port < 65536:
            raise ConfigError(f"--admin-port {self.admin_port}: expected 0..65535")
        if not 0 <= self.public_port < 65536:
            raise ConfigError(f"--public-port {self.public_port}: expected 0..65535")
        if self.max_message_bytes <= 0:
            raise ConfigError("--max-message-bytes must be positive")
        if not 0.0 <= self.access_log_sample <= 1.0 or self.access_log_rate < 0:
            raise ConfigError("--access-log-sample must be within 0..1 and --access-log-rate >= 0")
        if self.drain_timeout < 0:
            raise ConfigError("--drain-timeout must not be negative")
        if self.watch_wait <= 0:
            raise ConfigError("--watch-wait must be positive")
        for name, port in self.upstreams:
            if not name or not 0 < port < 65536:
                raise ConfigError(f"--upstream {name}:{port}: expected NAME:PORT")


def parse_upstream(spec: str) -> tuple[str, int]:
    """`NAME:PORT` as `--upstream` takes it."""
    name, _, port = spec.partition(":")
    if not name or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--upstream {spec!r}: expected NAME:PORT")
    return name, int(port)
