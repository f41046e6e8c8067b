"""The demo `weft dev` runs: `frontend` (HTTP) -> `greeter` (gRPC) -> `store` (gRPC).

Each app is a small program (`python -m weft.demo.store`, `.greeter`, `.frontend`) that talks plaintext
to 127.0.0.1 only: callers reach their upstream through their own sidecar's local upstream port, as
declared in the Consul service definitions kept in `weft/demo/services/`. `python -m weft.demo.traffic`
is a gentle traffic generator for the frontend.
"""
