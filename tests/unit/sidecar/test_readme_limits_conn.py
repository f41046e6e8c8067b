"""The README's connection-limits block names every non-HTTP/2 limit with its flag and its default."""

from __future__ import annotations

from pathlib import Path

from sidecar.limits import described, flag_name

README = Path(__file__).resolve().parents[3] / "README.md"


def _block() -> str:
    text = README.read_text()
    start = text.index("<!-- BEGIN limits-conn -->")
    end = text.index("<!-- END limits-conn -->")
    assert start < end
    return text[start:end]


def test_every_connection_limit_is_documented_with_its_default() -> None:
    rows = {line.split("|")[1].strip(): line for line in _block().splitlines() if line.startswith("| `--")}
    fields = [(name, default) for name, _, default, _ in described() if not name.startswith("h2_")]
    assert fields
    for name, default in fields:
        flag = f"`{flag_name(name)}`"
        assert flag in rows, f"{flag} is not in the README's limits-conn table"
        assert rows[flag].split("|")[2].strip().split()[0] == str(default), (flag, rows[flag])


def test_the_block_sits_in_the_limits_section() -> None:
    text = README.read_text()
    assert text.index("## Limits and hardening") < text.index("<!-- BEGIN limits-conn -->")
