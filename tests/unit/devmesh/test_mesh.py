"""devmesh.mesh: a start-up that fails half-way stops what it started, then releases the state
directory (pointer, lock) in reverse order; the demo's definitions are read as `weft register DIR`
reads them. No processes are started: start and stop are replaced by recorders."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from catalog.servicedef import ServiceDefinitionError
from devmesh import state as devstate
from devmesh.mesh import DevMesh, DevOptions, Stopped, load_definitions
from devmesh.plan import DevError
from weft.cmd_dev import DEMO
from weft.cmd_register import load_files


@pytest.fixture(autouse=True)
def keep_signal_handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def recording_mesh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   failure: Exception | None) -> tuple[DevMesh, list[str]]:
    events: list[str] = []
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir(exist_ok=True)
    dev = DevMesh(DevOptions(state_dir=tmp_path / "state", demo=DEMO))

    def start() -> None:
        events.append("start")
        if failure is not None:
            raise failure

    monkeypatch.setattr(dev, "start", start)
    monkeypatch.setattr(dev, "stop", lambda: events.append("stop"))
    monkeypatch.setattr(dev, "_supervise", lambda: events.append("supervise"))
    monkeypatch.setattr(devstate, "remove_pointer", lambda env, d: events.append("pointer removed"))
    return dev, events


def test_a_failed_start_stops_what_it_started_then_releases_the_state_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    dev, events = recording_mesh(tmp_path, monkeypatch, DevError("timed out waiting for the dev agent"))
    assert dev.run() == 1
    assert events == ["start", "stop", "pointer removed"]
    assert "weft dev: timed out waiting for the dev agent" in capsys.readouterr().err
    # the lock is released: a second weft dev on the same state dir may start
    again, _ = recording_mesh(tmp_path, monkeypatch, None)
    assert again.run() == 0


def test_an_interrupted_start_stops_and_exits_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dev, events = recording_mesh(tmp_path, monkeypatch, Stopped())
    assert dev.run() == 0
    assert events == ["start", "stop", "pointer removed"]


def test_an_unexpected_error_still_stops_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dev, events = recording_mesh(tmp_path, monkeypatch, RuntimeError("bug"))
    with pytest.raises(RuntimeError):
        dev.run()
    assert events == ["start", "stop", "pointer removed"]


def test_a_running_mesh_is_supervised_then_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dev, events = recording_mesh(tmp_path, monkeypatch, None)
    assert dev.run() == 0
    assert events == ["start", "supervise", "stop", "pointer removed"]


def test_a_second_weft_dev_on_the_same_state_dir_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, _ = recording_mesh(tmp_path, monkeypatch, None)
    first.state_dir.mkdir(parents=True)
    held = first._lock()
    try:
        second, events = recording_mesh(tmp_path, monkeypatch, None)
        with pytest.raises(DevError, match="another weft dev is running"):
            second.run()
        assert events == []
    finally:
        held.close()


def test_demo_definitions_load_as_weft_register_reads_them(tmp_path: Path) -> None:
    assert load_definitions(DEMO.services) == [payload for _, payload in load_files([DEMO.services])]
    with pytest.raises(ServiceDefinitionError, match=r"no \.hcl or \.json files"):
        load_definitions(tmp_path)
