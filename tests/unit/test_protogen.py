"""The committed stubs are exactly what the proto generates, and import under grpcio 1.84.0."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvservice import protogen

COMMITTED = protogen.ROOT / protogen.PACKAGE_DIR


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_regenerating_the_stubs_changes_nothing(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    protogen.generate(tmp_path)
    fresh = _files(tmp_path / protogen.PACKAGE_DIR)
    committed = _files(COMMITTED)
    assert sorted(fresh) == sorted(committed)
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run python -m kvservice.protogen"


def test_service_module_accepts_the_oldest_supported_grpcio() -> None:
    from grpc._utilities import first_version_is_lower

    text = (COMMITTED / "kvservice_pb2_grpc.py").read_text()
    match = re.search(r"^GRPC_GENERATED_VERSION = '([\d.]+)'$", text, re.MULTILINE)
    assert match is not None
    assert not first_version_is_lower("1.84.0", match.group(1))


def test_version_pin_refuses_unexpected_output() -> None:
    assert "'1.84.0'" in protogen._pin_grpc_version("GRPC_GENERATED_VERSION = '1.84.2'\n")
    with pytest.raises(RuntimeError, match="GRPC_GENERATED_VERSION"):
        protogen._pin_grpc_version("no version here\n")
