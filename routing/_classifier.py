"""The small binary classifier behind every learned router: logistic regression or a 1-hidden-layer MLP.

What belongs here: fitting (torch, full-batch, class-balanced, L2) and predicting (numpy,
so scoring needs no autograd), with the standardisation statistics kept as parameters.
What does not: which features go in (the routers build them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]

MODELS = ("logistic", "mlp")


@dataclass(frozen=True, slots=True, kw_only=True)
class FitOptions:
    """How a classifier is trained.

    Attributes:
        model: ``"logistic"`` or ``"mlp"`` (one hidden layer, GELU).
        hidden: MLP width.
        epochs: full-batch Adam steps.
        lr: Adam learning rate.
        weight_decay: L2 penalty (decoupled, AdamW).
        balance: weight the classes inversely to their frequency.
        seed: initialisation seed.
    """

    model: str = "logistic"
    hidden: int = 64
    epochs: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-2
    balance: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.hidden < 1 or self.epochs < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("hidden and epochs must be >= 1, lr > 0, weight_decay >= 0")


class Classifier:
    """p(label = 1 | x) from standardised features; parameters are plain float32 arrays."""

    def __init__(self, params: Mapping[str, npt.NDArray[Any]]) -> None:
        self.params = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
        for need in ("mean", "std", "w1", "b1"):
            if need not in self.params:
                raise ValueError(f"classifier parameters lack {need!r}")

    @property
    def n_features(self) -> int:
        return int(self.params["mean"].shape[0])

    @property
    def model(self) -> str:
        return "mlp" if "w2" in self.params else "logistic"

    def logit(self, x: npt.ArrayLike) -> FloatArray:
        """[n, d] -> [n] logits of label 1."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float32))
        if x.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features, got {x.shape[1]}")
        p = self.params
        z = (x - p["mean"]) / p["std"]
        h = z @ p["w1"] + p["b1"]
        if "w2" in p:
            h = 0.5 * h * (1.0 + np.tanh(0.7978845608 * (h + 0.044715 * h**3)))  # GELU (tanh form)
            h = h @ p["w2"] + p["b2"]
        out: FloatArray = h[:, 0].astype(np.float32)
        return out

    def predict_proba(self, x: npt.ArrayLike) -> FloatArray:
        """[n, d] -> [n] probabilities of label 1."""
        out: FloatArray = (1.0 / (1.0 + np.exp(-self.logit(x)))).astype(np.float32)
        return out

    @classmethod
    def fit(cls, x: npt.ArrayLike, y: npt.ArrayLike, options: FitOptions = FitOptions()) -> Classifier:
        """Train on features `x` [n, d] and binary labels `y` [n].

        Raises:
            ValueError: shapes disagree, or `y` holds a single class.
        """
        import torch

        xa = np.asarray(x, dtype=np.float32)
        ya = np.asarray(y, dtype=np.float32).reshape(-1)
        if xa.ndim != 2 or xa.shape[0] != ya.shape[0] or xa.shape[0] == 0:
            raise ValueError(f"need x [n, d] and y [n], got {xa.shape} and {ya.shape}")
        pos = float(ya.mean())
        if pos in (0.0, 1.0):
            raise ValueError("labels hold one class only; a classifier needs both")
        mean = xa.mean(0)
        std = xa.std(0) + 1e-6
        z = torch.from_numpy((xa - mean) / std)
        t = torch.from_numpy(ya)
        w = torch.where(t > 0.5, 0.5 / pos, 0.5 / (1.0 - pos)) if options.balance else torch.ones_like(t)
        gen = torch.Generator().manual_seed(options.seed)
        d = xa.shape[1]
        if options.model == "logistic":
            net: torch.nn.Module = torch.nn.Linear(d, 1)
        else:
            net = torch.nn.Sequential(torch.nn.Linear(d, options.hidden), torch.nn.GELU(approximate="tanh"),
                                      torch.nn.Linear(options.hidden, 1))
        with torch.no_grad():
            for prm in net.parameters():
                prm.copy_(torch.randn(prm.shape, generator=gen) * (1.0 / max(1, prm.shape[-1])) ** 0.5)
        opt = torch.optim.AdamW(net.parameters(), lr=options.lr, weight_decay=options.weight_decay)
        loss_fn = torch.nn.BCEWithLogitsLoss(weight=w)
        for _ in range(options.epochs):
            opt.zero_grad()
            loss = loss_fn(net(z)[:, 0], t)
            loss.backward()
            opt.step()
        layers = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
        params = {"mean": mean, "std": std,
                  "w1": layers[0].weight.detach().numpy().T.copy(), "b1": layers[0].bias.detach().numpy().copy()}
        if len(layers) == 2:
            params["w2"] = layers[1].weight.detach().numpy().T.copy()
            params["b2"] = layers[1].bias.detach().numpy().copy()
        return cls(params)
