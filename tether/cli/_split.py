"""`tether split`: train and inspect early-exit heads for split mode.

Registered by `tether.cli`. Heavy imports stay inside the commands.

``tether split train-exit --layer 21`` teacher-forces a corpus through the full model once
(collecting layer-k hidden states and the model's top-32 next tokens at every position, in
resumable parts under the cache), then distils an `ExitHead` per layer and calibrates its
threshold on held-out sequences. ``tether split show HEAD`` prints a head's calibration.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

split_app = typer.Typer(name="split", help="Split computing: early-exit heads.", no_args_is_help=True)

_GROUP = 8  # sequences per cached collection part


def _head_weights(directory: Path) -> tuple[Any, Any, float]:
    """(LM head [V, H], final norm weight [H], rms eps) read straight from a model directory's safetensors."""
    from safetensors import safe_open

    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    index = directory / "model.safetensors.index.json"
    files = {}
    if index.is_file():
        files = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    want = {"lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"}
    found: dict[str, Any] = {}
    for name in want:
        path = directory / files.get(name, "model.safetensors")
        if not path.is_file():
            continue
        with safe_open(str(path), framework="pt") as f:
            if name in f.keys():  # noqa: SIM118 - safe_open has no __contains__
                found[name] = f.get_tensor(name).float()
    head = found.get("lm_head.weight", found.get("model.embed_tokens.weight"))  # tied embeddings
    if head is None or "model.norm.weight" not in found:
        from tether.errors import ModelError

        raise ModelError(f"{directory} has no LM head / final norm weights")
    return head, found["model.norm.weight"], float(config.get("rms_norm_eps", 1e-6))


def default_head_path(model: str, layer: int) -> Path:
    """Where `train-exit` writes a head by default: ``cache_dir()/exit_heads/<model>-layer<k>.safetensors``."""
    from tether.paths import cache_dir

    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in Path(model).name)
    return cache_dir() / "exit_heads" / f"{safe}-layer{layer}.safetensors"


class ModelOnDemand:
    """The full model, loaded the first time it is asked for (and only then)."""

    def __init__(self, model: str, runtime: Any = None) -> None:
        self.model, self.runtime = model, runtime

    def __call__(self) -> Any:
        if self.runtime is None:
            import torch
            from transformers import AutoModelForCausalLM

            from tether.models import ensure_hf_dir
            from tether.runtime import TorchCausalLM

            hf = AutoModelForCausalLM.from_pretrained(ensure_hf_dir(self.model, progress=False), dtype=torch.float32)
            hf.train(False)
            self.runtime = TorchCausalLM(hf, name=self.model)
        return self.runtime


def self_distilled(
    model: ModelOnDemand, tokenizer: Any, *, cache: Path, prompts: Sequence[str], max_new_tokens: int = 48,
    batch: int = 8, budget_s: float | None = None, log: Callable[[str], None] = print,
) -> list[list[int]] | None:
    """The model's greedy answers to `prompts` as chat sequences, generated once and cached in
    batches (resumable); None when the time budget ran out first."""
    from tether.cli._bench import import_lab

    self_distilled_corpus = import_lab("exit_corpus").self_distilled_corpus

    started = time.monotonic()
    key = hashlib.sha256(json.dumps([model.model, list(prompts), max_new_tokens]).encode()).hexdigest()[:12]
    path = cache / f"selfdistill-{key}.json"
    done: dict[str, list[list[int]]] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch):
        name = str(start)
        if name not in done:
            if budget_s is not None and time.monotonic() - started > budget_s:
                log(f"time budget spent while generating ({start} of {len(prompts)} prompts); run again to continue")
                return None
            t0 = time.perf_counter()
            done[name] = self_distilled_corpus(model(), tokenizer, prompts[start:start + batch],
                                               max_new_tokens=max_new_tokens, batch=batch)
            cache.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(done), encoding="utf-8")
            log(f"self-distillation: prompts {start + 1}-{min(len(prompts), start + batch)} of {len(prompts)} "
                f"answered in {time.perf_counter() - t0:.1f}s")
        out.extend(done[name])
    return out


