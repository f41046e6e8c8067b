"""The `weft` command line: one entry point, one module per subcommand.

Each subcommand lives in its own module under `weft/` exposing
`add_arguments(parser: argparse.ArgumentParser) -> None` and `run(args: argparse.Namespace) -> int`.
Modules are imported only when their subcommand runs, so `weft agent` does not pay for grpc.
Flags follow Consul's single-dash style (`-http-port`); argparse accepts both `-x` and `--x` spellings
where a module declares both.

Every parser (subcommands and their own subcommands) gets a description and shows each option's
default (`HelpFormatter`). Output cut short by its reader (`weft ca roots | head`) ends quietly:
a closed stdout is not an error worth a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
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
    "tap": ("weft.cmd_tap", "live calls of a service, with headers and payload previews"),
    "ui": ("weft.cmd_ui", "the web dashboard: topology, golden metrics, intentions, live tap"),
    "systemd-unit": ("weft.cmd_systemd", "print a systemd unit for a Weft process"),
}


# exit status after the reader of our stdout went away (what a process killed by SIGPIPE reports)
EXIT_BROKEN_PIPE = 128 + 13


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and every option's default shown unless its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (default is None or default is argparse.SUPPRESS or isinstance(default, bool) or default in ("", [])
                or "(default" in text or "%(default)" in text or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def version() -> str:
    """The installed distribution's version ("unknown" when Weft runs from a bare checkout)."""
    from importlib import metadata

    try:
        return metadata.version("weft")
    except metadata.PackageNotFoundError:
        return "unknown"


def finish_parser(parser: argparse.ArgumentParser, description: str) -> None:
    """Give `parser` and every parser under it (subcommands of subcommands) the help formatter and a
    description: a subcommand without one of its own gets the one-line help it is listed with."""
    parser.formatter_class = HelpFormatter
    if not parser.description:
        parser.description = description
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                finish_parser(sub, _sentence(helps.get(name, "")) if helps.get(name) else "")


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def build_parser(name: str) -> argparse.ArgumentParser | None:
    """The complete parser of one subcommand (None when its module is not part of this build)."""
    command = _load(name)
    if command is None:
        return None
    parser = argparse.ArgumentParser(prog=f"weft {name}", description=_sentence(COMMANDS[name][1]),
                                     formatter_class=HelpFormatter)
    command.add_arguments(parser)
    finish_parser(parser, COMMANDS[name][1])
    return parser


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
    try:
        try:
            return _main(list(sys.argv[1:] if argv is None else argv))
        finally:
            # inside the try (argparse's --help exits with SystemExit): a reader gone before the last
            # buffer was written is the same case
            sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush does not complain again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a real file (tests capture it): nothing to flush later
        pass


def _main(argv: list[str]) -> int:
    top = argparse.ArgumentParser(prog="weft", description="Weft: a gRPC-native service mesh on Consul.",
                                  formatter_class=HelpFormatter)
    top.add_argument("command", nargs="?", help="one of: " + ", ".join(COMMANDS))
    top.add_argument("-version", "--version", action="store_true", help="print the version and exit")
    if argv and argv[0] in ("-version", "--version", "version"):
        print(f"weft {version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        print("\ncommands (`weft COMMAND --help` for each):")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<14}{text}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"weft: unknown command {name!r}; run 'weft --help' for the list", file=sys.stderr)
        return 2
    parser = build_parser(name)
    if parser is None:
        print(f"weft: command {name!r} is not available in this build", file=sys.stderr)
        return 2
    command = _load(name)
    assert command is not None
    args = parser.parse_args(rest)
    try:
        return command.run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
