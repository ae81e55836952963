"""Early exit at the split layer: score the next token on the edge, from layer k's hidden state.

What belongs here: the two exits split mode can use — `ModelHeadExit` (the model's own final
norm + LM head applied at layer k, the "logit lens") and `ExitHead` (a small head trained to
imitate the full model from layer k: `tether split train-exit`) — their file format, the
data collection and training that make an `ExitHead`, and its calibration table. What does
not: when to exit (`_split.py` compares `ExitProposal.confidence` with the threshold).

An `ExitHead` is, for hidden state h at layer k (shapes [n, H]):

    x = h + (h @ down) @ up              a low-rank residual adapter, [H, r] and [r, H]
    logits = rmsnorm(x) * norm @ W_S.T   over a shortlist S of the vocabulary, [n, |S|]

W_S are the LM head's rows for the |S| tokens the model predicts most often (stored in the
file as float16), so scoring costs |S| x H instead of V x H multiply-adds (8192 of Qwen's
151,936 tokens by default: ~5% of the full head). A token outside S is never exited on.
It is trained by distillation (Schuster et al. 2022, "Confident Adaptive Language
Modeling"; Elbayad et al. 2020, "Depth-Adaptive Transformer"): cross-entropy against the
full model's top-K distribution at the same position, computed over S.

Confidence is the exit distribution's top probability; `calibration` maps thresholds to the
exit rate and top-1 agreement with the full model measured on held-out positions.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from tether.errors import ConfigurationError, ModelError
from tether.runtime import LayerwiseLM
from tether.sampling import sample, warp

__all__ = [
    "CalibrationPoint",
    "ConfirmedExit",
    "EarlyExit",
    "ExitData",
    "ExitHead",
    "ExitProposal",
    "ModelHeadExit",
    "calibrate",
    "collect_exit_data",
    "collect_exit_datasets",
    "train_exit_head",
]

FORMAT = "tether.exit_head/1"
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995)


@dataclass(frozen=True, slots=True)
class ExitProposal:
    """What an exit proposes for one position: the token and how sure it is (top probability)."""

    token: int
    confidence: float


class EarlyExit(Protocol):
    """Scores the next token from layer-k hidden states, on the edge."""

    @property
    def layer(self) -> int | None:
        """The split layer it was made for (None: any layer)."""
        ...

    def propose(
        self, hidden: torch.Tensor, *, temperature: float, top_k: int, top_p: float,
        generator: torch.Generator | None,
    ) -> ExitProposal:
        """Propose the token after the position of `hidden` ([H] or [1, H]).

        Greedy (temperature 0) proposes the argmax; otherwise a token drawn from the warped
        exit distribution. Confidence is the temperature-1 top probability either way.
        """
        ...


def _propose(
    logits: torch.Tensor, ids: torch.Tensor | None, *, temperature: float, top_k: int, top_p: float,
    generator: torch.Generator | None,
) -> ExitProposal:
    """Shared by both exits: [V'] logits over `ids` (None: the whole vocabulary)."""
    probs = torch.softmax(logits.float(), dim=-1)
    confidence, best = torch.max(probs, dim=-1)
    if temperature <= 0.0:
        index = int(best)
    else:
        index = sample(warp(logits, temperature=temperature, top_k=top_k, top_p=top_p), generator)
    token = index if ids is None else int(ids[index])
    return ExitProposal(token=token, confidence=float(confidence))


class ModelHeadExit:
    """The model's own final norm + LM head applied at the split layer (no training needed).

    Costs a full LM head on the edge (for Qwen2.5-1.5B as much as ~5 decoder layers).
    """

    layer: int | None = None

    def __init__(self, runtime: LayerwiseLM) -> None:
        self.runtime = runtime

    def propose(
        self, hidden: torch.Tensor, *, temperature: float, top_k: int, top_p: float,
        generator: torch.Generator | None,
    ) -> ExitProposal:
        logits = self.runtime.head(hidden.reshape(1, -1))[0]  # [V]
        return _propose(logits, None, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)


class ConfirmedExit:
    """An exit that a second one must confirm: the device exits only where both propose the
    same token, at the lower of their confidences (else confidence 0: never exits).

    Split mode builds it for ``exit_confirm=True``: a trained head checked by the model's own
    head. Two heads that were fitted differently rarely agree on the same wrong token, so
    fewer exits are wrong at a given threshold — for the cost of both heads on the device.
    When sampling, each draws its own token, so they agree less often than when greedy.
    """

    def __init__(self, exit: EarlyExit, check: EarlyExit) -> None:
        self.exit, self.check = exit, check

    @property
    def layer(self) -> int | None:
        return self.exit.layer

    def propose(
        self, hidden: torch.Tensor, *, temperature: float, top_k: int, top_p: float,
        generator: torch.Generator | None,
    ) -> ExitProposal:
        first = self.exit.propose(hidden, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        second = self.check.propose(hidden, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        same = first.token == second.token
        return ExitProposal(token=first.token, confidence=min(first.confidence, second.confidence) if same else 0.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class CalibrationPoint:
    """At `threshold`: the share of positions exited and the exits' top-1 agreement with the full model.

    `accuracy` is the agreement of all positions when the exited ones take the exit's token
    and the rest the full model's (what split mode outputs, teacher-forced).
    """

    threshold: float
    exit_rate: float
    exit_agreement: float
    accuracy: float


class ExitHead(torch.nn.Module):
    """A small trained early-exit head for one model at one split layer.

    Build with `train_exit_head`, or `ExitHead.load(path)`; save with `save(path)`
    (safetensors; no pickle).

    Attributes:
        layer: the split layer it reads.
        model: the model's name when trained.
        calibration: threshold -> exit rate / agreement, measured on held-out positions.
        threshold: the recommended threshold (lowest calibrated one reaching the
            agreement target it was trained for), or None.
    """

    vocab_ids: torch.Tensor  # [S] token ids of the shortlist (a buffer)
    vocab_weight: torch.Tensor  # [S, H] their LM head rows (a frozen buffer)

    def __init__(
        self, *, layer: int, hidden_size: int, rank: int, vocab_ids: torch.Tensor, vocab_weight: torch.Tensor,
        norm_weight: torch.Tensor, eps: float, model: str = "", calibration: Sequence[CalibrationPoint] = (),
        threshold: float | None = None,
    ) -> None:
        super().__init__()
        if vocab_ids.ndim != 1 or vocab_weight.shape != (vocab_ids.shape[0], hidden_size):
            raise ConfigurationError(
                f"exit head vocabulary: ids {tuple(vocab_ids.shape)} and weight {tuple(vocab_weight.shape)} "
                f"do not match hidden size {hidden_size}"
            )
        self.layer = int(layer)
        self.hidden_size = int(hidden_size)
        self.eps = float(eps)
        self.model = model
        self.calibration = tuple(calibration)
        self.threshold = threshold
        self.down = torch.nn.Parameter(torch.zeros(hidden_size, rank))
        self.up = torch.nn.Parameter(torch.zeros(rank, hidden_size))
        self.norm = torch.nn.Parameter(norm_weight.detach().float().clone())
        self.register_buffer("vocab_ids", vocab_ids.detach().long().clone())
        self.register_buffer("vocab_weight", vocab_weight.detach().float().clone())  # [S, H], frozen
        torch.nn.init.normal_(self.down, std=1.0 / math.sqrt(hidden_size))  # up = 0: starts as the logit lens

    @property
    def rank(self) -> int:
        return int(self.down.shape[1])

    @property
    def shortlist(self) -> int:
        return int(self.vocab_ids.shape[0])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, H] hidden states at the split layer -> [n, |S|] logits over the shortlist."""
        assert hidden.ndim == 2 and hidden.shape[1] == self.hidden_size, tuple(hidden.shape)
        x = hidden.float()
        x = x + (x @ self.down) @ self.up
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm
        logits: torch.Tensor = x @ self.vocab_weight.T
        return logits

    @torch.inference_mode()
    def propose(
        self, hidden: torch.Tensor, *, temperature: float, top_k: int, top_p: float,
        generator: torch.Generator | None,
    ) -> ExitProposal:
        logits = self.forward(hidden.reshape(1, -1).float().cpu())[0]
        return _propose(logits, self.vocab_ids, temperature=temperature, top_k=top_k, top_p=top_p,
                        generator=generator)

    def threshold_for(self, agreement: float) -> float | None:
        """The lowest calibrated threshold whose exits agree with the full model at least `agreement`."""
        ok = [p.threshold for p in self.calibration if p.exit_agreement >= agreement and p.exit_rate > 0]
        return min(ok) if ok else None

    # -- files ----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the head as safetensors (shortlist rows in float16); returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "adapter.down": self.down.detach().contiguous(),
            "adapter.up": self.up.detach().contiguous(),
            "norm.weight": self.norm.detach().contiguous(),
            "vocab.ids": self.vocab_ids.contiguous(),
            "vocab.weight": self.vocab_weight.half().contiguous(),
        }
        meta = {
            "format": FORMAT, "layer": str(self.layer), "hidden_size": str(self.hidden_size),
            "eps": repr(self.eps), "model": self.model,
            "threshold": "" if self.threshold is None else repr(self.threshold),
            "calibration": json.dumps([_point_dict(p) for p in self.calibration]),
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ExitHead:
        """Read a head written by `save`.

        Raises:
            ModelError: not a readable exit head file (missing, wrong format or shapes).
        """
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ModelError(f"{path} is not a Tether exit head ({FORMAT})")
                t = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iterator
            calibration = [CalibrationPoint(**p) for p in json.loads(meta.get("calibration", "[]"))]
            head = cls(
                layer=int(meta["layer"]), hidden_size=int(meta["hidden_size"]), rank=int(t["adapter.down"].shape[1]),
                vocab_ids=t["vocab.ids"], vocab_weight=t["vocab.weight"].float(), norm_weight=t["norm.weight"],
                eps=float(meta["eps"]), model=meta.get("model", ""), calibration=calibration,
                threshold=float(meta["threshold"]) if meta.get("threshold") else None,
            )
            with torch.no_grad():
                head.down.copy_(t["adapter.down"])
                head.up.copy_(t["adapter.up"])
        except ModelError:
            raise
        except Exception as exc:  # safetensors raises its own error types for a corrupt file
            raise ModelError(f"could not read the exit head {path}: {exc}") from exc
        return head.eval()


def _point_dict(p: CalibrationPoint) -> dict[str, float]:
    return {"threshold": p.threshold, "exit_rate": p.exit_rate, "exit_agreement": p.exit_agreement,
            "accuracy": p.accuracy}


# -- data -----------------------------------------------------------------------------------


@dataclass(slots=True)
class ExitData:
    """Training positions: layer-k hidden states and the full model's top-K at the same positions.

    Attributes:
        hidden: [N, H] float16 (layer k outputs, uncompressed).
        top_ids: [N, K] int64, the full model's K most likely next tokens, descending.
        top_logprobs: [N, K] float32, their log-probabilities (temperature 1).
        sequence: [N] int64, which input sequence each position came from (for splits).
    """

    hidden: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor
    sequence: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    def select(self, mask: torch.Tensor) -> ExitData:
        return ExitData(self.hidden[mask], self.top_ids[mask], self.top_logprobs[mask], self.sequence[mask],
                        dict(self.meta))

    def save(self, path: str | os.PathLike[str]) -> None:
        from safetensors.torch import save_file

        save_file({"hidden": self.hidden, "top_ids": self.top_ids, "top_logprobs": self.top_logprobs,
                   "sequence": self.sequence}, str(path), metadata={"meta": json.dumps(self.meta)})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ExitData:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            return cls(f.get_tensor("hidden"), f.get_tensor("top_ids"), f.get_tensor("top_logprobs"),
                       f.get_tensor("sequence"), meta)

    @classmethod
    def concat(cls, parts: Sequence[ExitData]) -> ExitData:
        if not parts:
            raise ConfigurationError("no exit data to concatenate")
        return cls(torch.cat([p.hidden for p in parts]), torch.cat([p.top_ids for p in parts]),
                   torch.cat([p.top_logprobs for p in parts]), torch.cat([p.sequence for p in parts]),
                   dict(parts[0].meta))


def collect_exit_data(
    runtime: LayerwiseLM, sequences: Iterable[Sequence[int]], *, layer: int, top_k: int = 32, chunk: int = 256,
    first_sequence: int = 0,
) -> ExitData:
    """Teacher-force token sequences through the full model, keeping layer-k states and the top-K.

    Args:
        runtime: the full model (all layers).
        sequences: token id sequences (each run in chunks of `chunk` positions).
        layer: the split layer k (1 <= k < num_layers).
        top_k: how many of the full model's most likely tokens to keep per position.
        first_sequence: the index given to the first sequence (for resumable collection).
    """
    return collect_exit_datasets(runtime, sequences, layers=(layer,), top_k=top_k, chunk=chunk,
                                 first_sequence=first_sequence)[layer]


@torch.inference_mode()
def collect_exit_datasets(
    runtime: LayerwiseLM, sequences: Iterable[Sequence[int]], *, layers: Sequence[int], top_k: int = 32,
    chunk: int = 256, first_sequence: int = 0,
) -> dict[int, ExitData]:
    """`collect_exit_data` for several split layers in one pass of the full model per chunk."""
    num_layers = runtime.info.num_layers
    cuts = sorted({int(k) for k in layers})
    if not cuts or not all(0 < k < num_layers for k in cuts):
        raise ConfigurationError(f"split layers must be in [1, {num_layers - 1}], got {list(layers)}")
    parts: dict[int, list[ExitData]] = {k: [] for k in cuts}
    for index, ids in enumerate(sequences, start=first_sequence):
        state = runtime.new_state()
        try:
            for start in range(0, len(ids), chunk):
                part = list(ids[start:start + chunk])
                hidden, done, rows = runtime.embed(part), 0, {}
                for k in cuts:
                    hidden = runtime.run_layers(state, hidden, done, k)  # [n, H] after layer k
                    rows[k], done = hidden, k
                out = runtime.run_layers(state, hidden, done, num_layers)
                logprobs = torch.log_softmax(runtime.head(out), dim=-1)  # [n, V]
                values, top = torch.topk(logprobs, top_k, dim=-1)
                seq = torch.full((len(part),), index, dtype=torch.long)
                for k in cuts:
                    parts[k].append(ExitData(rows[k].half().cpu(), top.cpu(), values.cpu(), seq))
        finally:
            runtime.release(state)
    result = {}
    for k in cuts:
        data = ExitData.concat(parts[k])
        data.meta = {"layer": k, "model": runtime.info.name, "top_k": top_k}
        result[k] = data
    return result


# -- training ---------------------------------------------------------------------------------


def _shortlist(data: ExitData, size: int, vocab_size: int) -> torch.Tensor:
    """The `size` tokens with the most teacher probability mass over the data (top-1 counts first)."""
    mass = torch.zeros(vocab_size, dtype=torch.float64)
    mass.index_add_(0, data.top_ids.reshape(-1), data.top_logprobs.double().exp().reshape(-1))
    top1 = torch.bincount(data.top_ids[:, 0], minlength=vocab_size).double()
    score = top1 * 1e6 + mass  # every token that was ever top-1 ranks before any that was not
    size = min(size, vocab_size)
    return torch.sort(torch.topk(score, size).indices).values


def _targets(data: ExitData, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher top-K mapped into shortlist indices ([n, K], -1 outside) and their probabilities ([n, K])."""
    index = position[data.top_ids]  # [n, K]
    probs = data.top_logprobs.float().exp() * (index >= 0)
    return index, probs


def train_exit_head(
    data: ExitData, *, lm_head: torch.Tensor, norm_weight: torch.Tensor, eps: float, layer: int,
    shortlist: int = 8192, rank: int = 128, epochs: int = 4, batch_size: int = 256, lr: float = 2e-3,
    holdout: float = 0.1, target_agreement: float = 0.98, model: str = "", seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> ExitHead:
    """Distil the full model's next-token distribution at layer k into a small `ExitHead`.

    Args:
        data: positions from `collect_exit_data`.
        lm_head: the model's LM head weight, [V, H] (its rows for the shortlist are copied).
        norm_weight, eps: the model's final RMSNorm (the head's norm starts from it).
        layer: the split layer the data was collected at.
        shortlist: how many tokens the head scores (the most predicted in `data`).
        rank: the adapter's rank.
        epochs, batch_size, lr: AdamW training schedule (cosine decay).
        holdout: fraction of *sequences* kept out of training to calibrate thresholds.
        target_agreement: the agreement the recommended threshold must reach.
        seed: shuffling and initialisation seed.
        progress: called with a line of text after each epoch.

    Returns:
        The trained head, in eval mode, with its calibration table and threshold.
    """
    if len(data) == 0:
        raise ConfigurationError("no training positions")
    gen = torch.Generator().manual_seed(seed)
    vocab_size, hidden_size = lm_head.shape
    sequences = torch.unique(data.sequence)
    order = sequences[torch.randperm(len(sequences), generator=gen)]
    n_hold = max(1, int(round(len(sequences) * holdout))) if len(sequences) > 1 else 0
    held = torch.isin(data.sequence, order[:n_hold])
    train, test = data.select(~held), data.select(held)
    if len(train) == 0:
        train = test
    ids = _shortlist(train, shortlist, vocab_size)
    position = torch.full((vocab_size,), -1, dtype=torch.long)
    position[ids] = torch.arange(len(ids))
    torch.manual_seed(seed)
    head = ExitHead(layer=layer, hidden_size=hidden_size, rank=rank, vocab_ids=ids,
                    vocab_weight=lm_head.detach()[ids].float(), norm_weight=norm_weight, eps=eps, model=model)
    params = [head.down, head.up, head.norm]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = max(1, epochs * math.ceil(len(train) / batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    target_index, target_probs = _targets(train, position)
    hidden = train.hidden.float()
    head.train()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(train), generator=gen)
        total = 0.0
        for start in range(0, len(train), batch_size):
            rows = perm[start:start + batch_size]
            logp = torch.log_softmax(head(hidden[rows]), dim=-1)  # [b, S]
            idx, p = target_index[rows], target_probs[rows]
            picked = torch.gather(logp, 1, idx.clamp(min=0)) * (idx >= 0)
            loss = -(p * picked).sum(-1).mean()  # cross-entropy against the teacher's kept mass
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(rows)
        if progress is not None:
            progress(f"epoch {epoch + 1}/{epochs}: loss {total / len(train):.4f} ({time.perf_counter() - t0:.1f}s)")
    head.eval()
    points = calibrate(head, test if len(test) else train)
    head.calibration = tuple(points)
    head.threshold = head.threshold_for(target_agreement)
    return head


@torch.inference_mode()
def calibrate(
    head: ExitHead, data: ExitData, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> list[CalibrationPoint]:
    """Exit rate and agreement with the full model's top-1 at each threshold, over `data`."""
    confidence_parts, token_parts = [], []
    for start in range(0, len(data), 1024):
        probs = torch.softmax(head(data.hidden[start:start + 1024].float()), dim=-1)
        conf, best = probs.max(dim=-1)
        confidence_parts.append(conf)
        token_parts.append(head.vocab_ids[best])
    confidence, token = torch.cat(confidence_parts), torch.cat(token_parts)
    agree = token == data.top_ids[:, 0]
    return exit_curve(confidence, agree, thresholds)


def exit_curve(confidence: torch.Tensor, agree: torch.Tensor, thresholds: Sequence[float]) -> list[CalibrationPoint]:
    """Calibration points from per-position exit confidence and whether its token agrees."""
    n = max(1, int(confidence.numel()))
    points = []
    for t in thresholds:
        exits = confidence >= t
        k = int(exits.sum())
        wrong = int((exits & ~agree).sum())
        points.append(CalibrationPoint(
            threshold=float(t), exit_rate=k / n, exit_agreement=(k - wrong) / k if k else 1.0,
            accuracy=1.0 - wrong / n,
        ))
    return points


def load_exit(spec: EarlyExit | str | os.PathLike[str] | None, runtime: LayerwiseLM) -> EarlyExit:
    """The exit to use: a given one, an `ExitHead` file, or (None) the model's own head."""
    if spec is None:
        return ModelHeadExit(runtime)
    if isinstance(spec, (str, os.PathLike)):
        return ExitHead.load(spec)
    return spec
