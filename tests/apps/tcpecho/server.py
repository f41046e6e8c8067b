"""The TCP echo app: every byte received is sent back on the same connection.

With `--banner NAME` it first sends `NAME\\n` on each new connection (so tests can see which instance
a proxied connection reached); without it, it is a pure echo (used for throughput benchmarks).
Written as a `BufferedProtocol` with flow control so that it is cheap at hundreds of MB/s.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from typing import cast

_BUFFER = 256 * 1024


class EchoProtocol(asyncio.BufferedProtocol):
    def __init__(self, banner: bytes | None) -> None:
        self.banner = banner
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray(_BUFFER)
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        if self.banner is not None:
            self.transport.write(self.banner)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buffer)

    def buffer_updated(self, nbytes: int) -> None:
        assert self.transport is not None
        # write() copies what it cannot send at once, so reusing the buffer afterwards is safe
        self.transport.write(bytes(self.buffer[:nbytes]) if self.transport.get_write_buffer_size() else
                             memoryview(self.buffer)[:nbytes])

    def eof_received(self) -> bool:
        return False  # close our side too once the peer has finished

    def pause_writing(self) -> None:
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self.paused:
            self.paused = False
            self.transport.resume_reading()


async def start(port: int = 0, *, banner: str | None = None, host: str = "127.0.0.1") -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    line = (banner + "\n").encode() if banner is not None else None
    server = await loop.create_server(lambda: EchoProtocol(line), host, port)
    return server, int(server.sockets[0].getsockname()[1])


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from weft.runner import run

    parser = argparse.ArgumentParser(prog="python -m tests.apps.tcpecho", description="TCP echo test app")
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--banner", default=None, help="send 'BANNER\\n' first on every connection")
    parser.add_argument("--name", default=None, help="same as --banner (for symmetry with the other apps)")
    args = parser.parse_args(argv)

    async def _main(stop: asyncio.Event) -> int:
        server, port = await start(args.port, banner=args.banner or args.name, host=args.host)
        print(json.dumps({"event": "listening", "app": "tcpecho", "port": port}), flush=True)
        await stop.wait()
        server.close()
        return 0

    return run(_main)


if __name__ == "__main__":
    sys.exit(main())
