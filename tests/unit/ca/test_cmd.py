from __future__ import annotations

import argparse
from datetime import timedelta

import pytest

from weft.cmd_ca import _config, add_arguments, parse_duration


def test_parse_duration() -> None:
    assert parse_duration("72h") == timedelta(hours=72)
    assert parse_duration("1h30m") == timedelta(minutes=90)
    assert parse_duration("3650d") == timedelta(days=3650)
    assert parse_duration("500ms") == timedelta(milliseconds=500)
    for bad in ("", "10", "h", "10x", "1h 30m", "-5m"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)


def test_serve_flags_make_a_config() -> None:
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["serve", "-dev", "--leaf-ttl", "10m", "--intermediate-ttl", "30d"])
    cfg = _config(args)
    assert cfg.leaf_ttl == timedelta(minutes=10) and cfg.intermediate_ttl == timedelta(days=30)
    assert cfg.max_leaf_ttl == timedelta(days=7)
    args = p.parse_args(["serve", "--leaf-ttl", "10d"])
    assert _config(args).max_leaf_ttl == timedelta(days=10)
    with pytest.raises(ValueError, match="intermediate TTL"):
        _config(p.parse_args(["serve", "--intermediate-ttl", "1d"]))
    sign = p.parse_args(["sign", "--service", "web", "--out", "/tmp/x", "--ttl", "5m"])
    assert sign.ttl == timedelta(minutes=5) and sign.token is None
