"""`weft config`: write, read, list and delete config entries, as `consul config` does.

    weft config write [-cas -modify-index N] FILE|-      (HCL or JSON; `-` reads stdin)
    weft config read -kind K -name N                      (the entry as indented JSON)
    weft config list -kind K                              (one name a line)
    weft config delete -kind K -name N [-cas -modify-index N] | -filename FILE

Talks to `CONSUL_HTTP_ADDR` with `CONSUL_HTTP_TOKEN` (the dev agent or a real Consul) through
`catalog.client`. Messages and exit codes follow Consul's CLI: 0 done, 1 anything else, with the
reason on stderr (`Error writing config entry service-router/web: ...` carries the agent's words).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from catalog import configentry
from catalog.client import ConsulClient, ConsulError

MAX_INPUT = 4 << 20  # a config entry file bigger than this is a mistake, not a config entry


class ConfigCommandError(Exception):
    """A user-facing failure, printed as is on stderr (exit 1)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    p = sub.add_parser("write", help="create or update a config entry from an HCL or JSON file (- for stdin)")
    p.add_argument("file", metavar="FILE", nargs="?")
    _cas_flags(p)
    p = sub.add_parser("read", help="print one config entry as JSON")
    _kind_name(p)
    p = sub.add_parser("list", help="list the names of the config entries of a kind")
    p.add_argument("-kind", "--kind", default="", help="the config entry kind")
    p = sub.add_parser("delete", help="delete a config entry")
    _kind_name(p)
    p.add_argument("-filename", "--filename", default="", help="take kind and name from this entry file")
    _cas_flags(p)


def _kind_name(p: argparse.ArgumentParser) -> None:
    p.add_argument("-kind", "--kind", default="", help="the config entry kind")
    p.add_argument("-name", "--name", default="", help="the config entry name")


def _cas_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-cas", "--cas", action="store_true",
                   help="check-and-set: only if the entry's ModifyIndex is -modify-index (0: create only)")
    p.add_argument("-modify-index", "--modify-index", type=int, default=None, metavar="N",
                   help="the ModifyIndex the entry must have (with -cas)")


def _cas(args: argparse.Namespace) -> int | None:
    if args.modify_index is not None and args.modify_index < 0:
        raise ConfigCommandError("-modify-index must be 0 or more")
    if not args.cas:
        if args.modify_index is not None:
            raise ConfigCommandError("-modify-index is only used with -cas")
        return None
    if args.modify_index is None:
        raise ConfigCommandError("-cas needs -modify-index (0 means: only if the entry does not exist yet)")
    return int(args.modify_index)


def load_source(path: str) -> tuple[str, str]:
    """(text, source name) of FILE or `-` (stdin), bounded in size."""
    if path == "-":
        data = sys.stdin.buffer.read(MAX_INPUT + 1)
        source = "<stdin>"
    else:
        try:
            with Path(path).open("rb") as f:
                data = f.read(MAX_INPUT + 1)
        except OSError as exc:
            raise ConfigCommandError(f"Failed to load data: {path}: {exc.strerror or exc}") from None
        source = path
    if len(data) > MAX_INPUT:
        raise ConfigCommandError(f"Failed to load data: {source} is larger than {MAX_INPUT} bytes")
    try:
        return data.decode(), source
    except UnicodeDecodeError:
        raise ConfigCommandError(f"Failed to load data: {source} is not UTF-8 text") from None


def parse_entry(path: str) -> dict[str, Any]:
    text, source = load_source(path)
    try:
        return configentry.parse(text, source="" if source == "<stdin>" else source)
    except configentry.ConfigEntryFileError as exc:
        raise ConfigCommandError(f"Failed to decode config entry input: {exc}") from None


def _require(value: str, flag: str) -> str:
    if not value:
        raise ConfigCommandError(f"Must specify the -{flag} parameter")
    return value


async def _write(args: argparse.Namespace) -> int:
    if not args.file:
        raise ConfigCommandError("Must provide exactly one positional argument to specify the config entry to write")
    cas = _cas(args)
    entry = parse_entry(args.file)
    kind, name = configentry.kind_and_name(entry)
    async with ConsulClient.from_env() as consul:
        try:
            written = await consul.config_put(entry, cas=cas)
        except (ConsulError, ValueError) as exc:
            raise ConfigCommandError(f"Error writing config entry {kind}/{name}: {_reason(exc)}") from None
    if not written:
        raise ConfigCommandError(f"Config entry not updated: {kind}/{name}")
    print(f"Config entry written: {kind}/{name}")
    return 0


async def _read(args: argparse.Namespace) -> int:
    kind, name = _require(args.kind, "kind"), _require(args.name, "name")
    async with ConsulClient.from_env() as consul:
        try:
            _, entry = await consul.config_get(kind, name)
        except ConsulError as exc:
            raise ConfigCommandError(f"Error reading config entry {kind}/{name}: {_reason(exc)}") from None
    if entry is None:
        raise ConfigCommandError(f'Error reading config entry {kind}/{name}: Unexpected response code: 404 '
                                 f'(Config entry not found for "{kind}" / "{name}")')
    print(json.dumps(entry, indent=4))
    return 0


async def _list(args: argparse.Namespace) -> int:
    kind = _require(args.kind, "kind")
    async with ConsulClient.from_env() as consul:
        try:
            _, entries = await consul.config_list(kind)
        except ConsulError as exc:
            raise ConfigCommandError(f"Error listing config entries for kind {kind}: {_reason(exc)}") from None
    for entry in entries:
        print(configentry.kind_and_name(entry)[1] or entry.get("Name", ""))
    return 0


async def _delete(args: argparse.Namespace) -> int:
    if args.filename:
        if args.kind or args.name:
            raise ConfigCommandError("Cannot specify -kind or -name with -filename")
        kind, name = configentry.kind_and_name(parse_entry(args.filename))
    else:
        kind, name = _require(args.kind, "kind"), _require(args.name, "name")
    cas = _cas(args)
    async with ConsulClient.from_env() as consul:
        try:
            deleted = await consul.config_delete(kind, name, cas=cas)
        except ConsulError as exc:
            raise ConfigCommandError(f"Error deleting config entry {kind}/{name}: {_reason(exc)}") from None
    if not deleted:
        raise ConfigCommandError(f"Config entry not deleted: {kind}/{name}")
    print(f"Config entry deleted: {kind}/{name}")
    return 0


def _reason(exc: Exception) -> str:
    """The agent's own words when it gave some (ConsulError.message), else the error."""
    return getattr(exc, "message", "") or str(exc)


def run(args: argparse.Namespace) -> int:
    actions = {"write": _write, "read": _read, "list": _list, "delete": _delete}
    try:
        return asyncio.run(actions[args.action](args))
    except ConfigCommandError as exc:
        print(str(exc), file=sys.stderr)
        return 1
