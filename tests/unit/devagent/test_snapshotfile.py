"""The snapshot archive: round trip, and bounded reading of hostile archives."""

from __future__ import annotations

import gzip

import pytest

from devagent import snapshotfile as sf


def test_round_trip() -> None:
    tables = {"kvs": {"a": {"Key": "a", "Value": "eA=="}}, "nodes": {}}
    data = sf.encode(tables, 42, "dc1")
    assert data[:2] == b"\x1f\x8b" and sf.decode(data) == (42, tables)


def test_bombs_and_oversized_archives_stop_at_the_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sf, "MAX_STATE", 1024)
    bomb = gzip.compress(b" " * (10 * 1024 * 1024))  # 10 MiB of state in ~10 KiB
    with pytest.raises(sf.SnapshotError, match="too large: more than 1024 bytes once decompressed"):
        sf.decode(bomb)
    monkeypatch.setattr(sf, "MAX_COMPRESSED", 100)
    with pytest.raises(sf.SnapshotError, match="snapshot too large"):
        sf.decode(b"\x1f\x8b" + b"\0" * 200)


def test_foreign_and_damaged_archives() -> None:
    for data, want in [(b"", "invalid header"), (gzip.compress(b"{}"), "unknown format"),
                       (gzip.compress(b'{"Format": "weft-devagent-snapshot", "Version": 9}'), "version 9"),
                       (gzip.compress(b'{"Format": "weft-devagent-snapshot", "Version": 1, "Index": -1, '
                                      b'"Tables": {}}'), "index"),
                       (gzip.compress(b"[]")[:-4], "failed to decompress")]:
        with pytest.raises(sf.SnapshotError, match=want):
            sf.decode(data)
