"""One attacked mesh for the whole abuse tier (see tests/abuse/mesh.py); every test module is marked ``abuse``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.abuse.mesh import Mesh, start_mesh


@pytest.fixture(scope="package")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = start_mesh(tmp_path_factory.mktemp("abuse"))
    try:
        yield m
    finally:
        if m.restarts:
            print(f"\nabuse tier: restarted after successful attacks: {m.restarts}")
        m.stop()


@pytest.fixture(autouse=True)
def restored(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each attack on the mesh, restart what it left dead, stuck, bloated or unable to carry calls,
    so the next test starts clean (tests without the mesh start none)."""
    yield
    if "mesh" in request.fixturenames:
        request.getfixturevalue("mesh").restore()
