"""The shape of the house (the team's ARCHITECTURE.md, ../shared beside the checkout): roles depend
on cmdfed/, never on each other, and cmdfed/ imports no role and none of Flower, gRPC or Streamlit.
Inside cmdfed/ the packages are layered (each imports only those below it), no modules import each
other in a circle, and ``cmdfed.evaluate`` only scores: nothing on the way from pixels to nuclei
imports it. Read from the source's import statements (lazy imports inside functions included), so a
violation fails here, not at a site."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("server", "client", "edge", "dashboard")
CORE_FORBIDDEN = {*ROLES, "flwr", "grpc", "grpc_health", "streamlit"}

# cmdfed/'s units (a subpackage, or a top-level module), lowest layer first. A unit imports
# itself and units of lower layers only; units of one layer are independent of each other.
CORE_LAYERS = (
    ("cmdfed", "cmdfed.errors"),
    (
        "cmdfed.atomic",
        "cmdfed.checksums",
        "cmdfed.progress",
        "cmdfed.images",
        "cmdfed.addresses",
        "cmdfed.redaction",
        "cmdfed.slide_outputs",
        "cmdfed.models",
    ),
    ("cmdfed.model",),  # the network, its configs and checkpoints
    ("cmdfed.inference",),  # pixels -> nuclei: tiling, segmentation, post-processing
    ("cmdfed.data",),  # stores, importers and slides (cut on inference's grid)
    ("cmdfed.train",),
    ("cmdfed.evaluate", "cmdfed.privacy", "cmdfed.telemetry"),
    ("cmdfed.federation",),
    ("cmdfed.demo",),
    ("cmdfed.cli",),
    ("cmdfed.__main__",),
)
# Who may import cmdfed.evaluate, which only scores, and why.
EVALUATE_USERS = {
    "cmdfed/cli.py": "`cmdfed train evaluate`",
    "cmdfed/federation/local.py": "federated evaluation scores the global model each round",
    "edge/quantize.py": "edge export's INT8 gate scores the variant's PQ against fp32's on the CPM-15 test images",
}


def imported_packages(folder: Path) -> dict[str, set[Path]]:
    """Top-level package name -> the files under ``folder`` that import it."""
    found: dict[str, set[Path]] = {}
    for path, names in _imports(folder):
        for name in names:
            found.setdefault(name.split(".")[0], set()).add(path.relative_to(ROOT))
    return found


def _imports(folder: Path):
    """(file, absolute module names it imports) for every Python file under ``folder``;
    ``from package import module`` names the module."""
    for path in sorted(folder.rglob("*.py")):
        names = []
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.append(node.module)
                names += [
                    f"{node.module}.{alias.name}" for alias in node.names if _is_module(f"{node.module}.{alias.name}")
                ]
        yield path, names


def _file_of(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_module(name: str) -> bool:
    return _file_of(name) is not None


def _module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _own_graph() -> dict[str, set[str]]:
    """Module -> the modules of this repository it imports (cmdfed and the roles)."""
    graph: dict[str, set[str]] = {}
    for top in ("cmdfed", *ROLES):
        for path, names in _imports(ROOT / top):
            targets = {name for name in names if name.split(".")[0] in ("cmdfed", *ROLES) and _is_module(name)}
            graph[_module_of(path)] = targets - {_module_of(path)}
    return graph


def _unit(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def _layer(unit: str) -> int:
    for rank, units in enumerate(CORE_LAYERS):
        if unit in units:
            return rank
    raise AssertionError(f"{unit} is in no layer of CORE_LAYERS: add it where it belongs")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_core_imports_no_role_and_no_transport_or_ui_library():
    imports = imported_packages(ROOT / "cmdfed")
    assert {name: sorted(map(str, files)) for name, files in imports.items() if name in CORE_FORBIDDEN} == {}


@pytest.mark.parametrize("role", ROLES)
def test_role_imports_no_other_role(role):
    imports = imported_packages(ROOT / role)
    others = {name: sorted(map(str, files)) for name, files in imports.items() if name in ROLES and name != role}
    assert others == {}


def test_no_modules_import_each_other_in_a_circle():
    assert _cycles(_own_graph()) == []


def test_core_packages_import_only_layers_below_them():
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in _own_graph().items()
        if module.startswith("cmdfed")
        for target in targets
        if _unit(module) != _unit(target) and _layer(_unit(target)) >= _layer(_unit(module))
    )
    assert upward == []


def test_evaluate_is_imported_only_by_what_scores():
    users = {
        str(path.relative_to(ROOT))
        for top in ("cmdfed", *ROLES)
        for path, names in _imports(ROOT / top)
        if not path.is_relative_to(ROOT / "cmdfed" / "evaluate") and any(n.startswith("cmdfed.evaluate") for n in names)
    }
    assert users - set(EVALUATE_USERS) == set()


def _route() -> list[str]:
    """The files edge/infer.py's docstring lists as a tile's route to cells.geojson."""
    doc = ast.get_docstring(ast.parse((ROOT / "edge" / "infer.py").read_text()))
    return re.findall(r"^\s+\d+\. (\S+\.py)", doc, flags=re.MULTILINE)


def test_a_tile_route_from_slide_to_geojson_is_at_most_six_files_and_is_the_code():
    route = _route()
    assert 2 <= len(route) <= 6, route
    graph = _own_graph()
    reached, frontier = set(), {"edge.infer"}
    while frontier:  # everything edge.infer runs on, directly or not
        module = frontier.pop()
        reached.add(module)
        frontier |= graph.get(module, set()) - reached
    listed = {_module_of(ROOT / path) for path in route}
    assert listed <= reached, f"listed but not imported by edge.infer, even indirectly: {sorted(listed - reached)}"


def test_the_scan_sees_imports():
    # Guards the tests above against passing because the scan finds nothing.
    assert "cmdfed" in imported_packages(ROOT / "server")
    assert "flwr" in imported_packages(ROOT / "client")
    graph = _own_graph()
    assert "cmdfed.inference.postprocess" in graph["edge.infer"]
    assert "edge.outputs" in graph["edge.infer"]  # `from edge import outputs` names the module
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