def train_exit_heads(
    model: str, layers: Sequence[int], *, sequences: list[list[int]], cache: Path, out: dict[int, Path],
    shortlist: int = 8192, rank: int = 128, epochs: int = 4, target_agreement: float = 0.98,
    budget_s: float | None = None, seed: int = 0, log: Callable[[str], None] = print,
    runtime: ModelOnDemand | None = None, skip_existing: bool = False, min_train_s: float = 0.0,
) -> dict[int, Path] | None:
    """Collect (resumably) and train one exit head per layer; returns the written files,
    or None when the time budget ran out before collection finished (run again to continue).

    The full model is loaded only while parts are missing from `cache` (through `runtime`,
    which may already hold it). With `skip_existing`, layers whose head
    file exists are not retrained; with a budget, a layer's training starts only while at
    least `min_train_s` of it is left (else None: run again).
    """
    import torch

    from tether.edge.split import ExitData, collect_exit_datasets, train_exit_head
    from tether.models import ensure_hf_dir

    started = time.monotonic()
    cuts = sorted(set(int(k) for k in layers))
    fingerprint = hashlib.sha256(json.dumps([model, cuts, sequences]).encode()).hexdigest()[:12]
    parts_dir = cache / fingerprint
    parts_dir.mkdir(parents=True, exist_ok=True)
    groups = [sequences[i:i + _GROUP] for i in range(0, len(sequences), _GROUP)]

    def part(g: int, k: int) -> Path:
        return parts_dir / f"part{g:04d}-layer{k}.safetensors"

    missing = [g for g in range(len(groups)) if not all(part(g, k).is_file() for k in cuts)]
    if missing:
        log(f"collecting {len(missing)} of {len(groups)} parts ({sum(len(s) for s in sequences)} tokens in all)")
        full = (runtime or ModelOnDemand(model))()
        for g in missing:
            if budget_s is not None and time.monotonic() - started > budget_s:
                log(f"time budget spent: {len(missing) - missing.index(g)} parts left; run again to continue")
                return None
            t0 = time.perf_counter()
            collected = collect_exit_datasets(full, groups[g], layers=cuts, first_sequence=g * _GROUP)
            for k in cuts:
                collected[k].save(part(g, k))
            log(f"part {g + 1}/{len(groups)}: {len(collected[cuts[0]])} positions in {time.perf_counter() - t0:.1f}s")
        del full
    head_weight, norm_weight, eps = _head_weights(Path(ensure_hf_dir(model, progress=False)))
    written = {}
    for k in cuts:
        if skip_existing and out[k].is_file():
            written[k] = out[k]
            continue
        if budget_s is not None and budget_s - (time.monotonic() - started) < min_train_s:
            log(f"layer {k}: not enough of the time budget left to train; run again to continue")
            return None
        data = ExitData.concat([ExitData.load(part(g, k)) for g in range(len(groups))])
        log(f"layer {k}: training on {len(data)} positions (shortlist {shortlist}, rank {rank}, {epochs} epochs)")
        torch.manual_seed(seed)
        head = train_exit_head(data, lm_head=head_weight, norm_weight=norm_weight, eps=eps, layer=k,
                               shortlist=shortlist, rank=rank, epochs=epochs, target_agreement=target_agreement,
                               model=model, seed=seed, progress=log)
        written[k] = head.save(out[k])
        log(f"layer {k}: wrote {written[k]}; recommended threshold {head.threshold}")
        log(_calibration_table(head))
    return written


def _calibration_table(head: Any) -> str:
    lines = ["  threshold  exit rate  exit agreement  overall agreement"]
    for p in head.calibration:
        mark = "*" if head.threshold is not None and p.threshold == head.threshold else " "
        lines.append(f"{mark} {p.threshold:>9.3f} {p.exit_rate:>10.1%} {p.exit_agreement:>15.2%} {p.accuracy:>18.2%}")
    return "\n".join(lines)


