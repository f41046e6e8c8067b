"""The dev agent's snapshot archive (``/v1/snapshot``): gzip-compressed JSON of the whole store (pure).

Consul's archive is a gzip'd tar of its Raft snapshot; ours only has to round-trip with our own
restore, so it is a gzip'd JSON document ``{"Format", "Version", "Index", "Datacenter", "Tables"}``
(every table's rows by key). gzip's CRC-32 catches a damaged archive. Reading is bounded: at most
``MAX_COMPRESSED`` bytes in and ``MAX_STATE`` bytes out of the decompressor (a gzip bomb stops
there), then the document's shape is checked before anything is restored.
"""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

FORMAT = "weft-devagent-snapshot"
VERSION = 1
MAX_COMPRESSED = 64 * 1024 * 1024
MAX_STATE = 512 * 1024 * 1024


class SnapshotError(ValueError):
    """An archive that is not one of ours, damaged, or too big; the message says which."""


def encode(tables: dict[str, dict[str, Any]], index: int, datacenter: str) -> bytes:
    doc = {"Format": FORMAT, "Version": VERSION, "Index": index, "Datacenter": datacenter, "Tables": tables}
    return gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), compresslevel=6, mtime=0)


def decode(data: bytes) -> tuple[int, dict[str, dict[str, Any]]]:
    """(index, tables) from an archive made by ``encode``; raises SnapshotError."""
    if len(data) > MAX_COMPRESSED:
        raise SnapshotError(f"snapshot too large: more than {MAX_COMPRESSED} bytes")
    if data[:2] != b"\x1f\x8b":
        raise SnapshotError("failed to decompress snapshot: gzip: invalid header")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        raw = inflater.decompress(data, MAX_STATE + 1)
    except zlib.error as exc:
        raise SnapshotError(f"failed to decompress snapshot: {exc}") from None
    if len(raw) > MAX_STATE:
        raise SnapshotError(f"snapshot state too large: more than {MAX_STATE} bytes once decompressed")
    if not inflater.eof:
        raise SnapshotError("failed to decompress snapshot: unexpected EOF")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"failed to read snapshot state: {exc}") from None
    if not isinstance(doc, dict) or doc.get("Format") != FORMAT:
        raise SnapshotError("not a dev agent snapshot (unknown format)")
    if doc.get("Version") != VERSION:
        raise SnapshotError(f"unsupported snapshot version {doc.get('Version')!r}")
    index, tables = doc.get("Index"), doc.get("Tables")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise SnapshotError("snapshot index is not a non-negative integer")
    if not isinstance(tables, dict) or not all(
            isinstance(rows, dict) and all(isinstance(row, dict) for row in rows.values())
            for rows in tables.values()):
        raise SnapshotError("snapshot tables are not objects of rows")
    return index, tables
