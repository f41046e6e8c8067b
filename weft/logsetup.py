"""Logging set-up shared by every Weft process: structlog, JSON lines on stderr.

Libraries (catalog, ca, policies, sidecar) only call `structlog.get_logger()`; entry points call
`configure()` once. Keys and tokens are never passed to a logger: the redaction processor below is a
second line of defence, not the first.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = frozenset({"token", "private_key", "key_pem", "kek", "secret", "password", "authorization"})


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if key.lower() in _SECRET_KEYS and event[key]:
            event[key] = "[redacted]"
    return event


def configure(level: str = "info", *, json: bool = True) -> None:
    """Configure structlog and the stdlib root logger to emit at `level` (debug, info, warn, error)."""
    numeric = logging.getLevelName(level.upper().replace("WARN", "WARNING").replace("WARNINGING", "WARNING"))
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use debug, info, warn or error")
    logging.basicConfig(stream=sys.stderr, level=numeric, format="%(message)s")
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
