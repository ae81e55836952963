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
        name_or_path: a registry name (``"qwen2.5-coder-0.5b"``; its converted HF
            directory is prepared once by `tether.models.ensure_hf_dir`) or the path of
            a Hugging Face model directory.
        backend: ``"torch"`` (`TorchCausalLM`, fp32) or ``"onnx-fp32"`` /
            ``"onnx-int8"`` / ``"onnx-int4"`` (`OnnxCausalLM`; the ONNX graph is built
            once and cached under ``cache_dir()/onnx``).
        intra_op_num_threads: onnxruntime threads (ONNX backends only); default all CPUs.
        progress: show progress bars while preparing weights or building ONNX.

    Returns:
        ``(model, tokenizer)``; the tokenizer is the HF tokenizer of the model directory.

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

    if backend == "torch":
        from tether.runtime._torch import TorchCausalLM

        if is_dir:
            from transformers import AutoModelForCausalLM

            hf_model = AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
            return TorchCausalLM(hf_model, name=path.name), _tokenizer(path)
        from tether.models import load_hf

        hf_model, tokenizer = load_hf(str(name_or_path))
        return TorchCausalLM(hf_model, name=str(name_or_path)), tokenizer

    from tether.runtime._onnx import OnnxCausalLM

    precision = backend.removeprefix("onnx-")
    if is_dir:
        hf_dir, name = path, path.name
    else:
        from tether.models import ensure_hf_dir

        hf_dir, name = Path(ensure_hf_dir(str(name_or_path))), str(name_or_path)
    model = OnnxCausalLM.from_hf_dir(
        hf_dir, precision, progress=progress, name=f"{name}@{backend}",
        intra_op_num_threads=intra_op_num_threads,
    )
    return model, _tokenizer(hf_dir)


def _tokenizer(hf_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)
