"""`weft intention`: manage, list, validate and check intentions.

    weft intention allow|deny SRC DST [--native] [--description TEXT] [--mode enforce|audit]
    weft intention delete SRC DST [--native | --kv]
    weft intention list [DST] [--json]
    weft intention validate FILE [--key weft/intentions/DST]
    weft intention check SRC DST [--grpc-method /pkg.Svc/Method | --http-method GET --path /p]
                                 [--header k=v ...] [--json]

`allow`/`deny` write the KV document `weft/intentions/<DST>` (read-modify-write with `cas`, retried
on a concurrent change; the whole document is validated before it is written), or with `--native`
a Consul native intention through `PUT /v1/connect/intentions/exact`, as the Consul UI does.
`delete` removes the SRC entry from both sources unless `--native`/`--kv` narrows it (a KV document
left without sources is deleted). `check` evaluates what sidecars of DST enforce: the compiled
table in KV (`weft/policy/compiled/<DST>`, else `*`); when no policy service has published tables
yet it compiles both sources locally with `--default-policy` and says so. It prints the decision
and the deciding rule and exits 0 when allowed (audit mode included), 1 when denied, 2 when it cannot tell (bad
arguments, Consul unreachable).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from catalog.client import ConsulClient, ConsulError, ConsulNotFound
from devmesh.state import consul_for_cli
from policies.compile import Compiler, Document, DocumentError, loads_table, parse_entry, validate_document
from policies.evaluate import authorize
from policies.model import (
    INTENTIONS_PREFIX,
    KIND,
    TCP,
    WILDCARD,
    CompiledTable,
    GrpcRequest,
    HttpRequest,
    Request,
    intentions_key,
    table_key_candidates,
)

CAS_RETRIES = 8


class IntentionError(Exception):
    """A user-facing failure: printed as `weft intention: <message>`, exit 1."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    for verb in ("allow", "deny"):
        p = sub.add_parser(verb, help=f"create or replace the intention SRC -> DST with action {verb}")
        p.add_argument("source", metavar="SRC", help="source service name, or *")
        p.add_argument("destination", metavar="DST", help="destination service name, or *")
        p.add_argument("--native", "-native", action="store_true",
                       help="write a Consul native intention (as the Consul UI does) instead of the KV document")
        p.add_argument("--description", "-description", default="", help="free text kept with the intention")
        p.add_argument("--mode", "-mode", choices=("enforce", "audit"), default=None,
                       help="Weft extension (KV documents only): audit allows and logs would-be denials")
    p = sub.add_parser("delete", help="delete the intention SRC -> DST")
    p.add_argument("source", metavar="SRC")
    p.add_argument("destination", metavar="DST")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--native", "-native", action="store_true", help="only the native intention")
    where.add_argument("--kv", "-kv", action="store_true", help="only the KV document's entry")
    p = sub.add_parser("list", help="list intentions from both sources")
    p.add_argument("destination", metavar="DST", nargs="?", help="only intentions to this destination")
    p.add_argument("--json", "-json", action="store_true", help="print JSON")
    p = sub.add_parser("validate", help="validate a service-intentions document (JSON file, - for stdin)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--key", "-key", default="", help="the KV key it is meant for (checks that Name matches)")
    p = sub.add_parser("check", help="what the destination's sidecar decides for SRC (exit 0 allowed, 1 denied)")
    p.add_argument("source", metavar="SRC", help="source service name or SPIFFE ID")
    p.add_argument("destination", metavar="DST")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--grpc-method", "-grpc-method", default="", help="a gRPC call /pkg.Service/Method")
    kind.add_argument("--http-method", "-http-method", default="", help="an HTTP request with this method")
    p.add_argument("--path", "-path", default="", help="the HTTP request's path (default /)")
    p.add_argument("--header", "-header", action="append", default=[], metavar="K=V",
                   help="a request header or gRPC metadata entry (repeatable)")
    p.add_argument("--default-policy", "-default-policy", choices=("deny", "allow"), default="deny",
                   help="default policy when compiling locally (no published tables yet)")
    p.add_argument("--json", "-json", action="store_true", help="print the decision as JSON")


# ----------------------------------------------------------------------------------------------------------
# allow / deny / delete
# ----------------------------------------------------------------------------------------------------------


def _check_name(what: str, name: str) -> None:
    problems = validate_document({"Kind": KIND, "Name": name, "Sources": [{"Name": "x", "Action": "allow"}]}, what)
    if problems:
        raise IntentionError(f"{what} {name!r}: " + problems[0].split(": ", 2)[-1])


def upsert_source(doc: dict[str, Any] | None, destination: str, source: dict[str, Any]) -> dict[str, Any]:
    """The document with ``source`` replacing any entry of the same Name (as Consul's UpsertSourceByName)."""
    out = dict(doc) if doc else {"Kind": KIND, "Name": destination, "Sources": []}
    sources = [s for s in out.get("Sources") or [] if not (isinstance(s, dict) and s.get("Name") == source["Name"])]
    sources.append(source)
    out["Sources"] = sources
    return out


