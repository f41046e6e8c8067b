"""`weft systemd-unit agent|ca|policy|sidecar [options] [-arg=ARG ...]`: print a systemd unit.

For running Weft on VMs next to a real Consul agent. The unit runs the `weft` binary given with
`-weft` (default: the one running this command) as an unprivileged user (`-user`, default `weft`,
which must exist), restarts it on failure, stops it with SIGTERM (every Weft process shuts down
cleanly on it) and sets `CONSUL_HTTP_ADDR` in its environment. Tokens and keys never go into the unit
itself (unit files are world-readable), and the unprivileged user never needs to read them where
they lie: `-token-file` and `-kek-file` become systemd credentials (`LoadCredential=`, systemd 248
or newer), which systemd reads as root (the files stay root-owned, mode 0600) and hands to the
process in its own credentials directory (`%d`): `CONSUL_HTTP_TOKEN_FILE=%d/consul-token`,
`--kek-file %d/kek`. `-env-file` is read by systemd as root too.

    weft systemd-unit ca -kek-file /etc/weft/kek > /etc/systemd/system/weft-ca.service
    weft systemd-unit sidecar > /etc/systemd/system/weft-sidecar@.service   # a template: one per service ID
    systemctl enable --now weft-sidecar@web-1

The sidecar template runs one sidecar per service ID on the host, so each instance needs its own
admin port: the template passes `--admin-port 0` (a free port, published in the sidecar's Consul
registration as Meta `weft-admin-addr`, where `weft status` and `weft top` find it), and an optional
per-instance file `/etc/weft/sidecar/<ID>.env` may set `WEFT_SIDECAR_ARGS` (e.g.
`WEFT_SIDECAR_ARGS=--admin-port 19001` for a fixed one) and the instance's own `CONSUL_HTTP_TOKEN`.

Generation is pure text (`render`), tested without systemd.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PROCESSES = ("agent", "ca", "policy", "sidecar")
_DESCRIPTIONS = {
    "agent": "Weft embedded Consul-compatible agent",
    "ca": "Weft certificate authority",
    "policy": "Weft policy service",
    "sidecar": "Weft sidecar",
}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_ENV = ("CONSUL_HTTP_TOKEN", "WEFT_CA_KEK")
_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.@\\-]+\.(service|target|socket|mount)$")
TOKEN_CREDENTIAL = "consul-token"
KEK_CREDENTIAL = "kek"
SIDECAR_INSTANCE_ENV_DIR = "/etc/weft/sidecar"
SIDECAR_ARGS_VARIABLE = "WEFT_SIDECAR_ARGS"


class UnitError(ValueError):
    """Options that do not make a valid unit; the message names the option."""


@dataclass(frozen=True)
class UnitSpec:
    process: str
    weft: str = "/usr/local/bin/weft"
    user: str = "weft"
    group: str = ""
    consul_addr: str = ""
    token_file: str = ""
    env: tuple[tuple[str, str], ...] = ()
    env_file: str = ""
    description: str = ""
    # agent
    data_dir: str = ""
    http_port: int = 0
    client: str = ""
    # ca and policy
    listen: str = ""
    advertise: str = ""
    # ca
    kek_file: str = ""
    dev: bool = False
    # sidecar
    sidecar_for: str = ""
    admin_port: int = 0
    app_unit: str = ""
    extra_args: tuple[str, ...] = field(default=())


def unit_name(spec: UnitSpec) -> str:
    """The file name to install the unit as (a template `weft-sidecar@.service` without -sidecar-for)."""
    if spec.process == "sidecar":
        return f"weft-sidecar-{spec.sidecar_for}.service" if spec.sidecar_for else "weft-sidecar@.service"
    return f"weft-{spec.process}.service"


def _quote(arg: str, what: str, *, exec_line: bool = True) -> str:
    """One word of a systemd command line (or one Environment= assignment): `%` specifiers escaped,
    `$` escaped on command lines (where systemd expands variables), quoted when it has spaces or quotes."""
    if any(c in arg for c in "\n\r\0"):
        raise UnitError(f"{what}: line breaks and NUL are not allowed in a unit, got {arg!r}")
    escaped = arg.replace("%", "%%")
    if exec_line:
        escaped = escaped.replace("$", "$$")
    if escaped and not re.search(r"[\s\"'\\;]", escaped):
        return escaped
    escaped = escaped.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _abs(path: str, what: str) -> str:
    if not path.startswith("/"):
        raise UnitError(f"{what}: must be an absolute path, got {path!r}")
    return path


def command_line(spec: UnitSpec) -> list[str]:
    """The process's arguments (unquoted)."""
    p = spec.process
    args: list[str] = [spec.weft]
    if p == "agent":
        args += ["agent", "-dev"]
        if spec.http_port:
            args += ["-http-port", str(spec.http_port)]
        if spec.client:
            args += ["-client", spec.client]
        if spec.data_dir:
            args += ["-data-dir", spec.data_dir]
    elif p == "ca":
        args += ["ca", "serve"]
        if spec.dev:
            args.append("-dev")
        if spec.kek_file:  # the credential systemd copies from spec.kek_file (see render)
            args += ["--kek-file", f"%d/{KEK_CREDENTIAL}"]
        if spec.listen:
            args += ["--listen", spec.listen]
        if spec.advertise:
            args += ["--advertise", spec.advertise]
    elif p == "policy":
        args += ["policy", "serve"]
        if spec.listen:
            args += ["-grpc-addr", spec.listen]
        if spec.advertise:
            args += ["-advertise-addr", spec.advertise]
    elif p == "sidecar":
        args += ["sidecar", "--sidecar-for", spec.sidecar_for or "%i"]
        if spec.admin_port:
            args += ["--admin-port", str(spec.admin_port)]
        elif not spec.sidecar_for:  # a template: several instances on one host, each on a free admin port
            args += ["--admin-port", "0"]
    return args + list(spec.extra_args)


