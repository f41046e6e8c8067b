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
def restored(mesh: Mesh) -> Iterator[Mesh]:
    """After each attack, restart what it left dead, stuck or bloated, so the next test starts clean."""
    yield mesh
    mesh.restore()
