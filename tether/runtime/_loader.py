"""Pick a runtime backend by name: `load_runtime("qwen2.5-coder-0.5b", backend="onnx-int4")`.

What belongs here: mapping a model name (or an HF directory) and a backend name to a
loaded `CausalLM` and its tokenizer. What does not: building or running either backend.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

from tether.errors import ConfigurationError
from tether.runtime._base import CausalLM

#: Backend names `load_runtime` accepts.
RUNTIME_BACKENDS: Final[tuple[str, ...]] = ("torch", "onnx-fp32", "onnx-int8", "onnx-int4")


def load_runtime(
    name_or_path: str | os.PathLike[str],
    backend: str = "torch",
    *,
    intra_op_num_threads: int | None = None,
    progress: bool = True,
) -> tuple[CausalLM, Any]:
    """Load a model for one runtime backend.

    Args:
        name_or_path: a registry name (``"qwen2.5-coder-0.5b"``), a ``.gguf`` path or
            a Hugging Face model directory; the converted HF directory is prepared once
            by `tether.models.ensure_hf_dir`.
        backend: ``"torch"`` (`TorchCausalLM`, fp32) or ``"onnx-fp32"`` /
            ``"onnx-int8"`` / ``"onnx-int4"`` (`OnnxCausalLM`; the ONNX graph is built
            once and cached under ``cache_dir()/onnx``).
        intra_op_num_threads: onnxruntime threads (ONNX backends only); default all CPUs.
        progress: show progress bars while preparing weights or building ONNX.

    Returns:
        ``(model, tokenizer)``; the tokenizer comes from `tether.models.load_tokenizer`.

    Raises:
        ConfigurationError: unknown backend (the message lists the valid ones) or a path
            that is not a model directory.
        ModelError: the weights are missing or could not be prepared or loaded.
    """
    if backend not in RUNTIME_BACKENDS:
        raise ConfigurationError(
            f"unknown runtime backend {backend!r}; valid backends: {', '.join(RUNTIME_BACKENDS)}"
        )
    path = Path(name_or_path)
    is_dir = path.is_dir()
    if is_dir and not (path / "config.json").is_file():
        raise ConfigurationError(f"{path} is not a Hugging Face model directory (no config.json)")

    from tether.models import ensure_hf_dir, load_hf, load_tokenizer

    source: str | Path = path if is_dir else str(name_or_path)
    name = path.name if is_dir else str(name_or_path)
    if backend == "torch":
        from tether.runtime._torch import TorchCausalLM

        hf_model, tokenizer = load_hf(source, progress=progress)
        return TorchCausalLM(hf_model, name=name), tokenizer

    from tether.runtime._onnx import OnnxCausalLM

    hf_dir = ensure_hf_dir(source, progress=progress)
    model = OnnxCausalLM.from_hf_dir(
        hf_dir, backend.removeprefix("onnx-"), progress=progress, name=f"{name}@{backend}",
        intra_op_num_threads=intra_op_num_threads,
    )
    return model, load_tokenizer(hf_dir, progress=progress)
