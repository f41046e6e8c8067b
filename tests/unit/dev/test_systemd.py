"""`weft systemd-unit`: pure text generation of systemd units."""

from __future__ import annotations

import argparse
import configparser
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from weft import cmd_systemd
from weft.cmd_systemd import UnitError, UnitSpec, render, unit_name


def _parse_unit(text: str) -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser(strict=False, comment_prefixes=("#",), interpolation=None)
    cp.optionxform = str  # type: ignore[assignment, method-assign]
    cp.read_string(text)
    return cp


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cmd_systemd.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_ca_unit_runs_ca_serve_with_the_kek_file_and_consul_settings() -> None:
    spec = cmd_systemd.spec_from_args(_args("ca", "-weft", "/opt/weft/bin/weft", "-kek-file", "/etc/weft/kek",
                                            "-consul-addr", "10.0.0.5:8500", "-token-file", "/etc/weft/token"))
    unit = _parse_unit(render(spec))
    exec_start = unit["Service"]["ExecStart"]
    # secrets are systemd credentials: read by systemd as root, handed to the unprivileged process in %d
    assert shlex.split(exec_start) == ["/opt/weft/bin/weft", "ca", "serve", "--kek-file", "%d/kek"]
    text = render(spec)
    assert "Environment=CONSUL_HTTP_ADDR=10.0.0.5:8500" in text
    assert "LoadCredential=consul-token:/etc/weft/token" in text
    assert "LoadCredential=kek:/etc/weft/kek" in text
    assert "Environment=CONSUL_HTTP_TOKEN_FILE=%d/consul-token" in text
    assert unit["Service"]["User"] == "weft"
    assert unit["Service"]["KillSignal"] == "SIGTERM"
    assert unit["Service"]["Restart"] == "on-failure"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert unit_name(spec) == "weft-ca.service"


def test_sidecar_without_an_id_is_a_template_unit() -> None:
    spec = UnitSpec(process="sidecar", token_file="/etc/weft/sidecar/%i.token")
    text = render(spec)
    assert unit_name(spec) == "weft-sidecar@.service"
    exec_start = _parse_unit(text)["Service"]["ExecStart"]
    # one instance per service on a host: each on a free admin port (published in Consul), or its own
    # from /etc/weft/sidecar/<ID>.env; and each with its own token
    assert shlex.split(exec_start)[1:] == ["sidecar", "--sidecar-for", "%i", "--admin-port", "0",
                                           "$WEFT_SIDECAR_ARGS"]
    assert "EnvironmentFile=-/etc/weft/sidecar/%i.env" in text
    assert "LoadCredential=consul-token:/etc/weft/sidecar/%i.token" in text
    assert "Description=Weft sidecar for %i" in text


def test_a_template_refuses_one_admin_port_for_every_instance() -> None:
    with pytest.raises(UnitError, match="-admin-port: the template unit runs one sidecar per service"):
        render(UnitSpec(process="sidecar", admin_port=19000))


def test_sidecar_for_one_service_starts_before_its_app_and_stops_with_it() -> None:
    spec = UnitSpec(process="sidecar", sidecar_for="web-1", app_unit="web.service")
    unit = _parse_unit(render(spec))
    assert unit["Unit"]["Before"] == "web.service"
    assert unit["Unit"]["PartOf"] == "web.service"
    assert "--sidecar-for web-1" in unit["Service"]["ExecStart"]
    assert unit_name(spec) == "weft-sidecar-web-1.service"


def test_ca_and_policy_listen_on_the_network_for_other_vms() -> None:
    ca = _parse_unit(render(UnitSpec(process="ca", kek_file="/k", listen="0.0.0.0:8553",
                                     advertise="10.0.0.5:8553")))
    assert shlex.split(ca["Service"]["ExecStart"])[3:] == [
        "--kek-file", "%d/kek", "--listen", "0.0.0.0:8553", "--advertise", "10.0.0.5:8553"]
    policy = _parse_unit(render(UnitSpec(process="policy", listen="0.0.0.0:8507", advertise="10.0.0.5")))
    assert shlex.split(policy["Service"]["ExecStart"])[3:] == [
        "-grpc-addr", "0.0.0.0:8507", "-advertise-addr", "10.0.0.5"]


def test_agent_and_policy_command_lines() -> None:
    agent = _parse_unit(render(UnitSpec(process="agent", http_port=8500, client="0.0.0.0",
                                        data_dir="/var/lib/weft")))
    assert shlex.split(agent["Service"]["ExecStart"])[1:] == [
        "agent", "-dev", "-http-port", "8500", "-client", "0.0.0.0", "-data-dir", "/var/lib/weft"]
    assert agent["Service"]["ReadWritePaths"] == "/var/lib/weft"
    policy = _parse_unit(render(UnitSpec(process="policy", extra_args=("-default-policy", "deny"))))
    assert shlex.split(policy["Service"]["ExecStart"])[1:] == ["policy", "serve", "-default-policy", "deny"]


def test_specifiers_and_variables_are_escaped() -> None:
    text = render(UnitSpec(process="policy", env=(("GREETING", "50% $off"),), extra_args=("a b", "$HOME", "x%y")))
    assert 'Environment="GREETING=50%% $off"' in text
    assert 'ExecStart=/usr/local/bin/weft policy serve "a b" $$HOME x%%y' in text


