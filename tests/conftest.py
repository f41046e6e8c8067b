from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import DevAgent


@pytest.fixture
def dev_agent() -> Iterator[DevAgent]:
    """A fresh dev agent process for one test; always stopped."""
    agent = DevAgent()
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture(scope="module")
def module_agent() -> Iterator[DevAgent]:
    """One dev agent shared by the tests of a module (faster; tests must not depend on each other's data)."""
    agent = DevAgent()
    try:
        yield agent
    finally:
        agent.stop()
