"""`weft dev`: the whole mesh and a demo on this machine, in one command (`make dev` runs it).

What it starts, in order, each as a child process in its own process group with its log in
`.weft-dev/logs/<name>.log`:

1. the dev agent (`weft agent -dev`) at `CONSUL_HTTP_ADDR` (default 127.0.0.1:8500), unless a Consul
   already answers there (then that one is used, and the demo's old registrations are removed first);
2. the CA (`weft ca serve -dev`) and the policy service (`weft policy serve`, default deny);
3. the demo services registered from their Consul service definitions (`weft/demo/services/*.hcl|json`),
   and the intentions frontend -> greeter and greeter -> store (everything else is denied by default);
4. the three apps (`python -m weft.demo.frontend|greeter|store`) and a sidecar for each
   (`weft sidecar --sidecar-for <id> --admin-port <port>`);
5. a gentle traffic generator (`python -m weft.demo.traffic`) calling the frontend.

Then it prints what runs where and what to try. Ctrl-C (or SIGTERM) stops everything: SIGTERM to
every child's process group, SIGKILL to what is left after `-stop-timeout`. The pids (with their
start times) are kept in `.weft-dev/state.json`; a `weft dev` after a crash first reaps whatever the
crashed one left running, and children also get SIGTERM from the kernel when `weft dev` dies
(Linux). The dev agent keeps everything in memory, so no stale registrations survive it.

Ports are the fixed defaults of the service definitions (apps 19100/19200/19300, upstream binds
19101/19201, sidecars 21100/21200/21300, admin 19102/19202/19302, CA 8553, policy 8507) and a busy one
is a clear error; `-free-ports` picks free ones instead (tests use it) and rewrites the definitions.

The mesh is assembled in `devmesh/` (`devmesh.mesh.DevMesh`); this module parses the flags and calls it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from devmesh.mesh import DevOptions
from devmesh.mesh import run as run_mesh
from devmesh.plan import DemoFiles

DEMO = DemoFiles(services=Path(__file__).resolve().parent / "demo" / "services",
                 config=Path(__file__).resolve().parent / "demo" / "config")  # the canary's config entries


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-state-dir", "--state-dir", default=".weft-dev",
                        help="where pids, ports and logs go (default .weft-dev)")
    parser.add_argument("-free-ports", "--free-ports", action="store_true",
                        help="pick free ports instead of the fixed defaults (the dev agent's too, "
                             "unless CONSUL_HTTP_ADDR is set)")
    parser.add_argument("-rps", "--rps", type=float, default=2.0, help="demo traffic, requests/s (default 2)")
    parser.add_argument("-no-traffic", "--no-traffic", action="store_true", help="do not start the traffic generator")
    parser.add_argument("-log-level", "--log-level", default="info", help="log level of the children (default info)")
    parser.add_argument("-ready-timeout", "--ready-timeout", type=float, default=90.0,
                        help="seconds to wait for each part to come up (default 90)")
    parser.add_argument("-stop-timeout", "--stop-timeout", type=float, default=8.0,
                        help="seconds between SIGTERM and SIGKILL when stopping (default 8)")


def run(args: argparse.Namespace) -> int:
    if args.rps <= 0:
        print("weft dev: -rps must be positive", file=sys.stderr)
        return 2
    return run_mesh(DevOptions(state_dir=Path(args.state_dir), demo=DEMO, free_ports=args.free_ports, rps=args.rps,
                               no_traffic=args.no_traffic, log_level=args.log_level,
                               ready_timeout=args.ready_timeout, stop_timeout=args.stop_timeout))
