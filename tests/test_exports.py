"""Each public package's __all__ lists exactly what it exports (httpx's tests/test_exported_members.py)."""

import importlib

import pytest

PUBLIC_MODULES = [
    "tether",
    "tether.runtime",
    "tether.models",
    "tether.contract",
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


def test_each_contract_concept_is_defined_once() -> None:
    """The cloud and the wire re-export the contract's objects; they define no twins."""
    import tether.cloud
    import tether.contract
    import tether.edge
    import tether.protocol

    for name in tether.contract.__all__:
        if hasattr(tether.cloud, name):
            assert getattr(tether.cloud, name) is getattr(tether.contract, name), name
        if hasattr(tether.protocol, name):
            assert getattr(tether.protocol, name) is getattr(tether.contract, name), name
    # The wire's replies are envelopes with their own names, not second result types.
    for twin in ("VerifyResult", "GenerateChunk", "HiddenResult"):
        assert not hasattr(tether.protocol, twin)
    assert tether.edge.COMPRESSIONS is tether.protocol.COMPRESSIONS
    assert set(tether.protocol.COMPRESSION_DTYPES) == set(tether.protocol.COMPRESSIONS)