def validate(spec: UnitSpec) -> None:
    p = spec.process
    if p not in PROCESSES:
        raise UnitError(f"process: expected one of {', '.join(PROCESSES)}, got {p!r}")
    _abs(spec.weft, "-weft")
    for name, value, allowed in (("-data-dir", spec.data_dir, "agent"), ("-http-port", spec.http_port, "agent"),
                                 ("-client", spec.client, "agent"), ("-kek-file", spec.kek_file, "ca"),
                                 ("-dev", spec.dev, "ca"), ("-sidecar-for", spec.sidecar_for, "sidecar"),
                                 ("-admin-port", spec.admin_port, "sidecar"), ("-app-unit", spec.app_unit, "sidecar")):
        if value and p != allowed:
            raise UnitError(f"{name}: only for `weft systemd-unit {allowed}`, not {p}")
    for name, value in (("-listen", spec.listen), ("-advertise", spec.advertise)):
        if value and p not in ("ca", "policy"):
            raise UnitError(f"{name}: only for `weft systemd-unit ca` or `policy`, not {p}")
    if spec.listen and not _hostport(spec.listen):
        raise UnitError(f"-listen: expected host:port, got {spec.listen!r}")
    if spec.advertise and p == "ca" and not _hostport(spec.advertise):
        raise UnitError(f"-advertise: the CA advertises host:port, got {spec.advertise!r}")
    if spec.advertise and p == "policy" and _hostport(spec.advertise):
        raise UnitError(f"-advertise: the policy service advertises an address (its port is the -listen port), "
                        f"got {spec.advertise!r}")
    if p == "sidecar" and spec.admin_port and not spec.sidecar_for:
        raise UnitError(f"-admin-port: the template unit runs one sidecar per service on this host and they cannot "
                        f"share a port; leave it out (each instance takes a free one and publishes it in Consul), "
                        f"set {SIDECAR_ARGS_VARIABLE}=--admin-port N in {SIDECAR_INSTANCE_ENV_DIR}/<ID>.env, "
                        f"or give -sidecar-for for a unit of one service")
    for name, port in (("-http-port", spec.http_port), ("-admin-port", spec.admin_port)):
        if port and not 0 < port < 65536:
            raise UnitError(f"{name}: must be 1..65535, got {port}")
    for name, path in (("-token-file", spec.token_file), ("-env-file", spec.env_file),
                       ("-kek-file", spec.kek_file), ("-data-dir", spec.data_dir)):
        if path:
            _abs(path, name)
    if p == "ca" and not spec.kek_file and not spec.dev and not spec.env_file:
        raise UnitError("-kek-file: the CA refuses to start without a key-encryption key; give -kek-file "
                        "(or -env-file with WEFT_CA_KEK), or -dev for a throw-away CA")
    for key, _ in spec.env:
        if not _ENV_NAME.match(key):
            raise UnitError(f"-env: {key!r} is not a valid environment variable name")
        if key in _SECRET_ENV:
            raise UnitError(f"-env: {key} is a secret and unit files are world-readable; put it in -env-file "
                            "(mode 0600) or use -token-file / -kek-file")
    if spec.sidecar_for and not re.match(r"^[A-Za-z0-9_.:-]+$", spec.sidecar_for):
        raise UnitError(f"-sidecar-for: {spec.sidecar_for!r} is not a service ID")
    if spec.app_unit and not _UNIT_NAME.match(spec.app_unit):
        raise UnitError(f"-app-unit: expected a unit name such as web.service, got {spec.app_unit!r}")
    if not re.match(r"^[a-z_][a-z0-9_-]*$", spec.user):
        raise UnitError(f"-user: {spec.user!r} is not a user name")
    if spec.group and not re.match(r"^[a-z_][a-z0-9_-]*$", spec.group):
        raise UnitError(f"-group: {spec.group!r} is not a group name")


