"""Smoke-run every script in demos/ on tiny random model directories (the CI check that they work).

Each demo's ``main(argv)`` runs in this process (no second torch import); the remote demo talks
to a real `tether serve` subprocess over the encrypted protocol. The tiny models write gibberish,
so these tests check that each demo runs end to end and reports what it promises, not the text.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from test_chat_cli import save_tiny_pair, serve_tiny

DEMOS = Path(__file__).resolve().parent.parent / "demos"


def _demo(name: str) -> ModuleType:
    sys.path.insert(0, str(DEMOS))  # the demos import their `_common` helper as scripts do
    spec = importlib.util.spec_from_file_location(f"demo_{name}", DEMOS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    edge, cloud = save_tiny_pair(tmp_path_factory.mktemp("demo-pair"))
    return ["--edge-model", str(edge), "--cloud-model", str(cloud), "--max-new-tokens", "12"]


def test_every_demo_is_tested() -> None:
    scripts = {p.stem for p in DEMOS.glob("*.py") if not p.name.startswith("_")}
    assert scripts == {"quickstart", "remote_server", "routing_budget", "minions_file", "split_computing"}
    for name in scripts:  # each is a readable script with a usage docstring
        assert (DEMOS / f"{name}.py").read_text().startswith('"""')


def test_quickstart(pair: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert _demo("quickstart").main([*pair, "hello"]) == 0
    out = capsys.readouterr().out
    assert "acceptance" in out and "same tokens as speculative: True" in out


def test_routing_budget(pair: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert _demo("routing_budget").main([*pair, "--budget", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "sends 50% of the calibration prompts" in out
    assert re.search(r"\d/4 queries went to the cloud", out)


def test_split_computing(pair: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert _demo("split_computing").main([*pair, "--split-layer", "2"]) == 0
    assert "fp32 rows give the cloud's tokens: True" in capsys.readouterr().out


def test_minions_file(pair: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "notes.md"
    doc.write_text("The meeting moved to Thursday at 10:00 in room 4B, with the whole platform team.\n")
    # Tiny random models cannot follow the planning schema: the demo reports that (status 2)
    # with the partial transcript; a real pair answers (status 0).
    assert _demo("minions_file").main([*pair, str(doc), "--max-rounds", "1"]) in (0, 2)
    out = capsys.readouterr().out
    assert "characters sent to the cloud" in out and "whole lines of the file among them: 0" in out


def test_remote_server(pair: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cloud_dir = Path(pair[pair.index("--cloud-model") + 1])
    with serve_tiny(cloud_dir, tmp_path / "server") as (url, _fingerprint, key):
        edge = pair[pair.index("--edge-model") + 1]
        assert _demo("remote_server").main([url, "--server-key", key, "--edge-model", edge,
                                            "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "round trips" in out and "degraded: False" in out
