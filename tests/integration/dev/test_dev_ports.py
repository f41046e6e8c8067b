"""`weft dev` refuses busy ports with a clear error, before starting anything."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from devmesh.mesh import DevMesh, DevOptions
from devmesh.plan import DevError, make_plan
from devmesh.probes import port_free
from tests.support import free_port
from tests.unit.devmesh.test_plan import demo_payloads
from weft.cmd_dev import DEMO

pytestmark = pytest.mark.integration


def test_port_free() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not port_free("127.0.0.1", port)
    assert port_free("127.0.0.1", port)


def test_a_busy_port_is_named_and_nothing_starts(tmp_path: Path) -> None:
    ports = iter([free_port() for _ in range(20)])
    plan = make_plan(demo_payloads(), consul_host="127.0.0.1", consul_port=free_port(),
                     free_port=lambda: next(ports))
    busy = plan.service("greeter").admin_port
    dev = DevMesh(DevOptions(state_dir=tmp_path, demo=DEMO))
    with socket.socket() as s:
        s.bind(("127.0.0.1", busy))
        s.listen()
        with pytest.raises(DevError, match=rf"port\(s\) in use: {busy} \(greeter.admin\).*-free-ports"):
            dev._check_ports(plan, skip_consul=False)
    assert dev.sup.children == []