@split_app.command("train-exit")
def train_exit(
    layer: Annotated[list[int], typer.Option("--layer", "-k", help="Split layer(s) to train a head for (repeatable).")],
    model: Annotated[Optional[str], typer.Option(help="Model (default: the cloud model).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Head file (one layer) or directory.")] = None,
    data: Annotated[Optional[list[Path]], typer.Option("--data", help="Training text: .jsonl (messages or text) or plain files; default: built-in corpus.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Training tokens to collect.")] = 40_000,
    shortlist: Annotated[int, typer.Option(help="Vocabulary the head scores (most predicted tokens).")] = 8192,
    rank: Annotated[int, typer.Option(help="Adapter rank.")] = 128,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 4,
    target_agreement: Annotated[float, typer.Option(help="Agreement the recommended threshold must reach.")] = 0.98,
    self_distill: Annotated[bool, typer.Option(help="Also train on the model's own answers to built-in chat prompts.")] = True,
    budget_s: Annotated[Optional[float], typer.Option(help="Stop collecting after this many seconds (resumable).")] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Train early-exit heads: distil the full model's next token from layer k (docs/split.md)."""
    from tether.cli._bench import import_lab

    corpus = import_lab("exit_corpus")
    TRAINING_PROMPTS, default_corpus, file_corpus = corpus.TRAINING_PROMPTS, corpus.default_corpus, corpus.file_corpus
    from tether.models import DEFAULT_CLOUD_MODEL, load_tokenizer
    from tether.paths import cache_dir

    name = model or DEFAULT_CLOUD_MODEL
    layers = sorted(set(layer))
    if out is not None and out.suffix == ".safetensors" and len(layers) > 1:
        raise typer.BadParameter("--out names one file; give a directory for several --layer")
    targets = {}
    for k in layers:
        if out is None:
            targets[k] = default_head_path(name, k)
        elif out.suffix == ".safetensors":
            targets[k] = out
        else:
            targets[k] = out / default_head_path(name, k).name
    tokenizer = load_tokenizer(name, progress=False)
    sequences = (file_corpus(tokenizer, data, max_tokens=max_tokens) if data
                 else default_corpus(tokenizer, max_tokens=max_tokens, seed=seed))
    if not sequences:
        raise typer.BadParameter("no training text found")
    full = ModelOnDemand(name)
    started = time.monotonic()
    if self_distill:
        own = self_distilled(full, tokenizer, cache=cache_dir() / "exit_data", prompts=TRAINING_PROMPTS,
                             budget_s=budget_s, log=typer.echo)
        if own is None:
            raise typer.Exit(3)
        sequences = own + sequences
    left = None if budget_s is None else max(1.0, budget_s - (time.monotonic() - started))
    written = train_exit_heads(name, layers, sequences=sequences, cache=cache_dir() / "exit_data", out=targets,
                               shortlist=shortlist, rank=rank, epochs=epochs, target_agreement=target_agreement,
                               budget_s=left, seed=seed, log=typer.echo, runtime=full)
    if written is None:
        raise typer.Exit(3)


@split_app.command("show")
def show(head: Annotated[Path, typer.Argument(help="An exit head file.")]) -> None:
    """Print an exit head's layer, size and calibration table."""
    from tether.edge.split import ExitHead
    from tether.errors import ModelError

    try:
        h = ExitHead.load(head)
    except ModelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{head}: model {h.model!r}, layer {h.layer}, hidden {h.hidden_size}, rank {h.rank}, "
               f"shortlist {h.shortlist} tokens, threshold {h.threshold}")
    typer.echo(_calibration_table(h))


def register(app: typer.Typer) -> None:
    """Add `tether split` to the command line."""
    app.add_typer(split_app, name="split")
