"""Regenerates `*_pb2.py`, `*_pb2_grpc.py` and their `.pyi` stubs from every `.proto` in the tree.

Run by `make proto`; the generated files are committed so that installing Weft needs no protoc.
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGES = ("catalog", "ca", "policies", "sidecar", "weft", "tests", "benchmarks")


def main() -> int:
    import os

    from grpc_tools import protoc  # only a dev dependency

    # protoc finds its plugins (protoc-gen-mypy) on PATH: put this interpreter's bin directory first.
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

    root = Path(__file__).resolve().parent.parent
    protos = sorted(str(p.relative_to(root)) for pkg in PACKAGES for p in (root / pkg).rglob("*.proto"))
    if not protos:
        print("no .proto files found", file=sys.stderr)
        return 1
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={root}", f"--grpc_python_out={root}",
            f"--mypy_out={root}", *protos]
    code = int(protoc.main(args))
    print("\n".join(protos) if code == 0 else f"protoc failed with {code}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