def remove_source(doc: dict[str, Any], source: str) -> tuple[dict[str, Any], bool]:
    sources = doc.get("Sources") or []
    kept = [s for s in sources if not (isinstance(s, dict) and s.get("Name") == source)]
    out = dict(doc)
    out["Sources"] = kept
    return out, len(kept) != len(sources)


async def _read_doc(consul: ConsulClient, key: str) -> tuple[int, dict[str, Any] | None]:
    """(cas index, current document or None). Refuses to edit a document that is not JSON."""
    _, entry = await consul.kv_get(key)
    if entry is None:
        return 0, None
    try:
        doc = json.loads(entry.text() or "null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IntentionError(f"{key}: the stored document is not valid JSON ({exc}); fix or delete it first") from None
    if not isinstance(doc, dict):
        raise IntentionError(f"{key}: the stored document is not a JSON object; fix or delete it first")
    return entry.modify_index, doc


async def write_kv(consul: ConsulClient, source: str, destination: str, action: str, description: str,
                   mode: str | None) -> str:
    key = intentions_key(destination)
    entry: dict[str, Any] = {"Name": source, "Action": action}
    if description:
        entry["Description"] = description
    if mode:
        entry["Mode"] = mode
    for _ in range(CAS_RETRIES):
        index, doc = await _read_doc(consul, key)
        new = upsert_source(doc, destination, entry)
        try:
            parse_entry(json.dumps(new), key, expect_name=destination)
        except DocumentError as exc:
            raise IntentionError("the resulting document would be invalid:\n  " + "\n  ".join(exc.errors)) from None
        if await consul.kv_put(key, json.dumps(new, indent=2) + "\n", cas=index):
            return key
    raise IntentionError(f"{key} kept changing under us ({CAS_RETRIES} cas attempts); try again")


async def write_native(consul: ConsulClient, source: str, destination: str, action: str, description: str) -> str:
    body: dict[str, Any] = {"SourceName": source, "DestinationName": destination, "SourceType": "consul",
                            "Action": action}
    if description:
        body["Description"] = description
    if not await consul.intention_put(source, destination, body):
        raise IntentionError(f"Consul refused the intention {source} -> {destination}")
    return f"native intention {source} -> {destination}"


async def delete_kv(consul: ConsulClient, source: str, destination: str) -> bool:
    key = intentions_key(destination)
    for _ in range(CAS_RETRIES):
        index, doc = await _read_doc(consul, key)
        if doc is None:
            return False
        new, removed = remove_source(doc, source)
        if not removed:
            return False
        if new["Sources"]:
            ok = await consul.kv_put(key, json.dumps(new, indent=2) + "\n", cas=index)
        else:
            ok = await consul.kv_delete(key, cas=index)
        if ok:
            return True
    raise IntentionError(f"{key} kept changing under us ({CAS_RETRIES} cas attempts); try again")


async def delete_native(consul: ConsulClient, source: str, destination: str) -> bool:
    if await consul.intention_get(source, destination) is None:
        return False
    await consul.intention_delete(source, destination)
    return True


# ----------------------------------------------------------------------------------------------------------
# list / check
# ----------------------------------------------------------------------------------------------------------


async def read_sources(consul: ConsulClient) -> list[Document]:
    _, entries = await consul.kv_get_recurse(INTENTIONS_PREFIX)
    docs = [Document.kv(e.key, e.value or b"") for e in entries if not e.key.endswith("/")]
    try:
        _, native = await consul.config_list(KIND)
    except ConsulNotFound:  # an agent without config entries: say so, show the KV documents
        print("weft intention: this agent does not serve native intentions (/v1/config/service-intentions); "
              "showing KV documents only", file=sys.stderr)
        native = ()
    docs += [Document.native(dict(e)) for e in native]
    return docs


def list_rows(docs: list[Document], destination: str | None) -> tuple[list[dict[str, Any]], list[str]]:
    compiled = Compiler("deny").compile(docs)
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str, int]] = set()
    for table in compiled.tables.values():
        for rule in table.rules:
            if destination is not None and rule.destination not in (destination, WILDCARD):
                continue
            ident = (rule.source, rule.destination, rule.origin.ref, rule.origin.index)
            if ident in seen:
                continue
            seen.add(ident)
            rows.append({"Source": rule.source, "Destination": rule.destination, "Precedence": rule.precedence,
                         "Action": rule.action or f"L7 ({len(rule.permissions)} permissions)",
                         "Mode": rule.mode, "Origin": str(rule.origin), "Description": rule.description})
    rows.sort(key=lambda r: (r["Destination"] == WILDCARD, r["Destination"], -r["Precedence"], r["Source"],
                             r["Origin"]))
    problems = [e for err in compiled.errors for e in err.errors] + compiled.warnings
    return rows, problems


