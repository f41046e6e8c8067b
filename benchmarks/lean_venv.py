"""A production-like interpreter for the memory scenario: a venv with `install_requires` only.

The dev venv (`.venv`) has the dev extra, and some of it changes what a sidecar loads: structlog imports
`rich` when it is installed (+5.5 MB of RSS), which users' sidecars never have. So the memory scenario
runs its sidecars with `.venv-bench-lean/` (git-ignored) inside the tree being benchmarked, created on
demand with `python -m venv` and `pip install .` (no extras), and reused while setup.cfg is unchanged
(a stamp file holds setup.cfg's SHA-256). The sidecars start with the tree as their working directory and
`python -m weft.cli`, so the tree's code is what runs (it comes first on sys.path); the venv supplies the
third-party packages. If the venv cannot be built (no network to PyPI), the dev venv is used and the
result says so.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

LEAN_DIR = ".venv-bench-lean"
STAMP = "weft-setup-cfg.sha256"
DEV_NOTE = "dev venv (rich loaded)"


@dataclass(frozen=True)
class Interpreter:
    python: str       # the executable sidecars are started with
    note: str         # what it is, for the result ("lean venv ..." or DEV_NOTE plus why)


def _setup_hash(repo: Path) -> str:
    return hashlib.sha256((repo / "setup.cfg").read_bytes()).hexdigest()


def lean_interpreter(repo: Path, *, timeout: float = 900) -> Interpreter:
    """The lean venv's python, built or rebuilt when setup.cfg changed; else the dev venv's, with why."""
    venv = repo / LEAN_DIR
    python = venv / "bin" / "python"
    stamp = venv / STAMP
    wanted = _setup_hash(repo)
    note = f"lean venv ({LEAN_DIR}: pip install . , install_requires only)"
    if python.exists() and stamp.exists() and stamp.read_text().strip() == wanted:
        return Interpreter(str(python), note)
    shutil.rmtree(venv, ignore_errors=True)
    steps = ([sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "."])
    for cmd in steps:
        try:
            res = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return Interpreter(sys.executable, f"{DEV_NOTE}: building {LEAN_DIR} failed: {exc}")
        if res.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            return Interpreter(sys.executable, f"{DEV_NOTE}: building {LEAN_DIR} failed: {' / '.join(tail)}")
    stamp.write_text(wanted + "\n")
    return Interpreter(str(python), note)
