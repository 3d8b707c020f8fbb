"""The shape of the house (the team's ARCHITECTURE.md, ../shared beside the checkout): roles depend on cmdfed/, never on each other, and
cmdfed/ imports no role and none of Flower, gRPC or Streamlit. Read from the source's import
statements (lazy imports inside functions included), so a violation fails here, not at a site."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("server", "client", "edge", "dashboard")
CORE_FORBIDDEN = {*ROLES, "flwr", "grpc", "grpc_health", "streamlit"}


def imported_packages(folder: Path) -> dict[str, set[Path]]:
    """Top-level package name -> the files under ``folder`` that import it."""
    found: dict[str, set[Path]] = {}
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(path.relative_to(ROOT))
    return found


def test_core_imports_no_role_and_no_transport_or_ui_library():
    imports = imported_packages(ROOT / "cmdfed")
    assert {name: sorted(map(str, files)) for name, files in imports.items() if name in CORE_FORBIDDEN} == {}


@pytest.mark.parametrize("role", ROLES)
def test_role_imports_no_other_role(role):
    imports = imported_packages(ROOT / role)
    others = {name: sorted(map(str, files)) for name, files in imports.items() if name in ROLES and name != role}
    assert others == {}


def test_the_scan_sees_imports():
    # Guards the two tests above against passing because the scan finds nothing.
    assert "cmdfed" in imported_packages(ROOT / "server")
    assert "flwr" in imported_packages(ROOT / "client")
