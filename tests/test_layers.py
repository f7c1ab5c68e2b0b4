"""The layering rule, checked on the imports themselves: the core imports neither mitmproxy nor any other
layer, nor anything that opens sockets or starts processes; nothing in the package imports test support."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "addon" / "stableprefix"
LAYERS = ("core", "mitm", "report", "cli", "demo")


def imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def modules(layer: str) -> list[Path]:
    found = sorted((PACKAGE / layer).glob("*.py"))
    assert found, layer
    return found


def test_the_core_is_pure() -> None:
    banned = ("mitmproxy", "socket", "subprocess", "http", "urllib.request", "asyncio")
    other_layers = tuple(f"stableprefix.{layer}" for layer in LAYERS if layer != "core")
    for path in modules("core"):
        for name in imports(path):
            assert not name.startswith(banned), f"{path.name} imports {name}"
            assert not name.startswith(other_layers), f"{path.name} imports {name}"


def test_only_the_faces_import_mitmproxy() -> None:
    for layer in ("core", "demo"):
        for path in modules(layer):
            assert not any(n.startswith("mitmproxy") for n in imports(path)), path


def test_no_test_support_in_the_package() -> None:
    for path in PACKAGE.rglob("*.py"):
        assert not any(n == "tests" or n.startswith("tests.") for n in imports(path)), path


def test_every_layer_is_a_folder() -> None:
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(
        LAYERS
    )
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "addon.py"]
