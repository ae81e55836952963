"""`tether bench minions`: the summary, targets, plot and docs section from cached answers (no model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import benchmarks.minions as bench


def row(method: str, qid: str, correct: bool, cloud: int, edge: int = 0) -> dict[str, Any]:
    return {"id": qid, "method": method, "correct": correct, "answer": None, "cloud_prompt_tokens": cloud - 10,
            "cloud_completion_tokens": 10, "edge_prompt_tokens": edge, "edge_completion_tokens": 0,
            "whole_document_tokens": 20_000, "rounds": 1, "wall_s": 1.0}


def test_summary_and_targets() -> None:
    rows = {
        "cloud-only": [row("cloud-only", "a", True, 20_000), row("cloud-only", "b", True, 20_000)],
        "minions": [row("minions", "a", True, 2_000, 30_000), row("minions", "b", False, 3_000, 30_000)],
        "minion": [row("minion", "a", False, 500, 20_000), row("minion", "b", False, 700, 20_000)],
        "edge-only": [row("edge-only", "a", False, 0, 20_000), row("edge-only", "b", True, 0, 20_000)],
    }
    s = bench.summarise(rows)
    m = s["methods"]
    assert m["minions"]["cloud_token_reduction_vs_cloud_only"] == 8.0
    assert m["minions"]["accuracy_vs_cloud_only"] == 0.5
    assert m["minion"]["cloud_token_reduction_vs_cloud_only"] == round(20_000 / 600, 1)
    targets = {t["method"]: t["met"] for t in s["targets"]}
    assert targets == {"minions": False, "minion": True}  # 8x but only 50% of the accuracy; 33x


def test_report_writes_plot_and_section(tmp_path: Path, monkeypatch: Any) -> None:
    docs = bench.select(["report1"], 2)
    fps = bench.fingerprints()
    for method in bench.METHODS:
        for q in docs[0].questions:
            r = row(method, q.id, method != "edge-only", 20_000 if method == "cloud-only" else 900)
            answer = f"{q.answer - 7} + 7 = {q.answer}" if method != "edge-only" else "1"
            bench.store(tmp_path, method, r | {"fingerprint": fps[method], "answer": answer})
    import benchmarks._report as cli

    monkeypatch.setattr(cli, "repo_root", lambda: tmp_path)
    data = bench.report(docs, tmp_path)
    assert (tmp_path / "docs" / "minions_cost_accuracy.png").stat().st_size > 1000
    text = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert "<!-- bench:minions -->" in text and "| minions | 2/2 (100%) | 900 | 22.2x |" in text
    assert data["summary"]["methods"]["edge-only"]["accuracy"] == 0.0


def test_final_answer_and_selection() -> None:
    assert bench.final_answer("Cobalt: 1,196\nHarbor: 3,598\nAnswer: 4,794") == "4,794"
    assert bench.final_answer("4794") == "4794"
    assert [len(d.questions) for d in bench.select(None, 1)] == [1, 1]


def test_targets_without_the_cloud_only_baseline() -> None:
    rows = {"minions": [row("minions", "a", True, 2_000)], "minion": [row("minion", "a", False, 800)]}
    targets = {t["method"]: t for t in bench.summarise(rows)["targets"]}
    assert targets["minions"]["met"] is None  # 10x vs the whole-document prompt, accuracy unknown
    assert "cloud-only accuracy not measured" in targets["minions"]["measured"]
    assert targets["minion"]["met"] is True  # 25x


def test_a_partial_run_is_compared_on_its_own_questions() -> None:
    rows = {
        "cloud-only": [row("cloud-only", "a", True, 20_000), row("cloud-only", "b", False, 30_000)],
        "minions": [row("minions", "b", False, 2_000)],
    }
    m = bench.summarise(rows)["methods"]["minions"]
    assert m["shared_with_cloud_only"] == 1 and m["cloud_token_reduction_vs_cloud_only"] == 15.0
    assert "accuracy_vs_cloud_only" not in m  # cloud-only got question b wrong too: no ratio
    target = bench.summarise(rows)["targets"][0]
    assert target["met"] is None and "cloud-only answered none of them right" in target["measured"]
