"""Regenerate the checked-in gRPC code from pycilium.proto.

The generated modules (pycilium_pb2.py, pycilium_pb2.pyi, pycilium_pb2_grpc.py) are checked in so a
plain install needs no protoc step and the code is reproducible; grpcio and grpcio-tools are pinned
to the same version (1.85.1) because the generated code checks the runtime version. After editing
pycilium.proto run, from the repository root::

    .venv/bin/python -m pycilium.agent.api.codegen

which is equivalent to copying agent/api/pycilium.proto to ``$TMP/pycilium/agent/api/`` and running::

    python -m grpc_tools.protoc -I$TMP --python_out=$TMP --pyi_out=$TMP --grpc_python_out=$TMP \\
        $TMP/pycilium/agent/api/pycilium.proto

then copying the three generated files back. The proto is compiled at a path that mirrors its
import name, so the generated ``pycilium_pb2_grpc`` imports ``from pycilium.agent.api import
pycilium_pb2`` and works wherever the package is installed.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

API_DIR = Path(__file__).resolve().parent
PROTO = API_DIR / "pycilium.proto"
PACKAGE_PATH = Path("pycilium/agent/api")
GENERATED = ("pycilium_pb2.py", "pycilium_pb2.pyi", "pycilium_pb2_grpc.py")


def generate(out_dir: Path = API_DIR) -> list[Path]:
    """Run protoc on pycilium.proto; returns the files written to `out_dir`."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory(prefix="pycilium-codegen-") as tmp:
        root = Path(tmp)
        src = root / PACKAGE_PATH / PROTO.name
        src.parent.mkdir(parents=True)
        shutil.copyfile(PROTO, src)
        include = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{include}",
            f"--python_out={root}",
            f"--pyi_out={root}",
            f"--grpc_python_out={root}",
            str(src),
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")
        written = []
        for name in GENERATED:
            dst = out_dir / name
            shutil.copyfile(root / PACKAGE_PATH / name, dst)
            written.append(dst)
        return written


def main() -> int:
    for path in generate():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
