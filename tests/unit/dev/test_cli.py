"""The `weft` command line as a user meets it: --version, help texts with descriptions and defaults,
and output cut short by its reader (`| head`) ending quietly."""

from __future__ import annotations

import argparse
import os
import subprocess
from collections.abc import Iterator
from datetime import timedelta

import pytest

from tests.support import WEFT
from weft import cli
from weft.durations import parse_duration, parse_duration_or_seconds


def _parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every (sub)command's parser, subcommands of subcommands included."""
    def walk(prog: str, parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
        yield prog, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(f"{prog} {name}", sub)

    for name in cli.COMMANDS:
        parser = cli.build_parser(name)
        assert parser is not None, name
        yield from walk(f"weft {name}", parser)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("weft ") and out.strip() == f"weft {cli.version()}"


def test_every_command_has_a_description() -> None:
    found = dict(_parsers())
    assert {"weft ca serve", "weft ca roots", "weft intention check", "weft policy serve", "weft sidecar"} <= set(found)
    for prog, parser in found.items():
        assert parser.description and len(parser.description) > 10, prog
        assert parser.format_help().count(parser.description.splitlines()[0]) == 1, prog


def test_every_option_with_a_default_shows_it() -> None:
    for prog, parser in _parsers():
        help_text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if not action.option_strings or action.default in (None, False, "", [], argparse.SUPPRESS):
                continue
            shown = " ".join((parser._get_formatter()._expand_help(action) if action.help else "").split())
            # either the formatter's "(default: VALUE)" or a "(default ...)" the help text words itself
            assert "(default" in shown, (prog, action.option_strings, shown)
            if "(default" not in (action.help or ""):  # added by the formatter: the value itself
                assert f"(default: {action.default})" in shown, (prog, shown)
            assert shown[:40] in help_text


def test_sidecar_help_shows_its_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["sidecar", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("(default: 19000)", "(default: 10s)", "(default: 1m)", "(default: 10.0)", "(default: 4194304)",
                     "(default: the CA's)"):
        assert expected in text, expected


def test_leaf_ttl_takes_the_same_form_on_the_sidecar_and_the_ca() -> None:
    sidecar = cli.build_parser("sidecar")
    ca = cli.build_parser("ca")
    assert sidecar is not None and ca is not None
    for text, seconds in (("72h", 259200), ("90m", 5400), ("1h30m", 5400), ("90s", 90)):
        assert sidecar.parse_args(["--sidecar-for", "x", "--leaf-ttl", text]).leaf_ttl == timedelta(seconds=seconds)
        assert ca.parse_args(["serve", "--leaf-ttl", text]).leaf_ttl == timedelta(seconds=seconds)
    # the sidecar's older form, a number of seconds, still works
    assert sidecar.parse_args(["--sidecar-for", "x", "--leaf-ttl", "3600"]).leaf_ttl == timedelta(hours=1)
    assert sidecar.parse_args(["--sidecar-for", "x"]).leaf_ttl is None
    for bad in ("72x", "-5", "h", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration_or_seconds(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration("3600")  # the CA wants a unit


def test_bad_leaf_ttl_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["sidecar", "--sidecar-for", "x", "--leaf-ttl", "3 days"])
    assert exc.value.code == 2
    assert "invalid duration '3 days'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["sidecar", "--help"], ["ca", "serve", "--help"], ["--version"],
                                  ["systemd-unit", "sidecar"]])
def test_output_into_a_closed_pipe_ends_quietly(argv: list[str]) -> None:
    """As `weft --help | head -1` once head has gone: no traceback, the status a SIGPIPE death reports."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte
    try:
        proc = subprocess.run([*WEFT, *argv], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
                              check=False)
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    # argparse's own --help ignores a failed write and exits 0; everything else reports the broken pipe
    assert proc.returncode == (0 if "--help" in argv[1:] else cli.EXIT_BROKEN_PIPE)
