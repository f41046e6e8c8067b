"""Bounded HPACK reading for a proxy that forwards header blocks as they are (RFC 7541).

The sidecar announces ``SETTINGS_HEADER_TABLE_SIZE=0``, so once a peer acknowledged it, its header
blocks are *context-free* (static table and literals only) and can move to another connection
unchanged. This module reads such blocks without a decoder's state:

- :func:`scan` finds one header's value (``:path``, ``grpc-status``) without decoding the rest;
- :func:`context_free` tells whether a block refers to the dynamic table;
- :func:`headers_of` decodes every header, bounded by a header-list size (RFC 9113
  SETTINGS_MAX_HEADER_LIST_SIZE accounting: name + value + 32 per field);
- :func:`check_request` applies RFC 9113 8.3's rules on pseudo-headers that authorization relies on;
- :func:`encode_plain` makes a context-free block (never-indexed literals).

Huffman-coded strings are decoded once and cached, in a cache bounded in entries and entry size.
Every reader raises :class:`HpackError` (a ValueError) on a truncated or malformed block.
"""

from __future__ import annotations

from hpack import Encoder
from hpack.exceptions import HPACKDecodingError
from hpack.huffman_table import decode_huffman
from hpack.struct import NeverIndexedHeaderTuple
from hpack.table import HeaderTable

STATIC = HeaderTable.STATIC_TABLE
HUFFMAN_CACHE_ENTRIES = 4096
HUFFMAN_CACHE_MAX_STRING = 256  # longer strings are decoded each time, never cached


class HpackError(ValueError):
    """A header block that cannot be read (truncated, malformed, or referring to the dynamic table)."""


