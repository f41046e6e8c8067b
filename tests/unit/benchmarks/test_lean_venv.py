"""benchmarks.lean_venv: reuse while setup.cfg is unchanged, rebuild when it changes, fall back to the dev
venv with a note when the build fails (no subprocess really runs here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import lean_venv


def _repo(tmp_path: Path, setup: str = "[options]\ninstall_requires = a\n") -> Path:
    (tmp_path / "setup.cfg").write_text(setup)
    return tmp_path


def _fake_venv(repo: Path, stamp: str) -> Path:
    python = repo / lean_venv.LEAN_DIR / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    (repo / lean_venv.LEAN_DIR / lean_venv.STAMP).write_text(stamp + "\n")
    return python


def test_reused_while_setup_cfg_is_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = _repo(tmp_path)
    python = _fake_venv(repo, lean_venv._setup_hash(repo))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("rebuilt"))
    got = lean_venv.lean_interpreter(repo)
    assert got.python == str(python) and got.note.startswith("lean venv")


def test_rebuilt_when_setup_cfg_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = _repo(tmp_path)
    _fake_venv(repo, "stale")
    ran: list[list[str]] = []

    def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        ran.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            (repo / lean_venv.LEAN_DIR / "bin").mkdir(parents=True)
            (repo / lean_venv.LEAN_DIR / "bin" / "python").write_text("")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)
    got = lean_venv.lean_interpreter(repo)
    assert [c[1:3] for c in ran] == [["-m", "venv"], ["-m", "pip"]] and ran[1][-1] == "."
    assert got.note.startswith("lean venv")
    assert (repo / lean_venv.LEAN_DIR / lean_venv.STAMP).read_text().strip() == lean_venv._setup_hash(repo)


def test_falls_back_to_the_dev_venv_with_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = _repo(tmp_path)

    def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        if cmd[1:3] == ["-m", "pip"]:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for a")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)
    got = lean_venv.lean_interpreter(repo)
    assert got.python == sys.executable
    assert got.note.startswith(lean_venv.DEV_NOTE) and "No matching distribution" in got.note
    assert not (repo / lean_venv.LEAN_DIR).exists()
