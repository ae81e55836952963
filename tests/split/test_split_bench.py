"""benchmarks/split.py end to end on the tiny model (every stage, the report, the docs section, the plot);
and `tether split train-exit` / `show` on a tiny model directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tether.edge import ExitHead


@pytest.fixture
def tiny_dir(tmp_path: Path, split_hf) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path / "tiny-model"
    split_hf.save_pretrained(path)
    return path


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_dir: Path, split_runtime, toy_tokenizer) -> Any:  # type: ignore[no-untyped-def]
    import benchmarks.split as b

    monkeypatch.setattr(b, "ROOT", tmp_path)
    monkeypatch.setattr(b, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(b, "PROMPTS", ("one prompt", "another prompt here", "third"))
    monkeypatch.setattr(b, "K_LIST", (2, 4))
    monkeypatch.setattr(b, "EXIT_LAYERS", (4,))
    monkeypatch.setattr(b, "NEW_TOKENS", 6)
    monkeypatch.setattr(b, "SPEED_TOKENS", 4)
    monkeypatch.setattr(b, "RTTS_MS", (1,))
    monkeypatch.setattr(b, "_model_name", lambda: str(tiny_dir))
    monkeypatch.setattr(b, "_model", lambda: (split_runtime, toy_tokenizer))
    monkeypatch.setattr(b, "_tokenizer", lambda: toy_tokenizer)
    monkeypatch.setattr(b, "_head_path", lambda k: tmp_path / f"head{k}.safetensors")
    monkeypatch.setattr(b, "_speed_configs", lambda: [
        {"name": "cloud@1", "mode": "cloud", "rtt_ms": 1},
        {"name": "k2-int8@1", "mode": "split", "k": 2, "compression": "int8", "rtt_ms": 1},
        {"name": "auto-int8@1", "mode": "split", "k": "auto", "compression": "int8", "rtt_ms": 1},
        {"name": "k4-int8-exit@1", "mode": "split", "k": 4, "compression": "int8", "rtt_ms": 1, "exit": "trained"},
    ])
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "tether-cache"))
    (tmp_path / "docs").mkdir()
    return b


def test_every_stage_and_the_report(bench: Any, tmp_path: Path) -> None:
    budget = bench.Budget(600)
    assert bench.stage_reference(budget)
    ref = json.loads((tmp_path / "cache" / "reference.json").read_text())
    assert len(bench._prompt_keys(ref)) == 3 and ref["model"]["num_layers"] == 6
    assert bench.stage_train(budget, max_tokens=600, epochs=1, min_train_s=0.0)
    head = ExitHead.load(tmp_path / "head4.safetensors")
    assert head.layer == 4 and head.calibration
    assert bench.stage_agreement(budget)
    agree = json.loads((tmp_path / "cache" / "agreement.json").read_text())
    entry = agree["0"]["k"]["2"]
    assert set(entry["compression"]) == {"fp32", "fp16", "bf16", "int8", "int8-deflate", "int4"}
    assert entry["compression"]["int8-deflate"] == entry["compression"]["int8"]
    # fp32 teacher-forced split tokens equal the reference greedy tokens
    assert entry["compression"]["fp32"] == agree["0"]["targets"]
    assert "trained" in agree["0"]["k"]["4"]["exit"] and "trained" not in entry["exit"]
    assert bench.stage_speed(budget)
    data = bench.report()
    assert data["agreement"]["2"]["fp32"] == 1.0 and data["bytes_per_row"]["int8"] == 68
    assert data["targets"]["int8_bytes_ratio"]["value"] == pytest.approx(68 / 256)
    assert set(data["speed"]) == {"cloud@1", "k2-int8@1", "auto-int8@1", "k4-int8-exit@1"}
    grid = data["modelled_speed"]["1"]["tokens_per_s"]
    assert set(grid) == {"2", "4"} and all(v > 0 for row in grid.values() for v in row.values())
    assert grid["2"]["int4"] >= grid["2"]["fp32"]  # fewer bytes never model slower
    assert data["speed"]["k2-int8@1"]["hidden_bytes_per_token"] > 0
    # the confirmed exit (trained head checked by the model's head) never exits more than the trained head alone
    assert {"4/trained", "4/model-head", "4/confirmed", "2/model-head"} <= set(data["exits"])
    for t, c in zip(data["exits"]["4/trained"]["points"], data["exits"]["4/confirmed"]["points"]):
        assert c["exit_rate"] <= t["exit_rate"]
    deflate = data["row_bytes"]["int8-deflate"]["by_k"]["2"]
    assert deflate["rows"] == sum(len(a["targets"]) for a in agree.values())
    assert (tmp_path / "benchmarks" / "results" / "split.json").is_file()
    assert (tmp_path / "docs" / "split_bench.png").stat().st_size > 1000
    doc = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "<!-- bench:split -->" in doc and "| int8 | 68 |" in doc and "**Targets.**" in doc
    # a second run finds everything cached and only reports
    assert bench.stage_reference(bench.Budget(0)) and bench.stage_agreement(bench.Budget(0))


def test_budget_stops_and_resumes(bench: Any, tmp_path: Path) -> None:
    assert not bench.stage_reference(bench.Budget(-1))
    assert bench.stage_reference(bench.Budget(600))


def test_train_exit_and_show_cli(tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from tether.cli import app

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": "def f(x):\n    return x * %d\n" % i}) for i in range(40)))
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    # the tiny directory has no tokenizer: use the toy one
    import tether.models

    from split_toys import ToyTokenizer

    monkeypatch.setattr(tether.models, "load_tokenizer", lambda *a, **k: ToyTokenizer())
    out = tmp_path / "heads"
    result = CliRunner().invoke(app, ["split", "train-exit", "--model", str(tiny_dir), "--layer", "3", "--layer", "5",
                                      "--data", str(corpus), "--out", str(out), "--epochs", "1", "--shortlist", "64",
                                      "--rank", "4"])
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in out.iterdir())
    assert files == ["tiny-model-layer3.safetensors", "tiny-model-layer5.safetensors"]
    assert "threshold" in result.output and "exit rate" in result.output
    shown = CliRunner().invoke(app, ["split", "show", str(out / files[0])])
    assert shown.exit_code == 0 and "layer 3" in shown.output and "shortlist 64 tokens" in shown.output
    bad = CliRunner().invoke(app, ["split", "show", str(corpus)])
    assert bad.exit_code == 1 and "error" in bad.output


def test_rowbytes_reads_cached_exit_data_only(bench: Any, tmp_path: Path) -> None:
    """`--stage rowbytes` measures int8-deflate on cached layer-k states without a model."""
    import torch

    from tether.edge.split._exit_head import ExitData

    bench._model = lambda: pytest.fail("rowbytes must not load the model")
    part = tmp_path / "tether-cache" / "exit_data" / "abc"
    part.mkdir(parents=True)
    hidden = torch.randn(40, 64)
    hidden[:, 3] *= 300.0  # the outlier channel that makes int8 values small
    data = ExitData(hidden.half(), torch.zeros(40, 2, dtype=torch.long), torch.zeros(40, 2),
                    torch.zeros(40, dtype=torch.long), {"layer": 4, "model": bench._model_name(), "top_k": 2})
    data.save(part / "part0000-layer4.safetensors")
    bench.main(["--stage", "rowbytes"])
    out = json.loads((tmp_path / "benchmarks" / "results" / "split_rowbytes.json").read_text())
    row = out["layers"]["4"]
    assert row["rows"] == 40 and row["int8"] == 68 and row["fp32"] == 256 and row["mean"] < row["int8"]
    doc = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "<!-- bench:split-rowbytes -->" in doc and "| 4 | 40 | 68 |" in doc


def test_report_refuses_to_overwrite_with_nothing(bench: Any) -> None:
    with pytest.raises(SystemExit, match="no agreement results cached"):
        bench.main(["--stage", "report"])
