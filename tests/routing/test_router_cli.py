"""`tether router` train / train-token / calibrate / show, on data that needs no language model.

Query routers here use MiniLM embeddings only (a small encoder); the token router trains from
a pairs file. Commands that load the edge or cloud model are exercised by the benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tether.cli import app
from tether.routing import LearnedQueryRouter, LearnedTokenRouter, load_router

runner = CliRunner()

EASY = ["reverse a string", "add two numbers", "return the maximum of a list", "count the vowels in a word",
        "check whether a number is even", "join a list of strings with commas", "square every element",
        "return the length of a list", "convert a string to upper case", "sum a list of integers"]
HARD = ["implement a red-black tree with deletion", "write a regular expression engine with backtracking",
        "solve the travelling salesman problem with dynamic programming over subsets",
        "parse and evaluate arithmetic with operator precedence and unary minus",
        "compute the edit distance with affine gap penalties", "implement a B-tree with node splitting",
        "write a sudoku solver with constraint propagation", "find strongly connected components with Tarjan",
        "implement Dijkstra with a decrease-key heap", "build a LALR parser table generator"]


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    with path.open("w") as fh:
        for t in EASY:
            fh.write(json.dumps({"text": t, "label": 1, "edge_quality": 1, "cloud_quality": 1}) + "\n")
        for t in HARD:
            fh.write(json.dumps({"text": t, "label": 0, "edge_quality": 0, "cloud_quality": 1}) + "\n")
    return path


def test_train_calibrate_show(tmp_path: Path, labelled: Path) -> None:
    out = tmp_path / "r.safetensors"
    res = runner.invoke(app, ["router", "train", str(labelled), "--out", str(out), "--features", "embedding",
                              "--epochs", "200", "--cloud-fraction", "0.5"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["records"] == 20 and report["train_accuracy"] >= 0.9
    router = load_router(out)
    assert isinstance(router, LearnedQueryRouter) and router.features == ("embedding",)
    assert router.calibration["method"] == "cloud_fraction"

    res = runner.invoke(app, ["router", "calibrate", str(out), "--prompts", str(labelled), "--cloud-fraction", "0.3"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["cloud_fraction"] == pytest.approx(0.3)
    assert load_router(out).calibration["target"] == 0.3

    q = tmp_path / "q.safetensors"
    res = runner.invoke(app, ["router", "calibrate", str(out), "--prompts", str(labelled), "--quality-target", "1.0",
                              "--out", str(q)])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["reached"] and rep["quality"] == 1.0 and rep["cloud_fraction"] <= 0.6

    res = runner.invoke(app, ["router", "show", str(q)])
    assert res.exit_code == 0
    shown = json.loads(res.stdout)
    assert shown["kind"] == "learned-query" and shown["calibration"]["method"] == "quality"
    assert shown["parameters"]["w1"] == [384, 1]


def test_calibrate_needs_one_target(tmp_path: Path, labelled: Path) -> None:
    out = tmp_path / "r.safetensors"
    assert runner.invoke(app, ["router", "train", str(labelled), "--out", str(out), "--epochs", "5"]).exit_code == 0
    res = runner.invoke(app, ["router", "calibrate", str(out), "--prompts", str(labelled)])
    assert res.exit_code != 0 and "exactly one of" in res.output


def test_train_token_from_a_pairs_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(300, 16)).astype(np.float16)
    agree = (hidden[:, 0] > 0).astype(np.float32)
    pairs = tmp_path / "pairs.npz"
    np.savez(pairs, hidden=hidden, signals=rng.uniform(size=(300, 3)).astype(np.float32), agree=agree)
    out = tmp_path / "t.safetensors"
    res = runner.invoke(app, ["router", "train-token", str(tmp_path / "unused.jsonl"), "--pairs", str(pairs),
                              "--out", str(out), "--cloud-fraction", "0.3"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["positions"] == 300 and rep["train_accuracy"] > 0.9
    router = load_router(out)
    assert isinstance(router, LearnedTokenRouter) and router.threshold is not None
    assert router.threshold_for_fraction(0.3) == pytest.approx(router.threshold)


def test_bad_data_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    res = runner.invoke(app, ["router", "train", str(bad)])
    assert res.exit_code != 0
    assert "lacks label" in str(res.exception) or "lacks label" in res.output
