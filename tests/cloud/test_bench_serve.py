"""`benchmarks/serve.py` end to end on the tiny model (the real run is `tether bench serve`)."""

from __future__ import annotations

import json
from pathlib import Path

from cloudkit import build_byte_tokenizer, build_tiny_byte_model


def test_bench_serve_runs_on_a_tiny_model(tmp_path: Path) -> None:
    from benchmarks.serve import main

    model_dir = tmp_path / "tiny"
    build_tiny_byte_model(seed=0).save_pretrained(model_dir)
    build_byte_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "serve.json"
    report = main(["--model", str(model_dir), "--sessions", "1", "2", "--rounds", "2", "--repeats", "1", "--out", str(out),
                   "--docs", str(tmp_path)])
    assert json.loads(out.read_text())["benchmark"] == "serve"
    rows = report["results"]
    assert len(rows) == 8 and all(r["identical_to_greedy"] for r in rows)
    assert all(r["verified_tokens"] == r["sessions"] * 2 * r["k"] for r in rows)
    doc = (tmp_path / "benchmarks.md").read_text()
    assert "<!-- bench:serve -->" in doc and "| 4 | 2 | on |" in doc


def test_bench_serve_registers_a_typer_command() -> None:
    import typer
    from typer.testing import CliRunner

    from benchmarks.serve import register

    app = typer.Typer()
    register(app)

    @app.command("other")
    def other() -> None:  # a second command keeps typer from collapsing the group
        pass

    out = CliRunner().invoke(app, ["serve", "--help"]).output
    assert "verified tokens/s" in out
