"""The `weft` command line: one entry point, one module per subcommand.

Each subcommand lives in its own module under `weft/` exposing
`add_arguments(parser: argparse.ArgumentParser) -> None` and `run(args: argparse.Namespace) -> int`.
Modules are imported only when their subcommand runs, so `weft agent` does not pay for grpc.
Flags follow Consul's single-dash style (`-http-port`); argparse accepts both `-x` and `--x` spellings
where a module declares both.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Protocol, cast

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "agent": ("weft.cmd_agent", "run the embedded Consul-compatible dev agent"),
    "ca": ("weft.cmd_ca", "the certificate authority: serve, roots, rotate, sign"),
    "policy": ("weft.cmd_policy", "the policy service: serve"),
    "intention": ("weft.cmd_intention", "manage and check intentions"),
    "config": ("weft.cmd_config", "write, read, list and delete config entries (HCL or JSON), as consul config"),
    "sidecar": ("weft.cmd_sidecar", "run a sidecar proxy next to a service"),
    "dev": ("weft.cmd_dev", "run the whole mesh and a demo on this machine"),
    "register": ("weft.cmd_register", "register a Consul service definition (HCL or JSON)"),
    "status": ("weft.cmd_status", "show services, sidecars, certificates and policy versions"),
    "top": ("weft.cmd_top", "live golden metrics per edge"),
    "systemd-unit": ("weft.cmd_systemd", "print a systemd unit for a Weft process"),
}


class _Command(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def _load(name: str) -> _Command | None:
    module_name = COMMANDS[name][0]
    try:
        return cast(_Command, importlib.import_module(module_name))
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="weft", description="Weft: a gRPC-native service mesh on Consul.")
    top.add_argument("command", nargs="?", help="one of: " + ", ".join(COMMANDS))
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        print("\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<14}{text}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"weft: unknown command {name!r}; run 'weft --help' for the list", file=sys.stderr)
        return 2
    command = _load(name)
    if command is None:
        print(f"weft: command {name!r} is not available in this build", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"weft {name}", description=COMMANDS[name][1])
    command.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return command.run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