def _hostport(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def render(spec: UnitSpec) -> str:
    """The unit file's text."""
    validate(spec)
    p = spec.process
    desc = spec.description or _DESCRIPTIONS[p] + (f" for {spec.sidecar_for or '%i'}" if p == "sidecar" else "")
    after = ["network-online.target", "consul.service"]
    unit = [
        "[Unit]",
        f"Description={desc.replace('%', '%%') if p != 'sidecar' or spec.sidecar_for else desc}",
        "Wants=network-online.target",
    ]
    if p == "sidecar" and spec.app_unit:  # like Nomad's prestart sidecar: up before the app, stops with it
        unit.append(f"Before={spec.app_unit}")
        unit.append(f"PartOf={spec.app_unit}")
    unit.append("After=" + " ".join(after))
    if p == "sidecar":
        unit.append("# The app's unit may add Wants= for this one; the sidecar's checks pass once the app is up.")
    unit.append("")

    service = ["[Service]", "Type=exec", f"User={spec.user}"]
    if spec.group:
        service.append(f"Group={spec.group}")
    # secrets: systemd (as root) copies each file into the service's private credentials directory, %d
    if spec.token_file:
        service.append(f"LoadCredential={TOKEN_CREDENTIAL}:{spec.token_file}")
    if spec.kek_file:
        service.append(f"LoadCredential={KEK_CREDENTIAL}:{spec.kek_file}")
    env: list[tuple[str, str]] = [("PYTHONUNBUFFERED", "1")]
    if spec.consul_addr:
        env.append(("CONSUL_HTTP_ADDR", spec.consul_addr))
    env.extend(spec.env)
    for key, value in env:
        service.append("Environment=" + _quote(f"{key}={value}", f"-env {key}", exec_line=False))
    if spec.token_file:
        service.append(f"Environment=CONSUL_HTTP_TOKEN_FILE=%d/{TOKEN_CREDENTIAL}")
    if spec.env_file:
        service.append(f"EnvironmentFile={spec.env_file}")
    template = p == "sidecar" and not spec.sidecar_for
    if template:  # optional ("-"): per-instance settings, e.g. a fixed admin port or the instance's own token
        service.append(f"EnvironmentFile=-{SIDECAR_INSTANCE_ENV_DIR}/%i.env")
    words = command_line(spec)
    live = {"%i"} if template else set()  # specifiers that must stay specifiers
    if spec.kek_file:
        live.add(f"%d/{KEK_CREDENTIAL}")
    quoted = [w if w in live else _quote(w, "argument") for w in words]
    if template:  # zero or more words from the instance's file ($VAR unquoted: split on whitespace)
        quoted.append(f"${SIDECAR_ARGS_VARIABLE}")
    service.append("ExecStart=" + " ".join(quoted))
    service += [
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        "TimeoutStopSec=30",
        "Restart=on-failure",
        "RestartSec=2",
        "LimitNOFILE=65536",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
    ]
    if p == "agent" and spec.data_dir:
        service.append(f"ReadWritePaths={spec.data_dir}")
    if p == "agent" and not spec.data_dir:
        service.append("# no -data-dir: state is in memory and lost on restart (a dev agent)")
    service.append("")
    install = ["[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(unit + service + install)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("process", choices=PROCESSES, help="which Weft process the unit runs")
    parser.add_argument("-weft", "--weft", default=_default_weft(), help="absolute path of the weft executable")
    parser.add_argument("-user", "--user", default="weft", help="user to run as (default weft)")
    parser.add_argument("-group", "--group", default="", help="group to run as")
    parser.add_argument("-consul-addr", "--consul-addr", default="",
                        help="CONSUL_HTTP_ADDR for the process (default: Consul's own, 127.0.0.1:8500)")
    parser.add_argument("-token-file", "--token-file", default="",
                        help="CONSUL_HTTP_TOKEN_FILE: a file with the ACL token")
    parser.add_argument("-env", "--env", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra environment variable (repeatable; not for secrets)")
    parser.add_argument("-env-file", "--env-file", default="", help="an EnvironmentFile= (for secrets, mode 0600)")
    parser.add_argument("-description", "--description", default="", help="the unit's Description=")
    parser.add_argument("-data-dir", "--data-dir", default="", help="agent: keep state in this directory")
    parser.add_argument("-http-port", "--http-port", type=int, default=0, help="agent: HTTP port")
    parser.add_argument("-client", "--client", default="", help="agent: bind address")
    parser.add_argument("-listen", "--listen", default="",
                        help="ca, policy: gRPC listen address host:port (default: theirs, on loopback)")
    parser.add_argument("-advertise", "--advertise", default="",
                        help="address registered in Consul: ca host:port, policy host (default: the listen address)")
    parser.add_argument("-kek-file", "--kek-file", default="", help="ca: the key-encryption key file")
    parser.add_argument("-dev", "--dev", action="store_true", help="ca: a throw-away CA without a KEK")
    parser.add_argument("-sidecar-for", "--sidecar-for", default="",
                        help="sidecar: the service ID (default: a template unit, weft-sidecar@<ID>)")
    parser.add_argument("-admin-port", "--admin-port", type=int, default=0, help="sidecar: admin port")
    parser.add_argument("-app-unit", "--app-unit", default="",
                        help="sidecar: the app's unit; the sidecar stops and restarts with it")
    parser.add_argument("-arg", "--arg", action="append", default=[], dest="extra", metavar="ARG",
                        help="one more argument for the process (repeatable; write flags as -arg=--flag)")


def _default_weft() -> str:
    candidate = Path(sys.executable).absolute().parent / "weft"
    return str(candidate) if candidate.exists() else "/usr/local/bin/weft"


def spec_from_args(args: argparse.Namespace) -> UnitSpec:
    env: list[tuple[str, str]] = []
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise UnitError(f"-env: expected KEY=VALUE, got {item!r}")
        env.append((key, value))
    extra: Sequence[str] = args.extra
    return UnitSpec(process=args.process, weft=args.weft, user=args.user, group=args.group,
                    consul_addr=args.consul_addr, token_file=args.token_file, env=tuple(env),
                    env_file=args.env_file, description=args.description, data_dir=args.data_dir,
                    http_port=args.http_port, client=args.client, listen=args.listen, advertise=args.advertise,
                    kek_file=args.kek_file, dev=args.dev,
                    sidecar_for=args.sidecar_for, admin_port=args.admin_port, app_unit=args.app_unit,
                    extra_args=tuple(extra))


def run(args: argparse.Namespace) -> int:
    try:
        spec = spec_from_args(args)
        text = render(spec)
    except UnitError as exc:
        print(f"weft systemd-unit: {exc}", file=sys.stderr)
        return 2
    print(f"# {unit_name(spec)}: generated by `weft systemd-unit {spec.process}`")
    sys.stdout.write(text)
    return 0
