"""`weft sidecar` turns its flags into a `SidecarConfig` and refuses bad ones with a message and exit code 2,
before starting anything; `sidecar.app.drain` stops a running sidecar in an order that loses no call."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import structlog

from sidecar.app import drain
from sidecar.config import ConfigError, SidecarConfig, parse_upstream
from sidecar.limits import Limits
from weft import cmd_sidecar
from weft.cli import main


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """`weft sidecar` configures structlog for the process; give other tests their defaults back."""
    config = structlog.get_config()
    yield
    structlog.configure(**config)


@pytest.mark.parametrize(("args", "message"), [
    (["--upstream", "api"], "expected NAME:PORT"),
    (["--upstream", "api:99999"], "expected NAME:PORT"),
    (["--max-message-bytes", "0"], "--max-message-bytes must be positive"),
    (["--access-log-sample", "2"], "--access-log-sample must be within 0..1"),
    (["--descriptor-set", "/nonexistent/x.pb"], "--descriptor-set /nonexistent/x.pb"),
    (["--log-level", "loud"], "unknown log level"),
])
def test_bad_flags(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sidecar", "--sidecar-for", "web-1", *args]) == 2
    assert message in capsys.readouterr().err


def test_the_removed_grpc_engine_flag_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """--grpc-engine went with the aio engine: argparse refuses it by name rather than ignoring it."""
    with pytest.raises(SystemExit):
        main(["sidecar", "--sidecar-for", "web-1", "--grpc-engine", "h2"])
    assert "unrecognized arguments: --grpc-engine" in capsys.readouterr().err


def _config(*flags: str) -> SidecarConfig:
    parser = argparse.ArgumentParser()
    cmd_sidecar.add_arguments(parser)
    return cmd_sidecar.config_of(parser.parse_args(["--sidecar-for", "web-1", *flags]))


def test_defaults_are_the_flags_defaults() -> None:
    assert _config() == SidecarConfig(service_id="web-1")


def test_every_flag_reaches_the_config(tmp_path: Path) -> None:
    from google.protobuf import descriptor_pb2

    fds = descriptor_pb2.FileDescriptorSet()
    f = fds.file.add(name="x.proto", package="x")
    svc = f.service.add(name="S")
    svc.method.add(name="Up", input_type=".x.M", output_type=".x.M", server_streaming=True)
    f.message_type.add(name="M")
    (tmp_path / "x.pb").write_bytes(fds.SerializeToString())
    cfg = _config("--admin-port", "0", "--admin-bind", "0.0.0.0", "--ca-addr", "10.0.0.1:8502",
                  "--public-port", "21001", "--bind", "127.0.0.1", "--upstream", "api:9191", "--upstream", "db:9192",
                  "--token", "t", "--ttl", "5s", "--deregister-after", "2m", "--drain-timeout", "3",
                  "--max-message-bytes", "1024", "--access-log-rate", "5", "--access-log-sample", "0.5",
                  "--descriptor-set", str(tmp_path / "x.pb"), "--no-reflection",
                  "--no-passthrough", "--leaf-ttl", "90m", "--watch-wait", "10",
                  "--h2-max-concurrent-streams", "100")
    assert cfg == SidecarConfig(
        service_id="web-1", admin_port=0, admin_bind="0.0.0.0", ca_addr="10.0.0.1:8502", public_port=21001,
        bind="127.0.0.1", upstreams=(("api", 9191), ("db", 9192)), token="t", ttl="5s", deregister_after="2m",
        drain_timeout=3.0, max_message_bytes=1024, access_log_rate=5.0, access_log_sample=0.5,
        descriptor_methods={"/x.S/Up": "server_stream"}, reflect=False, passthrough=False,
        leaf_ttl=timedelta(minutes=90), watch_wait=10.0, limits=Limits(h2_max_concurrent_streams=100))


@pytest.mark.parametrize(("changes", "message"), [
    ({"service_id": ""}, "--sidecar-for"),
    ({"max_message_bytes": 0}, "--max-message-bytes must be positive"),
    ({"access_log_sample": -0.1}, "--access-log-sample"),
    ({"access_log_rate": -1.0}, "--access-log-rate"),
    ({"admin_port": 70000}, "--admin-port 70000"),
    ({"drain_timeout": -1.0}, "--drain-timeout"),
    ({"watch_wait": 0.0}, "--watch-wait"),
    ({"upstreams": (("api", 0),)}, "--upstream api:0"),
])
def test_config_refuses_out_of_range_values(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        SidecarConfig(**{"service_id": "web-1", **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", ["api", ":9191", "api:", "api:x", "api:0", "api:65536"])
def test_upstream_flag_needs_name_and_port(spec: str) -> None:
    with pytest.raises(ConfigError, match="expected NAME:PORT"):
        parse_upstream(spec)
    assert parse_upstream("api:9191") == ("api", 9191)


def test_parsing_flags_loads_no_sidecar_machinery() -> None:
    """The CLI module itself imports nothing heavy: a sidecar loads only what sidecar.app needs."""
    import subprocess

    code = ("import sys, argparse; from weft import cmd_sidecar; p = argparse.ArgumentParser(); "
            "cmd_sidecar.add_arguments(p); cmd_sidecar.config_of(p.parse_args(['--sidecar-for', 'x'])); "
            "print(sorted(m for m in ('grpc', 'aiohttp', 'consul', 'requests', 'sidecar.app') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []


class _Listener:
    def __init__(self, name: str, rec: _Recorder) -> None:
        self.name, self.rec = name, rec

    def stop_accepting(self) -> None:
        self.rec.events.append(f"{self.name}.stop_accepting")

    async def close(self, grace: float = 5.0) -> None:
        self.rec.events.append(f"{self.name}.close({grace})")


class _Keeper:
    def __init__(self, rec: _Recorder) -> None:
        self.rec = rec

    def set_status(self, status: str, note: str = "") -> None:
        self.rec.events.append(f"ttl {status} {note}")

    async def report(self) -> None:
        self.rec.events.append("ttl reported")

    async def stop(self, note: str = "shutting down", *, fail: bool = True) -> None:
        self.rec.events.append("ttl keeper stopped")


async def test_drain_says_not_ready_first_and_deregisters_last() -> None:
    rec = _Recorder()

    async def unregister() -> None:
        rec.events.append("deregistered")

    await drain(inbound=_Listener("inbound", rec), outbound=_Listener("outbound", rec), keeper=_Keeper(rec),
                timeout=3.0, mark_draining=lambda: rec.events.append("not ready"), unregister=unregister)
    assert rec.events == ["not ready", "ttl critical draining", "ttl reported", "inbound.stop_accepting",
                          "inbound.close(3.0)", "outbound.close(3.0)", "ttl keeper stopped", "deregistered"]


async def test_drain_without_a_ttl_check() -> None:
    rec = _Recorder()

    async def unregister() -> None:
        rec.events.append("deregistered")

    await drain(inbound=_Listener("inbound", rec), outbound=_Listener("outbound", rec), keeper=None, timeout=0.0,
                mark_draining=lambda: rec.events.append("not ready"), unregister=unregister)
    assert rec.events == ["not ready", "inbound.stop_accepting", "inbound.close(0.0)", "outbound.close(0.0)",
                          "deregistered"]
