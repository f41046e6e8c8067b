"""`weft dev`'s children as processes: started in their own process group with their log in a
file, recorded in the state file (pid and start time), stopped tier by tier; and what a crashed
`weft dev` left running, reaped. A thin adapter over subprocess, signals and /proc."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from devmesh.state import STATE_FILE, process_start_time, running


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when weft dev dies
    except (OSError, AttributeError):
        pass



@dataclass
class Child:
    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    started: str
    tier: int = 0  # stopped from the highest tier down: what depends on others goes first

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])


@dataclass
class Supervisor:
    state_dir: Path
    env: dict[str, str]
    children: list[Child] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], tier: int = 0) -> Child:
        logs = self.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        log: IO[bytes] = open(log_path, "wb")  # the child has its own copy; closed below
        try:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True, preexec_fn=_pdeathsig)
        finally:
            log.close()
        child = Child(name, argv, popen, log_path, process_start_time(popen.pid), tier)
        self.children.append(child)
        self.save()
        return child

    def save(self) -> None:
        state = dict(self.info)
        state["supervisor_pid"] = os.getpid()
        state["supervisor_started"] = process_start_time(os.getpid())
        state["children"] = [{"name": c.name, "pid": c.pid, "started": c.started, "argv": c.argv}
                             for c in self.children]
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_dir / STATE_FILE)

    def dead(self) -> list[Child]:
        return [c for c in self.children if not c.alive()]

    def stop_all(self, timeout: float, hurry: Callable[[], bool] = lambda: False) -> list[str]:
        """Stop tier by tier, highest first (traffic, sidecars, apps, the control plane, then
        the agent, so that sidecars can still deregister): SIGTERM to each child's process group,
        SIGKILL to what remains after `timeout` (at once when `hurry()` turns true: a second Ctrl-C).
        Returns the names that had to be killed."""
        killed = []
        for tier in sorted({c.tier for c in self.children}, reverse=True):
            group = [c for c in self.children if c.tier == tier]
            for c in reversed(group):
                _signal_group(c.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and any(c.alive() for c in group) and not hurry():
                time.sleep(0.05)
            for c in group:
                if c.alive():
                    killed.append(c.name)
                _signal_group(c.pid, signal.SIGKILL)  # also catches a grandchild left in the group
            for c in group:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.popen.wait(5)
        return killed


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def reap_stale(state_dir: Path, timeout: float = 5.0) -> list[str]:
    """Stop what a crashed `weft dev` left running (only processes whose pid *and* start time match
    what it recorded, so a recycled pid is never touched). Returns the names stopped."""
    path = state_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    stale = []
    for entry in state.get("children", []):
        pid, started = int(entry.get("pid", 0)), str(entry.get("started", ""))
        if pid > 0 and started and running(pid, started):
            stale.append((str(entry.get("name", pid)), pid, started))
    for _, pid, _ in stale:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(running(pid, st) for _, pid, st in stale):
        time.sleep(0.05)
    for _, pid, st in stale:
        if running(pid, st):
            _signal_group(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        path.unlink()
    return [name for name, _, _ in stale]
