"""`weft sidecar` refuses bad flags with a message and exit code 2, before starting anything."""

from __future__ import annotations

from collections.abc import Iterator

import consul  # noqa: F401 - imported first, so the sidecar's lean-import stub never applies here
import pytest
import structlog

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


def test_grpc_engine_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["sidecar", "--sidecar-for", "web-1", "--grpc-engine", "fast"])
    assert "invalid choice" in capsys.readouterr().err