def parse_request(args: argparse.Namespace) -> Request:
    headers: dict[str, str] = {}
    for item in args.header:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise IntentionError(f"--header {item!r}: expected NAME=VALUE")
        headers[name.strip().lower()] = value
    if args.grpc_method:
        method = args.grpc_method
        if not method.startswith("/") or method.count("/") != 2:
            raise IntentionError(f"--grpc-method {method!r}: expected /pkg.Service/Method")
        return GrpcRequest(method=method, metadata=headers)
    if args.http_method or args.path:
        path = args.path or "/"
        if not path.startswith("/"):
            raise IntentionError(f"--path {path!r}: must start with '/'")
        return HttpRequest(method=(args.http_method or "GET").upper(), path=path, headers=headers)
    if headers:
        raise IntentionError("--header needs --grpc-method or --http-method/--path")
    return TCP


async def find_table(consul: ConsulClient, destination: str, default_policy: str) -> tuple[CompiledTable, str]:
    """The table sidecars of ``destination`` enforce, and where it came from."""
    for key in table_key_candidates(destination):
        _, entry = await consul.kv_get(key)
        if entry is not None:
            try:
                return loads_table(entry.value or b""), key
            except (ValueError, KeyError, TypeError) as exc:
                raise IntentionError(f"{key}: unreadable compiled table: {exc}") from None
    compiler = Compiler("allow" if default_policy == "allow" else "deny")
    result = compiler.compile(await read_sources(consul))
    table = result.tables.get(destination) or result.tables[WILDCARD]
    return table, f"compiled locally with default policy {default_policy} (no policy service tables in KV)"


# ----------------------------------------------------------------------------------------------------------


async def _run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    async with ConsulClient.from_env(env) as consul:
        if args.action in ("allow", "deny"):
            _check_name("SRC", args.source)
            _check_name("DST", args.destination)
            if args.native:
                if args.mode:
                    raise IntentionError("--mode is a Weft extension stored in KV documents; it cannot be used "
                                         "with --native")
                what = await write_native(consul, args.source, args.destination, args.action, args.description)
            else:
                what = await write_kv(consul, args.source, args.destination, args.action, args.description,
                                      args.mode)
            print(f"{args.action} {args.source} -> {args.destination}: written to {what}")
            return 0
        if args.action == "delete":
            deleted = []
            if not args.native and await delete_kv(consul, args.source, args.destination):
                deleted.append(intentions_key(args.destination))
            if not args.kv and await delete_native(consul, args.source, args.destination):
                deleted.append("native intentions")
            if not deleted:
                print(f"weft intention: no intention {args.source} -> {args.destination}", file=sys.stderr)
                return 1
            print(f"deleted {args.source} -> {args.destination} from " + " and ".join(deleted))
            return 0
        if args.action == "list":
            rows, problems = list_rows(await read_sources(consul), args.destination)
            if args.json:
                print(json.dumps({"Intentions": rows, "Problems": problems}, indent=2))
                return 0
            if not rows:
                print("no intentions")
            for r in rows:
                line = f"{r['Source']:<20} -> {r['Destination']:<20} {r['Action']:<18} {r['Mode']:<8} " \
                       f"prec {r['Precedence']}  {r['Origin']}"
                print(line + (f"  # {r['Description']}" if r["Description"] else ""))
            for p in problems:
                print(f"! {p}", file=sys.stderr)
            return 0
        if args.action == "check":
            request = parse_request(args)
            table, where = await find_table(consul, args.destination, args.default_policy)
            decision = authorize(table, args.source, request)
            if args.json:
                print(json.dumps({**decision.to_json(), "Table": where, "TableVersion": table.version}, indent=2))
            else:
                verdict = "ALLOWED (audit mode: would be denied)" if decision.audited else \
                    ("ALLOWED" if decision.allowed else "DENIED")
                print(f"{verdict}: {args.source} -> {args.destination}")
                print(f"  rule:   {decision.rule_label}")
                print(f"  reason: {decision.reason}")
                print(f"  table:  {where} (version {table.version})")
            return 0 if decision.allowed else 1
    raise IntentionError(f"unknown action {args.action!r}")


def _validate(args: argparse.Namespace) -> int:
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    except OSError as exc:
        print(f"weft intention: {args.file}: cannot read: {exc.strerror}", file=sys.stderr)
        return 1
    ref = args.key or args.file
    errors = validate_document(text, ref)
    if not errors and args.key.startswith(INTENTIONS_PREFIX):
        try:
            parse_entry(text, ref, expect_name=args.key[len(INTENTIONS_PREFIX):])
        except DocumentError as exc:
            errors = exc.errors
    if errors:
        for e in errors:
            print(e, file=sys.stderr)
        return 1
    print(f"{ref}: valid")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "validate":
        return _validate(args)
    failed = 2 if args.action == "check" else 1  # check: 1 means denied
    consul = consul_for_cli("weft intention")
    try:
        return asyncio.run(_run(args, consul.env))
    except (IntentionError, ConsulError, ValueError) as exc:
        print(f"weft intention: {exc}", file=sys.stderr)
        return failed
