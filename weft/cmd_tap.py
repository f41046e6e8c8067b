"""`weft tap SERVICE`: the live calls of a service, from its sidecars' `/tap`, like `linkerd viz tap`.

It finds the service's sidecars in Consul (connect-proxy instances whose registration Meta publishes
`weft-admin-addr`, or the admin URLs a running `weft dev` recorded), opens `/tap` on each with the
filters given, and merges their NDJSON streams: one readable line per call by default, `-o wide`
adds headers and payload previews, `-o json` prints the sidecars' JSON lines as they come (with the
sidecar that saw the call). `-n N` stops after N calls; Ctrl-C stops too.

The sidecars redact before anything leaves them (see `sidecar.tap`); payload previews appear only
with `--payload` and when KV `weft/tap/SERVICE` enables them.

Formatting (`format_line`) and the query (`tap_query`) are pure and unit-tested.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping
from typing import Any

from devmesh.state import ConsulChoice, admin_urls, consul_for_cli
from sidecar.tap import DEFAULT_MAX_RPS, TapError, TapFilter, filter_query, parse_filter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("service", metavar="SERVICE", help="the service whose sidecars to tap (both directions)")
    parser.add_argument("-method", "--method", default=None, metavar="M",
                        help="only calls whose gRPC method or HTTP path starts with M (e.g. /demo.v1.Greeter/)")
    parser.add_argument("-source", "--source", default=None, metavar="S", help="only calls from service S")
    parser.add_argument("-to", "--to", default=None, metavar="DST", help="only calls to service DST")
    parser.add_argument("-direction", "--direction", default=None, choices=("inbound", "outbound"),
                        help="only calls into SERVICE (inbound) or made by it (outbound)")
    parser.add_argument("-status", "--status", default=None, help="only calls with this status (OK, 503, 5xx, ...)")
    parser.add_argument("-min-ms", "--min-ms", type=float, default=0.0, help="only calls slower than this")
    parser.add_argument("-payload", "--payload", action="store_true",
                        help="include payload previews (when KV weft/tap/SERVICE enables them)")
    parser.add_argument("-n", "--n", type=int, default=None, metavar="N", help="stop after N calls")
    parser.add_argument("-max-rps", "--max-rps", type=float, default=DEFAULT_MAX_RPS,
                        help="calls per second each sidecar records for this tap at most (0: no cap); the rest "
                             "are counted as skipped")
    parser.add_argument("-o", "--output", default="line", choices=("line", "wide", "json"),
                        help="one line per call (default), wide (headers and payloads too), or json")
    parser.add_argument("-target", "--target", action="append", default=[], metavar="URL",
                        help="a sidecar admin URL to tap (repeatable); default: SERVICE's sidecars in Consul")
    parser.add_argument("-state-dir", "--state-dir", default=None,
                        help="a running `weft dev`'s state dir (where to find Consul and admin URLs)")


# ---------------------------------------------------------------------------------------------------
# Pure

def tap_filter(args: argparse.Namespace) -> TapFilter:
    """The filter the flags ask for, checked as the sidecars check it (TapError naming a bad one)."""
    if args.n is not None and args.n < 1:
        raise TapError("-n must be at least 1")
    flt = TapFilter(direction=args.direction, source=args.source, destination=args.to, method=args.method,
                    status=args.status, min_ms=args.min_ms, limit=args.n, payload=args.payload,
                    max_rps=args.max_rps)
    return parse_filter(filter_query(flt))  # the same validation a sidecar applies


def _short(value: Any, width: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= width else text[:width - 1] + "…"


def _payload(side: Mapping[str, Any]) -> str:
    parts = []
    for m in side.get("messages", []) or []:
        body = m.get("json", m.get("text", m.get("base64", "")))
        parts.append(_short(body) + (" (truncated)" if m.get("truncated") else ""))
    if "body" in side:
        b = side["body"]
        parts.append(_short(b.get("json", b.get("text", b.get("base64", "")))) + (" (truncated)" if b.get("truncated")
                                                                                  else ""))
    return " | ".join(parts)


def format_line(rec: Mapping[str, Any], *, wide: bool = False, sidecar: str = "") -> str:
    """One call as one line (`wide`: plus headers, trailers and payload previews on indented lines)."""
    if "dropped" in rec and "method" not in rec:
        return f"! {sidecar or 'a sidecar'} dropped {rec['dropped']} call(s): this tap read too slowly"
    if "skipped" in rec and "method" not in rec:
        return f"! {sidecar or 'a sidecar'} skipped {rec['skipped']} call(s) above --max-rps {rec.get('max_rps')}"
    ts = str(rec.get("ts", ""))[11:23]
    arrow = "<-" if rec.get("direction") == "inbound" else "->"
    who = f"{rec.get('destination')} {arrow} {rec.get('source')}" if rec.get("direction") == "inbound" else \
        f"{rec.get('source')} {arrow} {rec.get('destination')}"
    what = rec.get("path") or rec.get("method", "")
    line = f"{ts} {rec.get('direction', ''):<8} {who}  {what}  {rec.get('status', '')}  " \
           f"{float(rec.get('duration_ms', 0.0)):.1f}ms"
    if not wide:
        return line
    out = [line]
    req, resp = rec.get("request", {}), rec.get("response", {})
    out.append(f"    request headers:  {_short(req.get('headers', {}), 400)}")
    if req and _payload(req):
        out.append(f"    request payload:  {_payload(req)}")
    out.append(f"    response headers: {_short(resp.get('headers', {}), 400)}")
    if resp.get("trailers"):
        out.append(f"    trailers:         {_short(resp['trailers'], 400)}")
    if resp and _payload(resp):
        out.append(f"    response payload: {_payload(resp)}")
    if rec.get("payload"):
        out.append(f"    payload: {rec['payload']}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# I/O

async def find_sidecars(service: str, consul: ConsulChoice) -> tuple[list[str], list[str]]:
    """The admin URLs of SERVICE's sidecars, and the problems met."""
    from weft.cmd_top import discover_targets

    found, problems = await discover_targets(admin_urls(consul), consul.env)
    return [t.url for t in found if t.service == service], [p for p in problems if service in p]


