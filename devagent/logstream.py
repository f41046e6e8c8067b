"""Log lines for ``/v1/agent/monitor``: a structlog processor that copies every log event to the
monitors listening at its level, in Consul's (hclog's) text or JSON line format.

``install(hub, level)`` puts ``hub.tap`` first in structlog's processor chain and lowers structlog's
own filter to debug, so a monitor asking for ``debug`` sees debug events even when the agent logs at
``info``; ``tap`` then drops what is below the agent's own level before it reaches stderr. Each
monitor has a bounded queue (Consul's 512 lines); a monitor that does not read loses lines (counted),
never blocks the agent. Lines are capped at ``MAX_LINE`` bytes.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from collections.abc import MutableMapping
from typing import Any

import structlog

BUFFER = 512  # lines queued per monitor (Consul's monitor BufferSize)
MAX_LINE = 16 * 1024
MAX_MONITORS = 64

# hclog's level names and order; Consul's ValidateLogLevel accepts these (case-insensitive)
LEVELS = {"TRACE": 0, "DEBUG": 1, "INFO": 2, "WARN": 3, "ERR": 4, "ERROR": 4}
_STRUCTLOG_LEVEL = {"debug": 1, "info": 2, "warning": 3, "warn": 3, "error": 4, "critical": 4, "exception": 4}
_BRACKET = {0: "[TRACE]", 1: "[DEBUG]", 2: "[INFO] ", 3: "[WARN] ", 4: "[ERROR]"}
_JSON_LEVEL = {0: "trace", 1: "debug", 2: "info", 3: "warn", 4: "error"}
_SKIP_KEYS = frozenset({"event", "level", "timestamp"})


def valid_level(name: str) -> bool:
    return name.upper() in LEVELS


def level_number(name: str) -> int:
    return LEVELS[name.upper()]


def format_line(event: MutableMapping[str, Any], level: int, *, as_json: bool,
                now: datetime.datetime | None = None) -> str:
    """One log event as hclog writes it: ``2026-01-02T03:04:05.678Z [INFO]  agent: msg: k=v`` or JSON."""
    now = now or datetime.datetime.now(datetime.UTC)
    message = str(event.get("event", ""))
    extras = {k: v for k, v in event.items() if k not in _SKIP_KEYS}
    if as_json:
        doc: dict[str, Any] = {"@level": _JSON_LEVEL[level], "@message": message, "@module": "agent",
                               "@timestamp": now.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"}
        doc.update({k: v if isinstance(v, (str, int, float, bool)) or v is None else str(v)
                    for k, v in extras.items()})
        line = json.dumps(doc, separators=(",", ":"))
    else:
        stamp = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
        pairs = "".join(f" {k}={_text(v)}" for k, v in extras.items())
        line = f"{stamp} {_BRACKET[level]} agent: {message}" + (":" + pairs if pairs else "")
    data = line.encode()
    if len(data) > MAX_LINE:
        line = data[:MAX_LINE].decode(errors="ignore") + "...(truncated)"
    return line + "\n"


def _text(value: Any) -> str:
    text = str(value)
    return f'"{text}"' if (" " in text or not text) else text


class Monitor:
    """One ``/v1/agent/monitor`` listener."""

    def __init__(self, level: int, as_json: bool) -> None:
        self.level = level
        self.as_json = as_json
        self.queue: asyncio.Queue[str] = asyncio.Queue(BUFFER)
        self.dropped = 0


class LogHub:
    """The monitors of one agent and the structlog processor feeding them."""

    def __init__(self) -> None:
        self.monitors: set[Monitor] = set()
        self.min_level = LEVELS["INFO"]  # the agent's own level: what reaches stderr

    def open(self, level: int, as_json: bool) -> Monitor | None:
        """A new monitor, or None when ``MAX_MONITORS`` are already listening."""
        if len(self.monitors) >= MAX_MONITORS:
            return None
        mon = Monitor(level, as_json)
        self.monitors.add(mon)
        return mon

    def close(self, mon: Monitor) -> None:
        self.monitors.discard(mon)

    def tap(self, _logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        level = _STRUCTLOG_LEVEL.get(method, LEVELS["INFO"])
        for mon in self.monitors:
            if level >= mon.level:
                try:
                    mon.queue.put_nowait(format_line(event, level, as_json=mon.as_json))
                except asyncio.QueueFull:
                    mon.dropped += 1
        if level < self.min_level:
            raise structlog.DropEvent
        return event


def install(hub: LogHub, level: str) -> None:
    """Route every structlog event through ``hub.tap`` (first), keeping what was configured after it."""
    name = level.upper()
    hub.min_level = LEVELS.get("WARN" if name == "WARNING" else name, LEVELS["INFO"])
    config = structlog.get_config()
    processors = [p for p in config["processors"] if getattr(p, "__self__", None) is not hub]
    structlog.configure(processors=[hub.tap, *processors],
                        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