@pytest.mark.parametrize(("spec", "words"), [
    (UnitSpec(process="ca"), "-kek-file: the CA refuses to start"),
    (UnitSpec(process="agent", kek_file="/k"), "-kek-file: only for `weft systemd-unit ca`"),
    (UnitSpec(process="policy", sidecar_for="x"), "-sidecar-for: only for"),
    (UnitSpec(process="nope"), "process: expected one of"),
    (UnitSpec(process="policy", weft="weft"), "-weft: must be an absolute path"),
    (UnitSpec(process="policy", token_file="token"), "-token-file: must be an absolute path"),
    (UnitSpec(process="policy", env=(("CONSUL_HTTP_TOKEN", "s3cret"),)), "-env: CONSUL_HTTP_TOKEN is a secret"),
    (UnitSpec(process="policy", env=(("1BAD", "x"),)), "not a valid environment variable name"),
    (UnitSpec(process="policy", extra_args=("a\nb",)), "line breaks"),
    (UnitSpec(process="sidecar", sidecar_for="web-1", admin_port=70000), "-admin-port: must be 1..65535"),
    (UnitSpec(process="sidecar", app_unit="web"), "-app-unit: expected a unit name"),
    (UnitSpec(process="sidecar", sidecar_for="a b"), "is not a service ID"),
    (UnitSpec(process="policy", user="Root User"), "-user"),
    (UnitSpec(process="sidecar", listen="0.0.0.0:1"), "-listen: only for"),
    (UnitSpec(process="ca", kek_file="/k", advertise="10.0.0.5"), "-advertise: the CA advertises host:port"),
    (UnitSpec(process="policy", advertise="10.0.0.5:8507"), "-advertise: the policy service advertises an address"),
    (UnitSpec(process="ca", kek_file="/k", listen="8553"), "-listen: expected host:port"),
])
def test_bad_options_are_refused_naming_the_option(spec: UnitSpec, words: str) -> None:
    with pytest.raises(UnitError, match=words.replace("(", r"\(").replace("`", "`")):
        render(spec)


def test_secret_never_lands_in_the_unit() -> None:
    text = render(UnitSpec(process="ca", kek_file="/etc/weft/kek", token_file="/etc/weft/token",
                           env_file="/etc/weft/ca.env"))
    assert "EnvironmentFile=/etc/weft/ca.env" in text
    assert "CONSUL_HTTP_TOKEN=" not in text


def test_env_option_needs_key_value() -> None:
    with pytest.raises(UnitError, match="expected KEY=VALUE"):
        cmd_systemd.spec_from_args(_args("policy", "-env", "NOEQUALS"))


@pytest.mark.parametrize(("spec", "module_name"), [
    (UnitSpec(process="agent", http_port=8500, client="0.0.0.0", data_dir="/var/lib/weft"), "cmd_agent"),
    (UnitSpec(process="ca", kek_file="/etc/weft/kek"), "cmd_ca"),
    (UnitSpec(process="ca", dev=True), "cmd_ca"),
    (UnitSpec(process="ca", kek_file="/k", listen="0.0.0.0:8553", advertise="10.0.0.5:8553"), "cmd_ca"),
    (UnitSpec(process="policy"), "cmd_policy"),
    (UnitSpec(process="policy", listen="0.0.0.0:8507", advertise="10.0.0.5"), "cmd_policy"),
    (UnitSpec(process="sidecar", sidecar_for="web-1", admin_port=19000), "cmd_sidecar"),
    (UnitSpec(process="sidecar"), "cmd_sidecar"),
])
def test_generated_command_lines_are_accepted_by_the_real_commands(spec: UnitSpec, module_name: str) -> None:
    import importlib

    module = importlib.import_module(f"weft.{module_name}")
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    # an unset $VAR word expands to no word at all (the template's per-instance arguments)
    words = [w for w in shlex.split(_parse_unit(render(spec))["Service"]["ExecStart"]) if not w.startswith("$")]
    try:
        parser.parse_args(words[2:])  # after `weft <process>`
    except SystemExit as exc:
        raise AssertionError(f"`weft {spec.process}` rejects {words}") from exc


def _verify_units(tmp_path: Path, units: dict[str, str]) -> subprocess.CompletedProcess[str]:
    for name, text in units.items():
        (tmp_path / name).write_text(text)
    return subprocess.run(["systemd-analyze", "verify", *[str(tmp_path / n) for n in units]], capture_output=True,
                          text=True, timeout=120, check=False, env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_verifies_the_units_of_the_vm_guide(tmp_path: Path) -> None:
    """The units the README's VM guide makes, checked by systemd itself (where it is installed)."""
    weft = cmd_systemd._default_weft()
    if not Path(weft).exists():
        pytest.skip("no weft executable next to this Python for ExecStart to point at")
    units = {
        "weft-ca.service": render(UnitSpec(process="ca", weft=weft, kek_file="/etc/weft/kek",
                                           token_file="/etc/weft/ca.token", listen="0.0.0.0:8553",
                                           advertise="10.0.0.5:8553")),
        "weft-policy.service": render(UnitSpec(process="policy", weft=weft, token_file="/etc/weft/policy.token")),
        # the template, as systemd instantiates it for one service ID
        "weft-sidecar@web-1.service": render(UnitSpec(process="sidecar", weft=weft,
                                                      token_file="/etc/weft/sidecar/%i.token")),
        "weft-sidecar-api-1.service": render(UnitSpec(process="sidecar", weft=weft, sidecar_for="api-1",
                                                      admin_port=19001, app_unit="api.service")),
        "weft-agent.service": render(UnitSpec(process="agent", weft=weft, data_dir="/var/lib/weft")),
    }
    result = _verify_units(tmp_path, units)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if "weft" in line and "api.service" not in line]  # the app's unit is not ours to provide
    assert result.returncode == 0 or not problems, result.stdout + result.stderr
    assert problems == [], "\n".join(problems)