async def _stream(session: Any, url: str, query: str, out: asyncio.Queue[tuple[str, dict[str, Any] | str]]) -> None:
    import aiohttp

    try:
        async with session.get(f"{url}/tap?{query}", timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)) as r:
            if r.status != 200:
                await out.put((url, f"{url}/tap answered {r.status}: {(await r.text())[:300].strip()}"))
                return
            async for raw in r.content:
                if raw.strip():
                    try:
                        await out.put((url, json.loads(raw)))
                    except ValueError:
                        await out.put((url, f"{url}: not a JSON line: {raw[:120]!r}"))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        await out.put((url, f"{url}: {type(exc).__name__}: {exc}"))
    finally:
        await out.put((url, ""))  # this stream ended


async def _main(args: argparse.Namespace, stop: asyncio.Event, consul: ConsulChoice | None) -> int:
    import aiohttp

    from catalog.client import ConsulError

    flt = tap_filter(args)
    if args.target:
        urls = [t.rstrip("/") for t in args.target]
        problems: list[str] = []
    else:
        assert consul is not None
        try:
            urls, problems = await find_sidecars(args.service, consul)
        except ConsulError as exc:
            print(f"weft tap: {exc}", file=sys.stderr)
            return 1
    if not urls:
        print(f"weft tap: no sidecar of {args.service!r} publishes an admin address (is it registered with a "
              "sidecar? use -target URL)", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"weft tap: tapping {len(urls)} sidecar(s) of {args.service}: {', '.join(urls)}", file=sys.stderr)
    queue: asyncio.Queue[tuple[str, dict[str, Any] | str]] = asyncio.Queue()
    seen = 0
    failed = 0
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.ensure_future(_stream(session, u, filter_query(flt), queue)) for u in urls]
        stopper = asyncio.ensure_future(stop.wait())
        open_streams = len(tasks)
        try:
            while open_streams and (args.n is None or seen < args.n):
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait((getter, stopper), return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                url, item = getter.result()
                if item == "":
                    open_streams -= 1
                    continue
                if isinstance(item, str):
                    failed += 1
                    print(f"weft tap: {item}", file=sys.stderr)
                    continue
                if "method" in item:
                    seen += 1
                if args.output == "json":
                    print(json.dumps({**item, "sidecar": url}, separators=(",", ":")), flush=True)
                else:
                    print(format_line(item, wide=args.output == "wide", sidecar=url), flush=True)
        finally:
            stopper.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return 1 if failed == len(urls) and seen == 0 else 0


def run(args: argparse.Namespace) -> int:
    try:
        tap_filter(args)
    except TapError as exc:
        print(f"weft tap: {exc}", file=sys.stderr)
        return 2
    from weft import runner

    consul = None if args.target else consul_for_cli("weft tap", args.state_dir)
    return runner.run(lambda stop: _main(args, stop, consul))
