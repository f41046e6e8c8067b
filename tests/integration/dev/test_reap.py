"""`weft dev` reaps what a crashed run left behind, and only that (pid and start time must match)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from devmesh.processes import reap_stale
from devmesh.state import STATE_FILE
from devmesh.state import process_start_time as _start_time
from tests.support import wait_for

pytestmark = pytest.mark.integration


def _sleeper() -> subprocess.Popen[bytes]:
    # a process group with a child and a grandchild, like a sidecar that spawned a helper
    code = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def _gone(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is not None


def test_reap_stale_stops_recorded_process_groups_and_spares_recycled_pids(tmp_path: Path) -> None:
    left = _sleeper()
    spared = _sleeper()
    try:
        wait_for(lambda: bool(_start_time(left.pid)) and bool(_start_time(spared.pid)), what="sleepers")
        state = {"children": [
            {"name": "left", "pid": left.pid, "started": _start_time(left.pid)},
            {"name": "recycled", "pid": spared.pid, "started": "1"},  # same pid, another process
        ]}
        (tmp_path / STATE_FILE).write_text(json.dumps(state))
        stopped = reap_stale(tmp_path, timeout=5)
        assert stopped == ["left"]
        wait_for(lambda: _gone(left), timeout=10, what="the stale process to exit")
        # its whole group went too: no process is left in it
        wait_for(lambda: _group_empty(left.pid), timeout=10, what="the stale group to empty")
        assert spared.poll() is None, "a pid whose start time differs is never touched"
        assert not (tmp_path / STATE_FILE).exists()
    finally:
        for p in (left, spared):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(5)


def _group_empty(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_reap_stale_without_state_is_a_no_op(tmp_path: Path) -> None:
    assert reap_stale(tmp_path) == []
    (tmp_path / STATE_FILE).write_text("not json")
    assert reap_stale(tmp_path) == []
