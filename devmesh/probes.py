"""Readiness probes and port checks for `weft dev`: one HTTP or TCP attempt each, never raising."""

from __future__ import annotations

import errno
import json
import socket
import urllib.error
import urllib.request


def http_status(url: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0


def http_ok(url: str, timeout: float = 1.0) -> bool:
    return http_status(url, timeout) == 200


def upstreams_known(config_url: str, timeout: float = 1.0) -> bool:
    """A sidecar's /config shows endpoints for each of its upstreams (see :func:`endpoints_known`)."""
    try:
        with urllib.request.urlopen(config_url, timeout=timeout) as resp:
            doc = json.loads(resp.read(1 << 20))
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
        return False
    return endpoints_known(doc)


def endpoints_known(config: object) -> bool:
    """In a sidecar's /config document: every upstream has an endpoint and, when it is routed through a
    discovery chain, so has every target of the chain (the demo's canary v2 is a target of its own: a
    sidecar that knows v1 only would answer the split's v2 share with 503)."""
    snapshot = config.get("snapshot") if isinstance(config, dict) else None
    if not isinstance(snapshot, dict):
        return False
    for upstream in (snapshot.get("upstreams") or {}).values():
        if not isinstance(upstream, dict) or not upstream.get("endpoints"):
            return False
        chain = upstream.get("chain")
        targets = chain.get("targets") if isinstance(chain, dict) else None
        if isinstance(targets, dict) and not all(isinstance(t, dict) and t.get("endpoints")
                                                 for t in targets.values()):
            return False
    return True


def tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
