"""Which Consul an operator command talks to, and the running `weft dev` it may come from.

Operator commands (`weft status`, `top`, `intention`, `register`, `ca roots|rotate|sign`, and any
later client command such as `tap` or `config`) call :func:`consul_for_cli` instead of reading
`CONSUL_HTTP_ADDR` alone:

1. `CONSUL_HTTP_ADDR` set (even to the default): it wins, as for Consul's own tools;
2. else the state file of a running `weft dev`, `<state dir>/state.json`, looked for in this order:
   the `-state-dir` given to the command; `.weft-dev` in the current directory or the nearest parent
   that has one (so a subdirectory of the repository finds the repository's); the state directory
   named in `$XDG_RUNTIME_DIR/weft-dev.json`, which `weft dev` writes when it starts and removes when
   it stops (so a terminal anywhere finds the last `weft dev` started by this user). A state file
   counts only while the `weft dev` that wrote it runs (its pid with the same start time), so a
   crashed one's file is never followed;
3. else Consul's default, `127.0.0.1:8500`.

The command prints one line on stderr saying which address it uses and why.

The choice (:func:`choose`) is pure; reading files and `/proc` is in the functions around it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

STATE_FILE = "state.json"
DEFAULT_STATE_DIR = ".weft-dev"
POINTER_FILE = "weft-dev.json"  # in $XDG_RUNTIME_DIR
DEFAULT_CONSUL = "127.0.0.1:8500"
MAX_STATE_BYTES = 1 << 20  # a state file is a few KiB; refuse to parse anything much larger


# ---------------------------------------------------------------------------------------------------
# Processes (Linux /proc): a pid together with its start time names one process, never a recycled pid


def process_start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux); "" when unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


def running(pid: int, started: str) -> bool:
    """The recorded process still runs (same pid, same start time, not a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return False
    return fields[0] != "Z" and fields[19] == started


# ---------------------------------------------------------------------------------------------------
# Pure: state files and the choice


@dataclass(frozen=True)
class DevState:
    """What a `weft dev` records about itself in its state file."""

    path: Path
    consul: str  # e.g. http://127.0.0.1:8500
    supervisor_pid: int
    supervisor_started: str
    admin: Mapping[str, str] = field(default_factory=dict)  # service -> admin URL of its sidecar

    @classmethod
    def parse(cls, path: Path, raw: str) -> DevState:
        """A state file's content; ValueError naming the file when it is not one."""
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{path}: not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: not a JSON object")
        consul = doc.get("consul")
        pid = doc.get("supervisor_pid")
        if not isinstance(consul, str) or not consul:
            raise ValueError(f"{path}: no consul address")
        if not isinstance(pid, int) or pid <= 0:
            raise ValueError(f"{path}: no supervisor_pid")
        admin = doc.get("admin") if isinstance(doc.get("admin"), dict) else {}
        return cls(path=path, consul=consul, supervisor_pid=pid,
                   supervisor_started=str(doc.get("supervisor_started", "")),
                   admin={str(k): str(v) for k, v in (admin or {}).items()})


@dataclass(frozen=True)
class ConsulChoice:
    """The Consul address a command uses, why, and the environment to build its client from."""

    address: str
    source: str  # "CONSUL_HTTP_ADDR", "weft dev" or "default"
    env: Mapping[str, str]
    dev: DevState | None = None  # the running weft dev found (its sidecars' admin URLs), if any

    def note(self, prog: str) -> str:
        if self.source == "CONSUL_HTTP_ADDR":
            why = "from CONSUL_HTTP_ADDR"
        elif self.source == "weft dev" and self.dev is not None:
            why = f"the running weft dev's agent, from {self.dev.path}; CONSUL_HTTP_ADDR is unset"
        else:
            why = "the default: CONSUL_HTTP_ADDR is unset and no running weft dev was found"
        return f"{prog}: Consul at {self.address} ({why})"


def choose(env: Mapping[str, str], running_dev: DevState | None) -> ConsulChoice:
    """CONSUL_HTTP_ADDR, else the running weft dev's agent, else the default."""
    given = env.get("CONSUL_HTTP_ADDR", "").strip()
    if given:
        return ConsulChoice(address=given, source="CONSUL_HTTP_ADDR", env=dict(env), dev=running_dev)
    if running_dev is not None:
        address = running_dev.consul.removeprefix("http://")
        return ConsulChoice(address=address, source="weft dev",
                            env={**env, "CONSUL_HTTP_ADDR": address}, dev=running_dev)
    return ConsulChoice(address=DEFAULT_CONSUL, source="default", env=dict(env))


def candidate_dirs(cwd: Path, given: str | None, pointer: str | None) -> list[Path]:
    """Where to look for a state file, in order (see the module's docstring)."""
    out: list[Path] = []
    if given:
        out.append(cwd / given)
    for directory in (cwd, *cwd.parents):
        out.append(directory / DEFAULT_STATE_DIR)
    if pointer:
        out.append(Path(pointer))
    seen: set[Path] = set()
    unique = []
    for p in out:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique


# ---------------------------------------------------------------------------------------------------
# I/O


def pointer_path(env: Mapping[str, str]) -> Path | None:
    runtime = env.get("XDG_RUNTIME_DIR", "")
    return Path(runtime) / POINTER_FILE if runtime and Path(runtime).is_absolute() else None


def read_pointer(env: Mapping[str, str]) -> str | None:
    """The state directory `$XDG_RUNTIME_DIR/weft-dev.json` names (None when there is none)."""
    path = pointer_path(env)
    if path is None:
        return None
    try:
        doc = json.loads(path.read_text()[:MAX_STATE_BYTES])
    except (OSError, ValueError):
        return None
    state_dir = doc.get("state_dir") if isinstance(doc, dict) else None
    return state_dir if isinstance(state_dir, str) and state_dir.startswith("/") else None


def write_pointer(env: Mapping[str, str], state_dir: Path) -> Path | None:
    """Written by `weft dev` when it starts (atomically; nothing when $XDG_RUNTIME_DIR is unset)."""
    path = pointer_path(env)
    if path is None:
        return None
    try:
        tmp = path.with_name(f".{POINTER_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps({"state_dir": str(state_dir), "pid": os.getpid()}) + "\n")
        tmp.replace(path)
    except OSError:
        return None
    return path


def remove_pointer(env: Mapping[str, str], state_dir: Path) -> None:
    """Removed by `weft dev` when it stops, unless another `weft dev` has pointed it elsewhere since."""
    path = pointer_path(env)
    if path is not None and read_pointer(env) == str(state_dir):
        try:
            path.unlink()
        except OSError:
            pass


def read_state(state_dir: Path) -> DevState | None:
    """The state file in `state_dir`, or None when there is none or it cannot be read."""
    path = state_dir / STATE_FILE
    try:
        with open(path) as f:
            raw = f.read(MAX_STATE_BYTES + 1)
    except OSError:
        return None
    if len(raw) > MAX_STATE_BYTES:
        return None
    try:
        return DevState.parse(path, raw)
    except ValueError:
        return None


def is_running(state: DevState) -> bool:
    if state.supervisor_started:
        return running(state.supervisor_pid, state.supervisor_started)
    try:  # a state file without a start time: the pid alone
        os.kill(state.supervisor_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_running_dev(dirs: Iterable[Path]) -> DevState | None:
    for d in dirs:
        state = read_state(d)
        if state is not None and is_running(state):
            return state
    return None


def resolve(env: Mapping[str, str] | None = None, state_dir: str | None = None,
            cwd: Path | None = None) -> ConsulChoice:
    env = dict(os.environ if env is None else env)
    dirs = candidate_dirs(cwd or Path.cwd(), state_dir, read_pointer(env))
    return choose(env, find_running_dev(dirs))


def consul_for_cli(prog: str, state_dir: str | None = None, env: Mapping[str, str] | None = None,
                   quiet: bool = False) -> ConsulChoice:
    """:func:`resolve`, and one line on stderr saying which Consul the command uses."""
    choice = resolve(env, state_dir)
    if not quiet:
        print(choice.note(prog), file=sys.stderr, flush=True)
    return choice


def admin_urls(choice: ConsulChoice) -> dict[str, str]:
    """Admin URLs of the found weft dev's sidecars, by service (empty without one)."""
    return dict(choice.dev.admin) if choice.dev is not None else {}
