"""HTTP/1.1 attacks of issue 9 (item 5: the same bounds on the HTTP path): an oversized request head,
and slow clients that never finish their head (slowloris), on the caller's HTTP outbound listener
and on the HTTP service's public port as the L7 peer (its full path parses every request).

Both sidecars run with ``--http-header-timeout 1`` here, so that the slow clients are due within
the test's bounds; the head size limit is the default (64 KiB).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time

import pytest

from tests.abuse.mesh import HTTP_L7, HTTP_OUTBOUND, REFUSED, Mesh, Target

pytestmark = [pytest.mark.abuse, pytest.mark.integration]

HEAD = b"GET /abuse HTTP/1.1\r\nHost: httpapi\r\n"


def status_of(sock: socket.socket, seconds: float = 5.0) -> str:
    """The status code of the first response line on ``sock`` ("" when the server closed without one)."""
    sock.settimeout(seconds)
    got = b""
    with contextlib.suppress(OSError):
        while b"\r\n" not in got and len(got) < 4096:
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
    parts = got.split(b"\r\n", 1)[0].split()
    return parts[1].decode() if len(parts) >= 2 else ""


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server ended (or answered: 408, 400) the unfinished request on ``sock``."""
    sock.setblocking(False)
    try:
        if isinstance(sock, ssl.SSLSocket):
            sock.recv(4096)
        else:
            sock.recv(4096, socket.MSG_PEEK)
        return True  # EOF or an answer: either way the server is done with this head
    except (BlockingIOError, ssl.SSLWantReadError):
        return False
    except OSError:
        return True


@pytest.mark.parametrize("target", (HTTP_OUTBOUND, HTTP_L7), ids=str)
def test_http_oversized_request_head(mesh: Mesh, target: Target) -> None:
    """A 100 KiB header (over the 64 KiB head limit): 431; a 6 KB one (under every limit, the app's
    aiohttp included) on a new connection: 200."""
    with mesh.watch(target) as w:
        big = mesh.connect(target)
        with contextlib.suppress(OSError):
            big.sendall(HEAD + b"x-big: " + b"b" * 100_000 + b"\r\n\r\n")
        status = status_of(big)
        big.close()
        w.expect(status == "431", "431 for a 100 KiB request head", f"status {status or 'none (closed)'}")
        small = mesh.connect(target)
        small.sendall(HEAD + b"x-small: " + b"s" * 6000 + b"\r\nConnection: close\r\n\r\n")
        status = status_of(small)
        small.close()
        w.expect(status == "200", "200 for a 6 KB request head", f"status {status or 'none (closed)'}")
    w.verify()


@pytest.mark.parametrize("target", (HTTP_OUTBOUND, HTTP_L7), ids=str)
def test_http_slow_request_heads(mesh: Mesh, target: Target) -> None:
    """200 connections that send a request head one header line every 0.5 s and never finish it: each
    is closed once --http-header-timeout (1 s here) passes, and counted."""
    with mesh.watch(target) as w:
        socks: list[socket.socket] = []
        for _ in range(200):
            with contextlib.suppress(OSError):
                s = mesh.connect(target, timeout=5)
                s.sendall(HEAD)
                socks.append(s)
        deadline = time.monotonic() + 4.0
        open_ = list(socks)
        while open_ and time.monotonic() < deadline:
            time.sleep(0.5)
            still = []
            for s in open_:
                s.settimeout(0.05)
                try:
                    s.sendall(b"x-slow: 1\r\n")
                    still.append(s)
                except OSError:
                    continue
            open_ = [s for s in still if not closed_by_server(s)]
        w.notes.append(f"{len(socks)} slow clients, {len(open_)} still open after 4 s")
        w.expect(len(socks) >= 180, "at least 180 of the 200 slow connections accepted", f"{len(socks)}")
        w.expect(len(open_) <= len(socks) // 10, "the slow clients closed by the header timeout",
                 f"{len(open_)} of {len(socks)} still open")
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
    w.verify(counted=REFUSED)
