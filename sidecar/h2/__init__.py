"""HTTP/2 without I/O: frames (:mod:`.frames`), bounded HPACK reading (:mod:`.hpack`), what the proxy
knows of gRPC (:mod:`.grpc`) and one connection's state machine (:mod:`.connection`).

The asyncio adapters and the proxying on top live in ``sidecar.h2_proxy``.
"""
