"""devmesh.state: which Consul an operator command uses when CONSUL_HTTP_ADDR is unset (a running
`weft dev`'s state file), found from the current directory, a parent, or $XDG_RUNTIME_DIR."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from devmesh import state as devstate
from devmesh.state import DevState, candidate_dirs, choose, consul_for_cli, resolve


def _write_state(state_dir: Path, *, consul: str = "http://127.0.0.1:41234", pid: int | None = None,
                 started: str | None = None) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    pid = os.getpid() if pid is None else pid
    doc = {"consul": consul, "supervisor_pid": pid,
           "supervisor_started": devstate.process_start_time(pid) if started is None else started,
           "admin": {"frontend": "http://127.0.0.1:19102"}}
    (state_dir / devstate.STATE_FILE).write_text(json.dumps(doc))
    return state_dir


def test_consul_http_addr_wins() -> None:
    dev = DevState(Path("/x/state.json"), "http://127.0.0.1:41234", 1, "1")
    choice = choose({"CONSUL_HTTP_ADDR": "10.0.0.5:8500"}, dev)
    assert choice.address == "10.0.0.5:8500" and choice.source == "CONSUL_HTTP_ADDR"
    assert choice.env["CONSUL_HTTP_ADDR"] == "10.0.0.5:8500"
    assert choice.note("weft status") == "weft status: Consul at 10.0.0.5:8500 (from CONSUL_HTTP_ADDR)"


def test_a_running_weft_dev_is_used_when_consul_http_addr_is_unset() -> None:
    dev = DevState(Path("/repo/.weft-dev/state.json"), "http://127.0.0.1:41234", 1, "1")
    choice = choose({"CONSUL_HTTP_TOKEN": "t"}, dev)
    assert choice.address == "127.0.0.1:41234" and choice.source == "weft dev"
    assert choice.env == {"CONSUL_HTTP_TOKEN": "t", "CONSUL_HTTP_ADDR": "127.0.0.1:41234"}
    assert "from /repo/.weft-dev/state.json" in choice.note("weft top")


def test_the_default_says_why() -> None:
    choice = choose({}, None)
    assert choice.address == "127.0.0.1:8500" and "CONSUL_HTTP_ADDR" not in choice.env
    assert "no running weft dev was found" in choice.note("weft intention")


def test_where_state_files_are_looked_for() -> None:
    dirs = candidate_dirs(Path("/repo/sub/dir"), "custom", "/run/user/0/wd")
    assert dirs[:4] == [Path("/repo/sub/dir/custom"), Path("/repo/sub/dir/.weft-dev"), Path("/repo/sub/.weft-dev"),
                        Path("/repo/.weft-dev")]
    assert dirs[-1] == Path("/run/user/0/wd")


def test_found_from_a_subdirectory_while_its_weft_dev_runs(tmp_path: Path) -> None:
    _write_state(tmp_path / ".weft-dev")  # "its weft dev" is this very process
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    choice = resolve({}, cwd=sub)
    assert choice.source == "weft dev" and choice.address == "127.0.0.1:41234"
    assert devstate.admin_urls(choice) == {"frontend": "http://127.0.0.1:19102"}


def test_a_crashed_weft_devs_state_file_is_not_followed(tmp_path: Path) -> None:
    _write_state(tmp_path / ".weft-dev", started="1")  # our pid, another start time: a recycled pid
    assert resolve({}, cwd=tmp_path).source == "default"
    _write_state(tmp_path / ".weft-dev", pid=2**22 + 12345, started="")  # no such process
    assert resolve({}, cwd=tmp_path).source == "default"


@pytest.mark.parametrize("content", ["", "{not json", "[]", '{"consul": "x"}', "x" * (devstate.MAX_STATE_BYTES + 10)])
def test_unreadable_state_files_are_ignored(tmp_path: Path, content: str) -> None:
    (tmp_path / ".weft-dev").mkdir()
    (tmp_path / ".weft-dev" / devstate.STATE_FILE).write_text(content)
    assert resolve({}, cwd=tmp_path).source == "default"


def test_the_xdg_runtime_pointer_finds_it_from_anywhere(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir()
    state_dir = _write_state(tmp_path / "checkout" / ".weft-dev")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    assert resolve(env, cwd=elsewhere).source == "default"
    assert devstate.write_pointer(env, state_dir) == runtime / devstate.POINTER_FILE
    assert resolve(env, cwd=elsewhere).address == "127.0.0.1:41234"
    devstate.remove_pointer(env, tmp_path / "another")  # another weft dev's stop leaves ours alone
    assert (runtime / devstate.POINTER_FILE).exists()
    devstate.remove_pointer(env, state_dir)
    assert not (runtime / devstate.POINTER_FILE).exists()
    assert devstate.write_pointer({}, state_dir) is None  # no $XDG_RUNTIME_DIR: nothing written


def test_an_explicit_state_dir(tmp_path: Path) -> None:
    _write_state(tmp_path / "mine", consul="http://127.0.0.1:45678")
    assert resolve({}, state_dir="mine", cwd=tmp_path).address == "127.0.0.1:45678"


def test_consul_for_cli_prints_one_line_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _write_state(tmp_path / ".weft-dev")
    monkeypatch.chdir(tmp_path)
    choice = consul_for_cli("weft status", env={})
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [choice.note("weft status")]
    assert "127.0.0.1:41234" in captured.err
