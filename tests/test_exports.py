"""Each public package's __all__ lists exactly what it exports (httpx's tests/test_exported_members.py)."""

import importlib

import pytest

PUBLIC_MODULES = [
    "tether",
    "tether.runtime",
    "tether.models",
    "tether.edge",
    "tether.cloud",
    "tether.protocol",
    "tether.routing",
]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_matches_public_names(name: str) -> None:
    module = importlib.import_module(name)
    exported = {n for n in module.__all__ if not n.startswith("__")}
    public = {
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and not isinstance(v, type(importlib)) and n not in {"annotations"}
    }
    assert exported == public, f"{name}: __all__ and public names differ: {sorted(exported ^ public)}"
