"""The rooms' one-way doors, checked on the source (docs/architecture.md, "Rooms and doors").

- The device never imports the service: nothing under tether.edge imports tether.cloud, and
  nothing under tether.cloud imports tether.edge. Both depend on tether.contract; what needs
  both lives in tether.compose.
- No module imports another room's private ``_module``, and ``from tether.<room> import name``
  takes only names of that room's public surface (its ``__all__`` or a public sub-package).
- ``import tether.edge`` loads no HTTP server and no part of the cloud.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it is installed as (pyproject's package-dir).
FOLDERS = {"edge": "tether.edge", "cloud": "tether.cloud", "protocol": "tether.protocol",
           "routing": "tether.routing", "tether": "tether"}
# The rooms; a module belongs to the longest room its name starts with, else to the kernel ("tether").
ROOMS = ("tether.edge", "tether.cloud", "tether.protocol", "tether.routing", "tether.runtime",
         "tether.contract", "tether.cli", "tether.compose")
# Doors that must stay shut, importer room -> imported room.
FORBIDDEN = {("tether.edge", "tether.cloud"), ("tether.cloud", "tether.edge")}


def room_of(module: str) -> str:
    for room in sorted(ROOMS, key=len, reverse=True):
        if module == room or module.startswith(room + "."):
            return room
    return "tether"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts[1:] if p != "__init__"]
    return ".".join([FOLDERS[rel.parts[0]], *parts])


def product_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def public_surface(package: str) -> set[str]:
    """What `from <package> import name` may take: its `__all__` and its public sub-modules."""
    module = importlib.import_module(package)
    names = set(getattr(module, "__all__", ()))
    for path in getattr(module, "__path__", []):
        for child in Path(path).iterdir():
            if not child.name.startswith("_") and (child.suffix == ".py" or (child / "__init__.py").exists()):
                names.add(child.stem)
    return names


def _private(target: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in target.split("."))


def violations(importer: str, source: str, *, is_package: bool = False) -> list[str]:
    """Every door rule `source` (the text of module `importer`) breaks, one line each."""
    mine = room_of(importer)
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        targets: list[tuple[str, list[str]]] = []
        if isinstance(node, ast.Import):
            targets = [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importer's package
                package = importer if is_package else importer.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            targets = [(base, [alias.name for alias in node.names])]
        for target, names in targets:
            if not target.startswith("tether"):
                continue
            theirs = room_of(target)
            where = f"{importer}:{node.lineno}"
            if (mine, theirs) in FORBIDDEN:
                found.append(f"{where}: {mine} must not import {target}")
            if theirs == mine:
                continue
            if _private(target):
                found.append(f"{where}: imports the private module {target} of {theirs}")
            elif names and target in ROOMS:
                surface = public_surface(target)
                for name in names:
                    if name not in surface:
                        found.append(f"{where}: {name} is not in the public surface of {target}")
    return found


def test_the_rooms_keep_their_doors() -> None:
    found: list[str] = []
    for path in product_files():
        found += violations(module_name(path), path.read_text(), is_package=path.name == "__init__.py")
    assert found == []


@pytest.mark.parametrize(
    ("importer", "source", "expected"),
    [
        ("tether.edge._client", "from tether.cloud import CloudServer",
         "tether.edge._client:1: tether.edge must not import tether.cloud"),
        ("tether.edge.split._strategy", "def f():\n    import tether.cloud._server",
         "tether.edge.split._strategy:2: tether.edge must not import tether.cloud._server"),
        ("tether.cloud._session", "from tether.edge import EdgeClient",
         "tether.cloud._session:1: tether.cloud must not import tether.edge"),
        ("tether.edge._remote", "from tether.protocol._messages import COMPRESSIONS",
         "tether.edge._remote:1: imports the private module tether.protocol._messages of tether.protocol"),
        ("tether.cli._serve", "from tether.cloud import _config",
         "tether.cli._serve:1: _config is not in the public surface of tether.cloud"),
        ("tether.cloud._server", "from tether.protocol import TotallyUnknown",
         "tether.cloud._server:1: TotallyUnknown is not in the public surface of tether.protocol"),
    ],
)
def test_the_checker_catches_a_broken_door(importer: str, source: str, expected: str) -> None:
    assert expected in violations(importer, source)


def test_the_checker_allows_what_the_doors_allow() -> None:
    assert violations("tether.edge._client", "from tether.contract import SamplingParams") == []
    assert violations("tether.edge.split._model", "from tether.edge._connectors import InProcessCloud") == []
    assert violations("tether.compose", "from tether.cloud import CloudServer\nfrom tether.edge import RemoteCloud") == []
    assert violations("tether.edge.split", "from ._hidden_codec import COMPRESSIONS", is_package=True) == []


def test_importing_the_sdk_loads_no_server() -> None:
    probe = ("import sys, tether.edge; "
             "print(','.join(m for m in ('starlette', 'uvicorn', 'tether.cloud', 'tether.cloud._server', "
             "'tether.compose') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT,
                         timeout=300)
    assert out.stdout.strip() == ""
