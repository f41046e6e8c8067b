"""`weft register FILE...`: register Consul service definitions (HCL or JSON) with the local agent.

The files are what Consul users already write (`service { name, port, meta, check, connect {
sidecar_service { proxy { upstreams = [...] } } } }`, or `services = [...]`); they are parsed and
checked by `catalog.servicedef` and sent to `PUT /v1/agent/service/register` of the agent at
`CONSUL_HTTP_ADDR` (token from `CONSUL_HTTP_TOKEN`), as `consul services register FILE` does (a
directory stands for its .hcl and .json files). The
agent expands `connect.sidecar_service` into the `<id>-sidecar-proxy` registration; start the sidecar
with `weft sidecar --sidecar-for <id>`. Every file is checked before anything is registered.
`-deregister` removes the services the files define instead.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from catalog.client import ConsulClient, ConsulError
from catalog.servicedef import ServiceDefinitionError, parse, upstreams_of
from devmesh.state import consul_for_cli


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="service definition files (.hcl or .json), or directories of them")
    parser.add_argument("-replace-existing-checks", "--replace-existing-checks", action="store_true",
                        help="drop checks of an earlier registration that the file no longer declares")
    parser.add_argument("-deregister", "--deregister", action="store_true",
                        help="deregister the services the files define (and their sidecar registrations)")
    parser.add_argument("-check", "--check", action="store_true",
                        help="only parse and check the files; print the register payloads as JSON")


def expand(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given; a directory stands for its *.hcl and *.json files (sorted), as Consul's config dir."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".hcl", ".json") and p.is_file())
            if not found:
                raise ServiceDefinitionError("", "no .hcl or .json files in this directory", str(path))
            out.extend(found)
        else:
            out.append(path)
    return out


def load_files(paths: Sequence[str | Path]) -> list[tuple[Path, dict[str, Any]]]:
    """Parse every file (raising on the first bad one); returns (file, payload) in order."""
    out: list[tuple[Path, dict[str, Any]]] = []
    for path in expand(paths):
        try:
            text = path.read_text()
        except OSError as exc:
            raise ServiceDefinitionError("", f"cannot read: {exc.strerror}", str(path)) from None
        out.extend((path, payload) for payload in parse(text, source=str(path)))
    return out


def describe(payload: dict[str, Any]) -> str:
    sid = payload.get("ID") or payload["Name"]
    parts = [f"service {payload['Name']} (id {sid}, port {payload.get('Port', '-')})"]
    sidecar = (payload.get("Connect") or {}).get("SidecarService")
    if sidecar is not None:
        ups = ", ".join(f"{u['DestinationName']}->{u.get('LocalBindAddress', '127.0.0.1')}:{u['LocalBindPort']}"
                        for u in upstreams_of(payload))
        parts.append(f"sidecar {sidecar.get('ID', sid + '-sidecar-proxy')}" + (f" [upstreams {ups}]" if ups else ""))
    return "; ".join(parts)


async def _apply(loaded: list[tuple[Path, dict[str, Any]]], args: argparse.Namespace,
                 env: Mapping[str, str] | None = None) -> int:
    async with ConsulClient.from_env(env) as consul:
        for path, payload in loaded:
            sid = payload.get("ID") or payload["Name"]
            if args.deregister:
                sidecar = (payload.get("Connect") or {}).get("SidecarService")
                if sidecar is not None:
                    await consul.agent_service_deregister(sidecar.get("ID") or f"{sid}-sidecar-proxy")
                await consul.agent_service_deregister(sid)
                print(f"deregistered {sid} ({path})")
            else:
                await consul.agent_service_register(payload, replace_existing_checks=args.replace_existing_checks)
                print(f"registered {describe(payload)} ({path}) at {consul.address}")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        loaded = load_files(args.files)
    except ServiceDefinitionError as exc:
        print(f"weft register: {exc}", file=sys.stderr)
        return 1
    if args.check:
        import json

        print(json.dumps([payload for _, payload in loaded], indent=2))
        return 0
    consul = consul_for_cli("weft register")
    try:
        return asyncio.run(_apply(loaded, args, consul.env))
    except (ConsulError, ValueError) as exc:
        print(f"weft register: {exc}", file=sys.stderr)
        return 1