class HeaderListTooLarge(HpackError):
    """A decoded header list above the limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"header list of at least {size} bytes is above the limit of {limit}")
        self.size = size
        self.limit = limit


class MalformedRequest(HpackError):
    """A request header list RFC 9113 8.3 calls malformed (a stream error PROTOCOL_ERROR)."""


_strings: dict[bytes, bytes] = {}


def _int(block: bytes, i: int, prefix: int) -> tuple[int, int]:
    mask = (1 << prefix) - 1
    v = block[i] & mask
    i += 1
    if v < mask:
        return v, i
    shift = 0
    while True:
        b = block[i]
        i += 1
        v += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, i
        if shift > 28:
            raise HpackError("HPACK integer longer than 4 continuation bytes")


def _string(block: bytes, i: int) -> tuple[bytes, int]:
    huff = block[i] & 0x80
    n, i = _int(block, i, 7)
    end = i + n
    if end > len(block):
        raise HpackError("HPACK string runs past the end of the header block")
    raw = block[i:end]
    if not huff:
        return raw, end
    s = _strings.get(raw)
    if s is None:
        try:
            s = decode_huffman(raw)
        except HPACKDecodingError as exc:
            raise HpackError(f"invalid Huffman string: {exc}") from None
        if n <= HUFFMAN_CACHE_MAX_STRING:
            if len(_strings) >= HUFFMAN_CACHE_ENTRIES:
                _strings.clear()
            _strings[raw] = s
    return s, end


def _past_string(block: bytes, i: int) -> int:
    """Where the HPACK string at ``i`` ends (not decoded)."""
    n, i = _int(block, i, 7)
    end = i + n
    if end > len(block):
        raise HpackError("HPACK string runs past the end of the header block")
    return end


def huffman_cache_size() -> tuple[int, int]:
    """(entries, largest entry) of the Huffman cache, for tests of its bounds."""
    return len(_strings), max((len(k) for k in _strings), default=0)


_STATIC_NAMES = {1: b":authority", 2: b":method", 3: b":method", 4: b":path", 5: b":path", 6: b":scheme",
                 7: b":scheme", 8: b":status", 9: b":status", 10: b":status", 11: b":status", 12: b":status",
                 13: b":status", 14: b":status", 31: b"content-type"}


def scan(block: bytes, want: bytes) -> bytes | None:
    """The value of header ``want`` in a context-free header block, or None (no dynamic-table lookups)."""
    try:
        i, n = 0, len(block)
        while i < n:
            b = block[i]
            if b & 0x80:  # indexed field: static entries only carry names we do not look for, except :path
                idx, i = _int(block, i, 7)
                if want == b":path" and idx in (4, 5):
                    return b"/" if idx == 4 else b"/index.html"
                continue
            if b & 0xE0 == 0x20:  # dynamic table size update
                _, i = _int(block, i, 5)
                continue
            idx, i = _int(block, i, 6 if b & 0xC0 == 0x40 else 4)
            if idx:
                name = _STATIC_NAMES.get(idx, b"")
            else:
                name, i = _string(block, i)
            if name == want:
                return _string(block, i)[0]
            i = _past_string(block, i)  # values of other headers are not decoded
    except IndexError:
        raise HpackError("truncated header block") from None
    return None


known_context_free: dict[bytes, bool] = {}  # short blocks seen to be context-free (responses repeat)
CONTEXT_FREE_CACHE_ENTRIES = 1024
CONTEXT_FREE_CACHE_MAX_BLOCK = 256


def context_free_cached(block: bytes) -> bool:
    """:func:`context_free`, remembering short blocks that are (response headers and trailers repeat)."""
    if block in known_context_free:
        return True
    if context_free(block):
        if len(block) <= CONTEXT_FREE_CACHE_MAX_BLOCK:
            if len(known_context_free) >= CONTEXT_FREE_CACHE_ENTRIES:
                known_context_free.clear()
            known_context_free[block] = True
        return True
    return False


def context_free(block: bytes) -> bool:
    """True when a block references no dynamic-table entry (only static indices below 62).

    Raises :class:`HpackError` on a truncated or malformed block. (Every request block goes through
    here: one-byte integers and string lengths, the common case, are read inline.)
    """
    try:
        i, n = 0, len(block)
        while i < n:
            b = block[i]
            if b & 0x80:  # indexed field
                idx = b & 0x7F
                if idx > 61 or idx == 0:
                    return False
                i += 1
                continue
            if b & 0xE0 == 0x20:  # dynamic table size update
                _, i = _int(block, i, 5)
                continue
            if b & 0xC0 == 0x40:  # literal with incremental indexing (6-bit index)
                idx = b & 0x3F
                if idx == 0x3F:
                    idx, i = _int(block, i, 6)
                else:
                    i += 1
            else:  # literal without indexing or never indexed (4-bit index)
                idx = b & 0x0F
                if idx == 0x0F:
                    idx, i = _int(block, i, 4)
                else:
                    i += 1
            if idx > 61:
                return False
            if not idx:  # a literal name, then the value
                length = block[i] & 0x7F
                i = i + 1 + length if length < 0x7F else _skip_string(block, i)
            length = block[i] & 0x7F
            i = i + 1 + length if length < 0x7F else _skip_string(block, i)
        if i > n:
            raise HpackError("HPACK string runs past the end of the header block")
        return True
    except IndexError:
        raise HpackError("truncated header block") from None


def _skip_string(block: bytes, i: int) -> int:
    n, i = _int(block, i, 7)
    i += n
    if i > len(block):
        raise HpackError("HPACK string runs past the end of the header block")
    return i


def headers_of(block: bytes, max_list_size: int = 0) -> list[tuple[bytes, bytes]]:
    """Every header of a context-free block (static table and literals; no dynamic-table lookups).

    ``max_list_size`` > 0 bounds the decoded list (:class:`HeaderListTooLarge` past it), so that a
    small block of indexed fields cannot make a large list.
    """
    out: list[tuple[bytes, bytes]] = []
    size = 0
    try:
        i, n = 0, len(block)
        while i < n:
            b = block[i]
            if b & 0x80:
                idx, i = _int(block, i, 7)
                if not 0 < idx <= len(STATIC):
                    raise HpackError(f"header block references dynamic entry {idx}")
                field = STATIC[idx - 1]
                out.append(field)
                size += len(field[0]) + len(field[1]) + 32
            else:
                if b & 0xE0 == 0x20:
                    _, i = _int(block, i, 5)
                    continue
                idx, i = _int(block, i, 6 if b & 0xC0 == 0x40 else 4)
                if idx:
                    if idx > len(STATIC):
                        raise HpackError(f"header block references dynamic entry {idx}")
                    name = STATIC[idx - 1][0]
                else:
                    name, i = _string(block, i)
                value, i = _string(block, i)
                out.append((name, value))
                size += len(name) + len(value) + 32
            if max_list_size and size > max_list_size:
                raise HeaderListTooLarge(size, max_list_size)
    except IndexError:
        raise HpackError("truncated header block") from None
    return out


def list_size(headers: list[tuple[bytes, bytes]]) -> int:
    """RFC 9113 header-list size: names + values + 32 per field."""
    return sum(len(k) + len(v) + 32 for k, v in headers)


_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":path", b":authority", b":protocol"))


def check_request(headers: list[tuple[bytes, bytes]]) -> None:
    """RFC 9113 8.3: each pseudo-header at most once, all before the regular headers, known ones only,
    and no uppercase names. Raises :class:`MalformedRequest` naming the fault."""
    seen: set[bytes] = set()
    regular = False
    for name, _ in headers:
        if name.startswith(b":"):
            if regular:
                raise MalformedRequest(f"pseudo-header {name.decode('latin-1')} after a regular header")
            if name not in _REQUEST_PSEUDO:
                raise MalformedRequest(f"unknown request pseudo-header {name.decode('latin-1')}")
            if name in seen:
                raise MalformedRequest(f"duplicate pseudo-header {name.decode('latin-1')}")
            seen.add(name)
        else:
            regular = True
            if not name.islower() and name.lower() != name:  # islower: the common case, without a copy
                raise MalformedRequest(f"uppercase header name {name.decode('latin-1')}")
    for required in (b":method", b":path", b":scheme"):
        if required not in seen:
            raise MalformedRequest(f"missing pseudo-header {required.decode()}")


def encode_plain(headers: list[tuple[bytes, bytes]]) -> bytes:
    """A context-free block (never-indexed literals): safe on any connection."""
    enc = Encoder()
    return bytes(enc.encode([NeverIndexedHeaderTuple(k, v) for k, v in headers], huffman=False))
