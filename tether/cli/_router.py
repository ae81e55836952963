"""`tether router`: train, calibrate and inspect routers.

Registered by `tether.cli`. Heavy imports stay inside the commands. Commands that need the
edge model (probe features, token positions) load it once; the cloud model is loaded only
by `train-token` when it has to generate agreement pairs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

router_app = typer.Typer(
    name="router",
    help="Routers between edge and cloud: train, calibrate, show.",
    no_args_is_help=True,
)


def _edge(name: Optional[str], dtype: str) -> tuple[Any, Any]:
    import torch

    from tether.models import DEFAULT_EDGE_MODEL, load_hf
    from tether.runtime import TorchCausalLM

    hf, tok = load_hf(name or DEFAULT_EDGE_MODEL, dtype=getattr(torch, dtype))
    return TorchCausalLM(hf, name=name or DEFAULT_EDGE_MODEL), tok


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _echo_json(doc: Any) -> None:
    typer.echo(json.dumps(doc, indent=2, default=float))


@router_app.command("train")
def train(
    data: Annotated[Path, typer.Argument(help="Labelled JSONL: text, label (1 = the edge's answer is good enough, e.g. passes its tests), optional prompt.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Router file to write (.safetensors).")] = Path("router.safetensors"),
    features: Annotated[str, typer.Option(help="Comma-separated: embedding, hidden_mean, hidden_last, signals.")] = "embedding",
    model: Annotated[str, typer.Option(help="logistic or mlp.")] = "logistic",
    epochs: Annotated[int, typer.Option(help="Full-batch training steps.")] = 300,
    weight_decay: Annotated[float, typer.Option(help="L2 penalty.")] = 1e-2,
    draft_tokens: Annotated[int, typer.Option(help="Edge draft length behind the 'signals' feature.")] = 16,
    cloud_fraction: Annotated[Optional[float], typer.Option(help="Also calibrate to this cloud share of the training prompts.")] = None,
    edge_model: Annotated[Optional[str], typer.Option(help="Edge model (for hidden/signals features).")] = None,
    dtype: Annotated[str, typer.Option(help="Edge weights dtype: float32 or bfloat16.")] = "float32",
) -> None:
    """Train a learned query router (Hybrid LLM / RouteLLM style) from labelled JSONL."""
    import numpy as np

    from tether.routing import calibrate_cloud_fraction
    from tether.routing import FitOptions
    from tether.routing import build_queries, read_records
    from tether.routing import LearnedQueryRouter

    feats = _split(features)
    records = read_records(data, need=("text", "label"))
    labels = np.array([float(r["label"]) for r in records])
    needs = LearnedQueryRouter(feats, _dummy_classifier()).needs if feats else frozenset()
    edge = tok = None
    if "probe" in needs:
        edge, tok = _edge(edge_model, dtype)
    queries = build_queries(records, needs, edge=edge, tokenizer=tok, draft_tokens=draft_tokens)
    router = LearnedQueryRouter.fit(queries, labels, feats, FitOptions(model=model, epochs=epochs, weight_decay=weight_decay),
                                    draft_tokens=draft_tokens)
    scores = router.score_many(queries)
    acc = float(np.mean((scores >= 0.5) == (labels > 0.5)))
    if cloud_fraction is not None:
        calibrate_cloud_fraction(router, scores, cloud_fraction)
    router.save(out)
    _echo_json({"router": str(out), "kind": router.kind, "features": feats, "model": model, "records": len(records),
                "positive_share": float(labels.mean()), "train_accuracy": acc, "threshold": router.threshold})


def _dummy_classifier() -> Any:
    import numpy as np

    from tether.routing import Classifier

    return Classifier({"mean": np.zeros(1), "std": np.ones(1), "w1": np.zeros((1, 1)), "b1": np.zeros(1)})


@router_app.command("train-token")
def train_token(
    data: Annotated[Path, typer.Argument(help="JSONL prompts (text, optional prompt) to generate agreement pairs from.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Router file to write (.safetensors).")] = Path("token-router.safetensors"),
    pairs: Annotated[Optional[Path], typer.Option(help="Pairs cache (.npz): read if it exists, else written after generating.")] = None,
    features: Annotated[str, typer.Option(help="Comma-separated: hidden, signals.")] = "hidden,signals",
    model: Annotated[str, typer.Option(help="logistic or mlp.")] = "logistic",
    epochs: Annotated[int, typer.Option(help="Full-batch training steps.")] = 300,
    max_new_tokens: Annotated[int, typer.Option(help="Edge answer length per prompt.")] = 128,
    cloud_fraction: Annotated[Optional[float], typer.Option(help="Also calibrate to this share of token positions.")] = None,
    edge_model: Annotated[Optional[str], typer.Option(help="Edge model.")] = None,
    cloud_model: Annotated[Optional[str], typer.Option(help="Cloud model.")] = None,
    dtype: Annotated[str, typer.Option(help="Weights dtype of both models.")] = "float32",
) -> None:
    """Train the per-token reward head: P(edge's next token == cloud's), from pairs the two models generate.

    For each prompt the edge answers greedily; the cloud is teacher-forced over the same
    tokens; each position is labelled by whether the two argmaxes agree. Features are the
    edge's last-layer hidden state and its confidence, margin and entropy there.
    """
    import numpy as np

    from tether.routing import calibrate_cloud_fraction
    from tether.routing import FitOptions
    from tether.routing import LearnedTokenRouter

    if pairs is not None and pairs.exists():
        z = np.load(pairs)
        hidden, signals, agree = z["hidden"].astype(np.float32), z["signals"], z["agree"]
    else:
        hidden, signals, agree = _generate_pairs(data, edge_model, cloud_model, dtype, max_new_tokens)
        if pairs is not None:
            pairs.parent.mkdir(parents=True, exist_ok=True)
            np.savez(pairs, hidden=hidden.astype(np.float16), signals=signals, agree=agree)
    feats = tuple(_split(features))
    router = LearnedTokenRouter.fit(signals, hidden, agree, feats, FitOptions(model=model, epochs=epochs))
    scores = router.score_features(signals, hidden)
    if cloud_fraction is not None:
        calibrate_cloud_fraction(router, scores, cloud_fraction)
    router.save(out)
    _echo_json({"router": str(out), "kind": router.kind, "features": list(feats), "positions": int(agree.size),
                "agreement": float(agree.mean()), "train_accuracy": float(np.mean((scores >= 0.5) == (agree > 0.5))),
                "threshold": router.threshold})


def _generate_pairs(data: Path, edge_model: Optional[str], cloud_model: Optional[str], dtype: str,
                    max_new_tokens: int) -> tuple[Any, Any, Any]:
    import numpy as np
    import torch

    from tether.models import DEFAULT_CLOUD_MODEL, load_hf
    from tether.cli._bench import import_lab

    agreement_pairs = import_lab("collect").agreement_pairs
    from tether.routing import edge_answer_positions, prompt_ids, read_records
    from tether.runtime import TorchCausalLM

    records = read_records(data)
    edge, tok = _edge(edge_model, dtype)
    chf, _ = load_hf(cloud_model or DEFAULT_CLOUD_MODEL, dtype=getattr(torch, dtype))
    cloud = TorchCausalLM(chf, name=cloud_model or DEFAULT_CLOUD_MODEL)
    hs, ss, ys = [], [], []
    for r in records:
        ids = prompt_ids(r, tok)
        _, _, answer = edge_answer_positions(edge, ids, max_new_tokens=max_new_tokens,
                                             eos_ids=edge.info.eos_token_ids, want_hidden=False)
        if not answer:
            continue
        ap = agreement_pairs(edge, cloud, ids, answer)
        hs.append(ap.hidden)
        ss.append(ap.signals)
        ys.append(ap.agree)
    return np.concatenate(hs), np.concatenate(ss), np.concatenate(ys)


@router_app.command("calibrate")
def calibrate(
    router_path: Annotated[Path, typer.Argument(help="Router file (updated in place unless --out).")],
    prompts: Annotated[Path, typer.Option("--prompts", help="JSONL of representative prompts (text, optional prompt; labelled for --quality-target).")],
    cloud_fraction: Annotated[Optional[float], typer.Option(help="Share of queries (or token positions) to send to the cloud.")] = None,
    quality_target: Annotated[Optional[float], typer.Option(help="Quality to reach, as a fraction of cloud-only (needs edge_quality, cloud_quality).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write here instead of in place.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Token routers: edge answer length per prompt.")] = 128,
    edge_model: Annotated[Optional[str], typer.Option(help="Edge model (probe / token features).")] = None,
    dtype: Annotated[str, typer.Option(help="Edge weights dtype.")] = "float32",
) -> None:
    """Set a router's threshold: to a cloud fraction on unlabelled prompts (a score quantile, as in
    RouteLLM), or to a quality target on labelled prompts."""
    import numpy as np

    from tether.errors import ConfigurationError
    from tether.routing import load_router
    from tether.routing import calibrate_cloud_fraction, calibrate_quality
    from tether.routing import edge_answer_positions, prompt_ids, read_records, score_records
    from tether.routing import QueryRouter
    from tether.routing import TokenRouter

    if (cloud_fraction is None) == (quality_target is None):
        raise typer.BadParameter("give exactly one of --cloud-fraction and --quality-target")
    router = load_router(router_path)
    need = ("text", "edge_quality", "cloud_quality") if quality_target is not None else ("text",)
    records = read_records(prompts, need=need)
    edge = tok = None
    if isinstance(router, TokenRouter) or "probe" in getattr(router, "needs", frozenset()):
        edge, tok = _edge(edge_model, dtype)
    if isinstance(router, QueryRouter):
        scores = score_records(router, records, edge=edge, tokenizer=tok)
    elif isinstance(router, TokenRouter):
        if quality_target is not None:
            raise ConfigurationError("token routers calibrate to a cloud fraction of positions only")
        assert edge is not None
        per = []
        for r in records:
            sig, hid, _ = edge_answer_positions(edge, prompt_ids(r, tok), max_new_tokens=max_new_tokens,
                                                eos_ids=edge.info.eos_token_ids, want_hidden=bool(router.needs_hidden))
            per.append(router.score_features(sig, hid))
        scores = np.concatenate(per)
    else:  # pragma: no cover - every router is one of the two
        raise ConfigurationError(f"cannot calibrate a {type(router).__name__}")
    report: dict[str, Any] = {"router": str(out or router_path), "kind": router.kind, "n_scores": int(scores.size)}
    if cloud_fraction is not None:
        report["threshold"] = calibrate_cloud_fraction(router, scores, cloud_fraction)
        report["cloud_fraction"] = float(np.mean(scores < router.threshold))  # type: ignore[operator]
    else:
        assert quality_target is not None
        e = [float(r["edge_quality"]) for r in records]
        c = [float(r["cloud_quality"]) for r in records]
        cal = calibrate_quality(router, scores, e, c, quality_target)
        router.remember_scores(scores)
        report.update(threshold=cal.threshold, cloud_fraction=cal.cloud_fraction, quality=cal.quality,
                      target=cal.target, reached=cal.reached)
    router.save(out or router_path)
    _echo_json(report)


@router_app.command("show")
def show(router_path: Annotated[Path, typer.Argument(help="Router file.")]) -> None:
    """Print a router file's kind, config, threshold and calibration record."""
    from tether.routing import load_router

    router = load_router(router_path)
    doc = router.to_json()
    doc["parameters"] = {k: list(v.shape) for k, v in router.tensors().items()}
    doc["calibration_scores"] = None if router.calibration_scores is None else int(router.calibration_scores.size)
    _echo_json(doc)


def register(app: typer.Typer) -> None:
    """Attach `tether router` to the root app."""
    app.add_typer(router_app, name="router")
