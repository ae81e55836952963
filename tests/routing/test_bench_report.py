"""The routing benchmark's report path (curves, APGR, targets, plot, markdown) on a synthetic cache."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import routing as bench
from benchmarks import routing_data as rd


@pytest.fixture
def fake_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "routing_cache"
    cache.mkdir()
    monkeypatch.setattr(rd, "CACHE", cache)
    monkeypatch.setattr(bench, "ROUTERS_DIR", tmp_path / "routers")
    monkeypatch.setattr(bench, "TOKEN_RUNS", cache / "token-runs-humaneval.jsonl")
    monkeypatch.setattr(rd, "pairs_path", lambda: cache / "pairs.npz")
    # The report path is what is tested, not the model search: two learned routers (one per
    # feature family the assertions name), two weight decays, a smaller bootstrap.
    learned = bench.query_learned()
    monkeypatch.setattr(bench, "query_learned",
                        lambda: {k: learned[k] for k in ("minilm-logistic", "edge-hidden-logistic")})
    monkeypatch.setattr(bench, "WEIGHT_DECAYS", (0.1, 10.0))
    monkeypatch.setattr(bench, "bootstrap_apgr", functools.partial(bench.bootstrap_apgr, n=200))
    rng = np.random.default_rng(0)
    for split in ("train", "humaneval"):
        probes, emb = {}, {}
        for p in rd.problems(split):
            hard = rng.random() < 0.4
            edge_ok = (not hard) and rng.random() < 0.9
            cloud_ok = rng.random() < (0.6 if hard else 0.95)
            for role, ok in (("edge", edge_ok), ("cloud", cloud_ok)):
                rd.append_jsonl(cache / f"answers-{role}-{split}.jsonl",
                                {"task_id": p.task_id, "token_ids": [1, 2, 3], "completion": "", "passed": bool(ok)})
            shift = -1.0 if hard else 0.0
            for k, v in {"prompt_logprobs": rng.normal(size=4) + shift, "draft_ids": np.arange(4.0),
                         "draft_logprob": rng.normal(size=4) + shift, "draft_top_prob": rng.uniform(size=4),
                         "draft_margin": rng.uniform(size=4), "draft_entropy": rng.uniform(size=4) - shift,
                         "hidden_mean": rng.normal(size=8) + shift, "hidden_last": rng.normal(size=8)}.items():
                probes[f"{p.task_id}|{k}"] = np.asarray(v, dtype=np.float32)
            emb[p.task_id] = (rng.normal(size=384) + shift).astype(np.float32)
        np.savez(cache / f"probes-{split}.npz", **probes)
        np.savez(cache / f"embeddings-{split}.npz", **emb)
    hidden = rng.normal(size=(500, 8)).astype(np.float16)
    np.savez(cache / "pairs.npz", hidden=hidden, signals=rng.uniform(size=(500, 3)).astype(np.float32),
             agree=(hidden[:, 0] > -0.5).astype(np.float32))
    for name, budget in bench.token_configs():
        for p in rd.problems("humaneval"):
            rd.append_jsonl(cache / "token-runs-humaneval.jsonl",
                            {"router": name, "budget": budget, "threshold": 0.5, "task_id": p.task_id, "token_ids": list(range(10)),
                             "routed": list(range(int(10 * budget))), "passed": bool(rng.random() < 0.5 + budget)})
    return cache


def test_report_on_a_synthetic_cache(fake_cache: Path, tmp_path: Path) -> None:
    rep = bench.report(write_docs=False)
    q = rep["query"]
    assert len(q["problems"]) == 41 and q["n_train"] == len(rd.problems("train"))
    names = {r["router"] for r in q["rows"]}
    assert {"signal:draft_mean_logprob", "learned:minilm-logistic", "learned:edge-hidden-logistic"} <= names
    for r in q["rows"]:
        assert 0.0 <= r["calib30_realised_fraction"] <= 1.0
        assert 0.0 <= r["quality_calib_quantile_he_fraction"] <= 1.0
        if r["router"].startswith("learned:"):
            assert r["weight_decay"] in bench.WEIGHT_DECAYS and 0.0 <= r["cv_auc"] <= 1.0
    # the synthetic "hard" queries carry a signal: learned routers should beat random here
    assert max(r["apgr"] for r in q["rows"] if r["router"].startswith("learned:")) > 0.5
    t = rep["token"]
    assert {r["router"] for r in t["rows"]} == {"confidence", "learned", "margin", "random"}
    assert set(t["summary"]) == {"confidence", "learned", "margin", "random"}
    assert any(x.startswith(("met", "missed")) for x in rep["targets"])
    md = bench.markdown(rep)
    assert "| router | APGR (95% CI" in md and "HumanEval/0, /4, ..., /160 (41 problems)" in md
    png = tmp_path / "curves.png"
    bench.plot(rep, png)
    assert png.stat().st_size > 10_000
    assert (tmp_path / "routers" / "query-minilm-logistic.safetensors").exists()
    assert (tmp_path / "routers" / "token-learned.safetensors").exists()
    train = [json.loads(x) for x in (fake_cache.parent / "routing_train.jsonl").read_text().splitlines()]
    assert len(train) == len(rd.problems("train")) and {"text", "label", "edge_quality", "cloud_quality"} <= set(train[0])


def test_benchmark_module_is_light_and_consistent() -> None:
    import subprocess
    import sys

    from benchmarks.lab.codeeval import STOP_STRINGS

    assert rd.STOP_STRINGS == STOP_STRINGS
    code = "import sys, benchmarks.routing; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # `tether --help` registers it without importing torch


def test_labels() -> None:
    e = np.array([1.0, 0.0, 0.0, 1.0])
    c = np.array([1.0, 1.0, 0.0, np.nan])
    # the routers' label: the edge's answer passes (a task both models fail is hard, label 0)
    assert bench.labels(e, c).tolist() == [1.0, 0.0, 0.0, 1.0]
    # the first label, kept for the report's comparison: edge pass >= cloud pass, edge pass where unknown
    assert bench.labels_as_good(e, c).tolist() == [1.0, 0.0, 1.0, 1.0]
    assert bench.labels_as_good(np.array([0.0]), np.array([np.nan])).tolist() == [0.0]


def test_auc() -> None:
    y = np.array([0, 0, 1, 1], dtype=float)
    assert bench.auc(np.array([0.1, 0.2, 0.8, 0.9]), y) == 1.0
    assert bench.auc(np.array([0.5, 0.5, 0.5, 0.5]), y) == 0.5
