"""-data-dir: state survives a clean restart and a SIGKILL; a torn journal tail is dropped."""

from __future__ import annotations

import json
from pathlib import Path

import consul
import pytest

from tests.support import DevAgent

pytestmark = pytest.mark.integration


def _c(agent: DevAgent) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=agent.port)


def test_state_survives_restart_and_kill(tmp_path: Path) -> None:
    data = tmp_path / "agent"
    a = DevAgent(data_dir=data)
    try:
        c = _c(a)
        c.kv.put("keep/a", "1", flags=3)
        c.kv.put("keep/b", "2")
        c.kv.delete("keep/b")
        sid = c.session.create(name="survivor", ttl=3600, lock_delay=0)
        c.kv.put("keep/lock", "held", acquire=sid)
        node_id = c.agent.self()["Config"]["NodeID"]
        index_before, _ = c.kv.get("keep/", recurse=True)
    finally:
        a.stop()  # SIGTERM: compacts into state.json
    assert (data / "state.json").exists()

    b = DevAgent(data_dir=data)
    try:
        c = _c(b)
        index_after, entries = c.kv.get("keep/", recurse=True)
        assert [(e["Key"], e["Value"], e["Flags"]) for e in entries] == [("keep/a", b"1", 3), ("keep/lock", b"held", 0)]
        assert int(index_after) >= int(index_before)  # indexes never go backwards
        assert entries[1]["Session"] == sid and c.session.info(sid)[1]["Name"] == "survivor"
        assert c.agent.self()["Config"]["NodeID"] == node_id
        c.kv.put("keep/after-restart", "3")  # acknowledged, then the process dies without a shutdown
    finally:
        b.proc.kill()

    journal = data / "journal.jsonl"
    with open(journal, "ab") as fh:  # a crash in the middle of an append leaves a torn line
        fh.write(b'{"i": 999999, "ops": [["p", "kvs", "torn", {"Ke')
    c2 = DevAgent(data_dir=data)
    try:
        c = _c(c2)
        assert c.kv.get("keep/after-restart")[1]["Value"] == b"3"
        assert c.kv.get("torn")[1] is None
        assert c.kv.put("keep/c", "4") is True
        index, _ = c.kv.get("keep/c")
        assert int(index) < 999999
    finally:
        c2.stop()
    snapshot = json.loads((data / "state.json").read_text())
    assert "keep/c" in snapshot["tables"]["kvs"]


def test_shutdown_answers_blocking_queries_promptly() -> None:
    import threading
    import time

    a = DevAgent()
    got: dict[str, object] = {}
    try:
        c = _c(a)
        c.kv.put("shutdown/k", "v")
        index, _ = c.kv.get("shutdown/k")

        def block() -> None:
            try:
                got["r"] = c.kv.get("shutdown/k", index=index, wait="60s")
            except Exception as exc:  # any answer will do, as long as it is prompt
                got["r"] = exc

        th = threading.Thread(target=block, daemon=True)
        th.start()
        th.join(0.5)
        assert th.is_alive()
        t0 = time.monotonic()
    finally:
        a.stop()
    assert time.monotonic() - t0 < 4.9  # Proc.stop would SIGKILL at 5s
    th.join(5)
    assert "r" in got


def test_reload_and_leave() -> None:
    import urllib.request

    a = DevAgent()
    try:
        for path in ("/v1/agent/reload", "/v1/agent/leave"):
            req = urllib.request.Request(a.url + path, data=b"", method="PUT")
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.status == 200
        a.proc.popen.wait(10)  # leave shuts the agent down
        assert a.proc.popen.returncode == 0
    finally:
        a.stop()
