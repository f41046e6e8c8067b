"""The sidecar's named limits: defaults, validation naming the flag, and the flags built from them."""

from __future__ import annotations

import argparse

import pytest

from sidecar.limits import Limits, described, flag_name
from weft import cmd_sidecar


def test_defaults_are_what_a_production_proxy_ships() -> None:
    limits = Limits()
    assert limits.h2_max_header_list_size == 64 * 1024
    assert 100 <= limits.h2_max_concurrent_streams < 1000
    assert limits.handshake_timeout == 10.0
    assert limits.h2_connection_window >= limits.h2_initial_stream_window


@pytest.mark.parametrize(("field", "value", "words"), [
    ("h2_max_concurrent_streams", 0, "--h2-max-concurrent-streams: 0 is below the minimum 1"),
    ("h2_initial_stream_window", 2**31, "--h2-initial-stream-window: 2147483648 is above the maximum"),
    ("handshake_timeout", -1.0, "--handshake-timeout: -1.0 is below the minimum"),
    ("max_connections", "many", "--max-connections: expected a number"),
])
def test_an_out_of_range_limit_is_refused_naming_its_flag(field: str, value: object, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Limits(**{field: value})  # type: ignore[arg-type]


def test_connection_window_below_stream_window_is_refused() -> None:
    with pytest.raises(ValueError, match="--h2-connection-window"):
        Limits(h2_initial_stream_window=1 << 20, h2_connection_window=65535)


def test_every_limit_is_a_sidecar_flag_with_its_default() -> None:
    parser = argparse.ArgumentParser()
    cmd_sidecar.add_arguments(parser)
    args = parser.parse_args(["--sidecar-for", "web-1", "--h2-max-concurrent-streams", "100",
                              "--idle-timeout", "30"])
    limits = cmd_sidecar.limits_of(args)
    assert limits.h2_max_concurrent_streams == 100
    assert limits.idle_timeout == 30.0
    assert limits.max_connections == Limits().max_connections
    help_text = parser.format_help()
    for name, _, default, _ in described():
        assert flag_name(name) in help_text
        assert f"(default: {default})" in " ".join(help_text.split())
