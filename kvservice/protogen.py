"""Regenerates the committed gRPC stubs in ``kvservice/v1/`` from ``proto/``.

    python -m kvservice.protogen              # rewrite kvservice/v1/ in place
    python -m kvservice.protogen --out DIR    # write DIR/kvservice/v1/ instead

The stubs are committed because the machines that run the service have grpcio but no
grpcio-tools. Generated with ``-I proto`` the modules import as ``kvservice.v1.*``.

One edit is made to protoc's output: the service module refuses to import under a
grpcio older than the grpcio-tools that generated it, and patch releases of grpcio-tools
generate the same code, so the check names the oldest grpcio the project supports (the
``.0`` release of grpcio-tools' minor version, which pyproject pins). Everything else is
exactly protoc's output, so regenerating with the same grpcio-tools minor version is
byte-identical (tests/unit/test_protogen.py checks it).
"""

from __future__ import annotations

import argparse
import re
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_FILES = ("kvservice/v1/kvservice.proto",)
PACKAGE_DIR = Path("kvservice") / "v1"

_INIT = '"""Generated gRPC stubs for the kvservice.v1 wire API (python -m kvservice.protogen)."""\n'
_VERSION_LINE = re.compile(r"^GRPC_GENERATED_VERSION = '(\d+)\.(\d+)\.\d+'$", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Writes the generated package under ``out_dir / kvservice / v1``; returns its files."""
    from grpc_tools import protoc  # development-only dependency

    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(PROTO_ROOT / name) for name in PROTO_FILES),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        generated = {path.name: path.read_text() for path in (Path(tmp) / PACKAGE_DIR).iterdir()}

    target = out_dir / PACKAGE_DIR
    target.mkdir(parents=True, exist_ok=True)
    generated["__init__.py"] = _INIT
    written = []
    for name, text in sorted(generated.items()):
        if name.endswith("_pb2_grpc.py"):
            text = _pin_grpc_version(text)
        path = target / name
        path.write_text(text)
        written.append(path)
    return written


def _pin_grpc_version(text: str) -> str:
    text, count = _VERSION_LINE.subn(r"GRPC_GENERATED_VERSION = '\1.\2.0'", text)
    if count != 1:
        raise RuntimeError("GRPC_GENERATED_VERSION not found in the generated service module")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write kvservice/v1/ under")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
