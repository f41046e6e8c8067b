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
    """A sidecar's /config shows at least one endpoint for each of its upstreams."""
    try:
        with urllib.request.urlopen(config_url, timeout=timeout) as resp:
            doc = json.loads(resp.read(1 << 20))
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
        return False
    snapshot = doc.get("snapshot") if isinstance(doc, dict) else None
    if not isinstance(snapshot, dict):
        return False
    upstreams = snapshot.get("upstreams") or {}
    return all(isinstance(u, dict) and u.get("endpoints") for u in upstreams.values())


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
