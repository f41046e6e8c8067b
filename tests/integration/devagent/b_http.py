"""A tiny HTTP helper for the dev agent integration tests (engineer B's modules)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def call(base_url: str, method: str, path: str, body: Any = None, token: str | None = None,
         headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, Any, dict[str, str]]:
    """(status, parsed JSON body or raw bytes, headers)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(base_url + path, data=data, method=method)
    if token:
        req.add_header("X-Consul-Token", token)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status, hdrs = resp.read(), int(resp.status), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raw, status, hdrs = exc.read(), int(exc.code), dict(exc.headers)
    try:
        return status, json.loads(raw), hdrs
    except ValueError:
        return status, raw, hdrs
