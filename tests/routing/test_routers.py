"""Each router scores as documented, decides at its threshold, and survives a save/load round trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tether.errors import ConfigurationError
from tether.routing import (
    Classifier,
    ConfidenceTokenRouter,
    Decision,
    FitOptions,
    LearnedQueryRouter,
    LearnedTokenRouter,
    MarginTokenRouter,
    Query,
    RandomRouter,
    RandomTokenRouter,
    Router,
    SignalRouter,
    calibrate_cloud_fraction,
    load_router,
    probe_query,
    token_signals,
)
from tether.routing._signals import EdgeProbe, TokenSignals


def make_probe(rng: np.random.Generator, shift: float = 0.0, hidden: int = 8) -> EdgeProbe:
    return EdgeProbe(
        prompt_logprobs=(rng.normal(size=5) - 2 + shift).astype(np.float32),
        draft_ids=(1, 2, 3),
        draft=TokenSignals(*(rng.uniform(size=(4, 3)).astype(np.float32) + shift)),
        hidden_mean=(rng.normal(size=hidden) + 3 * shift).astype(np.float32),
        hidden_last=rng.normal(size=hidden).astype(np.float32),
    )


def separable_queries(n: int = 120, seed: int = 0) -> tuple[list[Query], np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    qs = []
    for y in labels:
        emb = rng.normal(size=16).astype(np.float32)
        emb[0] += 3.0 if y else -3.0
        qs.append(Query(text=f"q{len(qs)}", probe=make_probe(rng, shift=0.5 if y else -0.5), embedding=emb))
    return qs, labels.astype(np.float32)


# -- the interface --------------------------------------------------------------------------


def test_decide_is_cloud_below_threshold() -> None:
    r = SignalRouter("draft_mean_logprob", threshold=-1.0)
    assert r.decide_score(-1.5) is Decision.CLOUD
    assert r.decide_score(-1.0) is Decision.EDGE
    assert r.decide_score(-0.5) is Decision.EDGE
    assert r.decide_score(-0.5, threshold=0.0) is Decision.CLOUD


def test_no_threshold_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="has no threshold"):
        SignalRouter().decide_score(0.0)
    # The shipped scores were measured with 16-token drafts; another draft length has none.
    with pytest.raises(ConfigurationError, match="holds no calibration scores"):
        SignalRouter(draft_tokens=4).threshold_for_fraction(0.3)


@pytest.mark.parametrize("router", [SignalRouter(), SignalRouter("prompt_logprob"), SignalRouter("draft_mean_margin"),
                                    ConfidenceTokenRouter(), MarginTokenRouter()], ids=repr)
def test_builtin_routers_ship_calibration_scores(router: Router) -> None:
    """A cloud fraction works out of the box: the shipped scores give a threshold sending that share."""
    from tether.routing import cloud_fraction
    from tether.routing._calibration import builtin_scores

    level, name = ("query", router.signal) if isinstance(router, SignalRouter) else ("token", router.kind)
    scores = builtin_scores(level, name)
    # One score per task-bank task (96) for query signals; enough for a 2-point fraction tolerance.
    assert scores is not None and scores.size >= 90 and np.all(np.diff(scores) >= 0)
    assert scores[0] < scores[-1]  # a real spread, not a constant
    for f in (0.1, 0.3, 0.7):
        assert cloud_fraction(scores, router.threshold_for_fraction(f)) == pytest.approx(f, abs=0.02)
    assert router.threshold_for_fraction(0.0) == -math.inf and router.threshold_for_fraction(1.0) == math.inf
    # A router's own calibration takes precedence over the shipped scores.
    calibrate_cloud_fraction(router, np.linspace(10.0, 20.0, 101), 0.5)
    assert router.threshold_for_fraction(0.5) == pytest.approx(15.0, abs=0.1)


def test_random_routers_calibrate_analytically() -> None:
    for router in (RandomRouter(), RandomTokenRouter()):
        assert router.threshold_for_fraction(0.25) == pytest.approx(0.25, abs=1e-3)
        assert router.threshold_for_fraction(0.0) == -math.inf and router.threshold_for_fraction(1.0) == math.inf


def test_signal_router_reads_the_probe() -> None:
    rng = np.random.default_rng(1)
    probe = make_probe(rng)
    q = Query(text="x", probe=probe)
    assert SignalRouter("draft_mean_logprob").score(q) == pytest.approx(float(probe.draft.logprob.mean()))
    assert SignalRouter("draft_min_logprob").score(q) == pytest.approx(float(probe.draft.logprob.min()))
    assert SignalRouter("draft_neg_entropy").score(q) == pytest.approx(-float(probe.draft.entropy.mean()))
    assert SignalRouter("prompt_logprob").score(q) == pytest.approx(float(probe.prompt_logprobs.mean()))
    assert SignalRouter("prompt_logprob").draft_tokens == 0
    with pytest.raises(ValueError, match="needs the edge probe"):
        SignalRouter().score(Query(text="x"))
    with pytest.raises(ValueError, match="unknown signal"):
        SignalRouter("nope")


def test_probe_on_tiny_model_matches_a_plain_forward(tiny_edge_hf) -> None:  # type: ignore[no-untyped-def]
    from tether.runtime import TorchCausalLM

    rt = TorchCausalLM(tiny_edge_hf)
    prompt = [5, 17, 300, 9000, 42]
    probe, state, _ = probe_query(rt, prompt, draft_tokens=4)
    rt.release(state)
    with torch.no_grad():
        out = tiny_edge_hf(torch.tensor([prompt + list(probe.draft_ids)]), output_hidden_states=True)
    logp = torch.log_softmax(out.logits[0].float(), -1)
    expect_prompt = [float(logp[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    np.testing.assert_allclose(probe.prompt_logprobs, expect_prompt, atol=1e-4)
    draft = list(probe.draft_ids)
    assert draft == [int(logp[len(prompt) - 1 + j].argmax()) for j in range(len(draft))]
    np.testing.assert_allclose(probe.draft.logprob, [float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(draft)], atol=1e-4)
    # hidden states: HF's last hidden_states entry is after the final norm; ours is before it.
    assert probe.hidden_last is not None and probe.hidden_last.shape == (64,)


def test_random_router_is_deterministic_and_uniform() -> None:
    r = RandomRouter(seed=3)
    scores = [r.score(Query(text=f"prompt {i}")) for i in range(2000)]
    assert scores[:5] == [r.score(Query(text=f"prompt {i}")) for i in range(5)]
    assert 0.0 <= min(scores) and max(scores) < 1.0
    assert abs(np.mean(scores) - 0.5) < 0.03
    assert RandomRouter(seed=4).score(Query(text="prompt 0")) != scores[0]


@pytest.mark.parametrize("features", [("embedding",), ("hidden_mean",), ("signals",), ("embedding", "hidden_mean", "signals")])
@pytest.mark.parametrize("model", ["logistic", "mlp"])
def test_learned_query_router_learns_a_separable_label(features: tuple[str, ...], model: str) -> None:
    qs, y = separable_queries()
    router = LearnedQueryRouter.fit(qs[:80], y[:80], features, FitOptions(model=model, epochs=200))
    test_scores = router.score_many(qs[80:])
    acc = np.mean((test_scores > 0.5) == (y[80:] > 0.5))
    assert acc >= 0.85, acc
    assert router.needs == ({"embedding"} if features == ("embedding",) else router.needs)
    assert all(0.0 <= s <= 1.0 for s in test_scores)


def test_learned_query_router_reports_missing_features() -> None:
    qs, y = separable_queries(20)
    router = LearnedQueryRouter.fit(qs, y, ("embedding",))
    with pytest.raises(ValueError, match="needs Query.embedding"):
        router.score(Query(text="x"))
    with pytest.raises(ValueError, match="non-empty subset"):
        LearnedQueryRouter(("pixels",), router.classifier)


def test_classifier_rejects_one_class() -> None:
    with pytest.raises(ValueError, match="one class"):
        Classifier.fit(np.zeros((4, 2)), np.ones(4))


# -- token routers ----------------------------------------------------------------------------


def test_confidence_and_margin_from_logits() -> None:
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    assert ConfidenceTokenRouter().score_token(logits) == pytest.approx(0.6, abs=1e-6)
    assert MarginTokenRouter().score_token(logits) == pytest.approx(0.3, abs=1e-6)
    sig = token_signals(logits[None, :])
    assert float(sig.entropy[0]) == pytest.approx(-(0.6 * math.log(0.6) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1)), abs=1e-5)
    assert ConfidenceTokenRouter(threshold=0.7).decide_token(logits) is Decision.CLOUD
    assert ConfidenceTokenRouter(threshold=0.5).decide_token(logits) is Decision.EDGE


def test_learned_token_router_predicts_agreement() -> None:
    rng = np.random.default_rng(0)
    n, h = 600, 12
    hidden = rng.normal(size=(n, h)).astype(np.float32)
    agree = (hidden[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(np.float32)
    signals = rng.uniform(size=(n, 3)).astype(np.float32)
    router = LearnedTokenRouter.fit(signals[:400], hidden[:400], agree[:400])
    p = router.score_features(signals[400:], hidden[400:])
    assert np.mean((p > 0.5) == (agree[400:] > 0.5)) > 0.85
    assert router.needs_hidden
    # the per-position call agrees with the batch call
    logits = torch.randn(50)
    one = router.score_token(logits, torch.from_numpy(hidden[0]))
    sig = token_signals(logits[None, :]).as_matrix()
    assert one == pytest.approx(float(router.score_features(sig, hidden[:1])[0]), abs=1e-6)


# -- save / load ------------------------------------------------------------------------------


def all_routers() -> list[Router]:
    qs, y = separable_queries(60)
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(100, 8)).astype(np.float32)
    signals = rng.uniform(size=(100, 3)).astype(np.float32)
    agree = (hidden[:, 0] > 0).astype(np.float32)
    return [
        SignalRouter("draft_min_logprob", draft_tokens=8, threshold=-2.5),
        RandomRouter(seed=7, threshold=0.3),
        LearnedQueryRouter.fit(qs, y, ("embedding", "signals"), FitOptions(model="mlp", hidden=8, epochs=20)),
        LearnedQueryRouter.fit(qs, y, ("hidden_mean",), FitOptions(epochs=20)),
        ConfidenceTokenRouter(threshold=0.4),
        MarginTokenRouter(),
        RandomTokenRouter(seed=2),
        LearnedTokenRouter.fit(signals, hidden, agree, ("hidden", "signals"), FitOptions(model="mlp", hidden=4, epochs=20)),
    ]


@pytest.mark.parametrize("index", range(8))
def test_save_load_round_trip(tmp_path: Path, index: int) -> None:
    router = all_routers()[index]
    calibrate_cloud_fraction(router, np.linspace(0, 1, 50), 0.3)
    path = tmp_path / "router.safetensors"
    router.save(path)
    back = load_router(path)
    assert type(back) is type(router)
    assert back.config() == router.config()
    assert back.threshold == router.threshold
    assert back.calibration == router.calibration == {"method": "cloud_fraction", "target": 0.3, "n": 50}
    np.testing.assert_array_equal(back.calibration_scores, router.calibration_scores)
    assert back.threshold_for_fraction(0.3) == router.threshold
    for k, v in router.tensors().items():
        np.testing.assert_array_equal(back.tensors()[k], v)
    # scores are identical after the round trip
    if isinstance(router, LearnedQueryRouter):
        qs, _ = separable_queries(10, seed=5)
        np.testing.assert_allclose(back.score_many(qs), router.score_many(qs), rtol=0, atol=0)
    if isinstance(router, LearnedTokenRouter):
        rng = np.random.default_rng(9)
        s, h = rng.uniform(size=(5, 3)).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)
        np.testing.assert_array_equal(back.score_features(s, h), router.score_features(s, h))


def test_router_file_is_safetensors_with_json_metadata(tmp_path: Path) -> None:
    from safetensors import safe_open

    path = tmp_path / "r.safetensors"
    SignalRouter(threshold=-1.0).save(path)
    with safe_open(str(path), framework="np") as fh:
        meta = fh.metadata()
    assert meta["format"] == "tether-router" and meta["version"] == "1"
    doc = json.loads(meta["router"])
    assert doc == {"kind": "signal", "level": "query", "config": {"signal": "draft_mean_logprob", "draft_tokens": 16},
                   "threshold": -1.0, "calibration": {}}
    assert b"pickle" not in path.read_bytes()


def test_load_refuses_other_files(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": np.zeros(2, dtype=np.float32)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ConfigurationError, match="is not a Tether router file"):
        load_router(other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 3)
    with pytest.raises(ConfigurationError, match="cannot read router file"):
        load_router(garbage)
    newer = tmp_path / "newer.safetensors"
    save_file({}, str(newer), metadata={"format": "tether-router", "version": "9", "router": "{}"})
    with pytest.raises(ConfigurationError, match="version '9' is not supported"):
        load_router(newer)
    unknown = tmp_path / "unknown.safetensors"
    save_file({}, str(unknown), metadata={"format": "tether-router", "version": "1",
                                          "router": json.dumps({"kind": "oracle", "config": {}})})
    with pytest.raises(ConfigurationError, match="unknown router kind 'oracle'"):
        load_router(unknown)
