"""What both HTTP/1.1 call paths relay the same way: the headers passed on, and the response streamed back.

Used by the plain path (``sidecar.http_proxy``) and the routed one (``sidecar.http_routing``), which
the plain path calls: kept here so that neither imports the other for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    from sidecar.tap import CallRecord

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
                        "transfer-encoding", "upgrade", "host", "content-length"})
_CHUNK = 64 * 1024


def forward_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The headers passed on: every field but the hop-by-hop ones (and those the client library sets)."""
    return [(k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP]


async def relay_response(request: web.BaseRequest, upstream: aiohttp.ClientResponse,
                         headers: Iterable[tuple[str, str]], tap: CallRecord | None = None) -> web.StreamResponse:
    """Stream an upstream's response (with these headers: hop-by-hop ones already dropped) to the client;
    ``tap`` (a sidecar.tap call record, or None) sees the body's preview."""
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    for k, v in headers:
        response.headers.add(k, v)
    if upstream.content_length is not None:
        response.content_length = upstream.content_length
    await response.prepare(request)
    async for chunk in upstream.content.iter_chunked(_CHUNK):
        if tap is not None:
            tap.response_data(chunk)
        await response.write(chunk)
    await response.write_eof()
    return response
