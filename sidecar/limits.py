"""Every limit a sidecar enforces on what its peers send it, named, with a default and a flag.

A sidecar reads bytes from local apps (outbound listeners), from any peer holding a mesh certificate
(the public port) and from upstreams. Each of those peers is bounded here: what one connection may
make the sidecar buffer, and how much work it may cause, so that one buggy app or one compromised
peer loses its own stream or connection and costs other callers nothing.

The defaults follow what production proxies ship (Envoy's HTTP/2 protocol options and overload
protections, nghttp2's flood limits, HAProxy's and nginx's stream limits). Each field becomes a
``weft sidecar`` flag: ``h2_max_concurrent_streams`` is ``--h2-max-concurrent-streams``.

Pure: no I/O, no imports beyond the standard library.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

KIB = 1024
MIB = 1024 * 1024


def _limit(default: Any, help: str, *, minimum: float = 0, maximum: float | None = None) -> Any:
    return field(default=default, metadata={"help": help, "min": minimum, "max": maximum})


@dataclass(frozen=True)
class Limits:
    # -- HTTP/2 (every connection the sidecar parses: apps, the inbound full path, upstreams) -----
    h2_max_header_list_size: int = _limit(
        64 * KIB, "largest decoded header list of one request or response (RFC 9113 SETTINGS_MAX_HEADER_LIST_SIZE; "
        "names + values + 32 per field); above it a gRPC call ends with RESOURCE_EXHAUSTED, HTTP with 431",
        minimum=1 * KIB)
    h2_max_header_block_size: int = _limit(
        64 * KIB, "largest encoded header block across HEADERS + CONTINUATION frames", minimum=1 * KIB)
    h2_max_continuation_frames: int = _limit(
        32, "most CONTINUATION frames in one header block", minimum=1)
    h2_max_concurrent_streams: int = _limit(
        256, "SETTINGS_MAX_CONCURRENT_STREAMS advertised to each client; more open streams are refused "
        "with REFUSED_STREAM", minimum=1, maximum=2**31 - 1)
    h2_initial_stream_window: int = _limit(
        4 * MIB, "flow-control window per stream the sidecar grants (bytes a peer may send before it waits)",
        minimum=65535, maximum=2**31 - 1)
    h2_connection_window: int = _limit(
        16 * MIB, "flow-control window per connection the sidecar grants", minimum=65535, maximum=2**31 - 1)
    h2_max_outbound_control_frames: int = _limit(
        1000, "control frames (PING and SETTINGS acks, RST_STREAM) queued for a peer that does not read; "
        "past it the connection is closed with GOAWAY ENHANCE_YOUR_CALM", minimum=1)
    h2_max_empty_frames: int = _limit(
        1, "consecutive inbound DATA/HEADERS/CONTINUATION frames with an empty payload and no END_STREAM "
        "(past it: GOAWAY ENHANCE_YOUR_CALM)", minimum=0)
    h2_max_priority_frames_per_stream: int = _limit(
        100, "PRIORITY frames per opened stream, over the connection's life", minimum=0)
    h2_max_window_updates_per_data_frame: int = _limit(
        10, "WINDOW_UPDATE frames received per DATA frame sent, over the connection's life", minimum=1)
    h2_reset_burst: int = _limit(
        1000, "streams a client may reset (or have refused) before their response is complete, in a burst "
        "(rapid reset, CVE-2023-44487); past the budget: GOAWAY ENHANCE_YOUR_CALM", minimum=1)
    h2_reset_rate: float = _limit(
        33.0, "rate (per second) at which the reset budget refills", minimum=0.0)
    h2_max_buffered_bytes: int = _limit(
        1 * MIB, "bytes the sidecar queues for one peer that does not read before it stops reading from "
        "that connection (back-pressure)", minimum=64 * KIB)
    h2_settings_timeout: float = _limit(
        10.0, "seconds a peer has to acknowledge the sidecar's SETTINGS (past it: SETTINGS_TIMEOUT)", minimum=0.1)
    # -- connections (the public port and the outbound listeners) ---------------------------------
    handshake_timeout: float = _limit(
        10.0, "seconds a client has to finish its TLS handshake on the public port (and the sidecar to connect "
        "to an upstream over TLS from a TCP or HTTP outbound listener)", minimum=0.1)
    max_connections: int = _limit(
        4096, "open connections per listener; more are refused at accept", minimum=1)
    max_pending_handshakes: int = _limit(
        256, "connections per listener that have not finished their TLS handshake; past it the oldest "
        "unfinished one is dropped", minimum=1)
    idle_timeout: float = _limit(
        300.0, "seconds a connection may stay open with no stream and no byte moving (0: never closed)",
        minimum=0.0)
    # -- HTTP/1.1 -----------------------------------------------------------------------------------
    http_max_header_size: int = _limit(
        64 * KIB, "longest HTTP/1.1 request line or header field of a request or response head; above it 431",
        minimum=1 * KIB)
    http_max_headers: int = _limit(
        100, "most header fields in one HTTP/1.1 request or response head; above it 431", minimum=1)
    http_header_timeout: float = _limit(
        10.0, "seconds an HTTP/1.1 client has to send a whole request head", minimum=0.1)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            low, high = f.metadata["min"], f.metadata["max"]
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"limit {flag_name(f.name)}: expected a number, got {value!r}")
            if value < low:
                raise ValueError(f"limit {flag_name(f.name)}: {value} is below the minimum {low}")
            if high is not None and value > high:
                raise ValueError(f"limit {flag_name(f.name)}: {value} is above the maximum {high}")
        if self.h2_connection_window < self.h2_initial_stream_window:
            raise ValueError("limit --h2-connection-window must be at least --h2-initial-stream-window")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def described() -> list[tuple[str, type, Any, str]]:
    """(field name, type, default, help) of every limit, for building flags and the README table."""
    out: list[tuple[str, type, Any, str]] = []
    for f in dataclasses.fields(Limits):
        kind: type = float if isinstance(f.default, float) else int
        out.append((f.name, kind, f.default, str(f.metadata["help"])))
    return out


DEFAULT = Limits()
