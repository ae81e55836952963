"""One-time conversion of a GGUF file into a Hugging Face model directory (and tokenizer).

What belongs here: the transformers calls that dequantize a GGUF file and save the result,
written atomically. What does not: finding or assembling the GGUF (see `_model_assembly`).

transformers dequantizes a GGUF file on every `from_pretrained(..., gguf_file=...)` (about
26 s for the 0.5B and 56 s for the 1.5B on 2 cores); saving the result once as safetensors
turns later loads into a plain `from_pretrained(directory)`. The conversion itself uses
transformers' GGUF reader directly (see `_dequantize`), so it needs neither `accelerate`
nor a GGUF matmul kernel.

Dtype: weights are saved in float32. Dequantized Q4/Q5/Q6/Q8 blocks are exact in float32
but not in bfloat16, and both the torch runtime and the ONNX builder start from float32.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tether.errors import ModelError

SOURCE_FILE = "tether_source.json"
"""Written last into each converted directory: what it was converted from, and how."""

SAVED_DTYPE = "float32"


@contextlib.contextmanager
def _isolated_gguf(gguf_path: Path) -> Iterator[tuple[str, str]]:
    """A temporary directory holding only a link to the GGUF file.

    transformers also reads `config.json` / `tokenizer_config.json` from the directory it is
    given; isolating the file keeps stray files beside a user's GGUF from being mixed in.
    """
    with tempfile.TemporaryDirectory(prefix="tether-gguf-") as tmp:
        link = Path(tmp) / "model.gguf"
        link.symlink_to(gguf_path.resolve())
        yield tmp, link.name


@contextlib.contextmanager
def _step(message: str, *, enabled: bool) -> Iterator[None]:
    """Print a step with a spinner on stderr, then how long it took."""
    if not enabled:
        yield
        return
    from rich.console import Console

    console = Console(stderr=True)
    start = time.perf_counter()
    with console.status(message):
        yield
    console.print(f"[green]✓[/green] {message} ({time.perf_counter() - start:.1f} s)")


@contextlib.contextmanager
def write_dir_atomically(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; rename it onto `final` if the block succeeds.

    On any exception the temporary directory is removed and `final` is left untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():  # a stale or partial entry (an atomic writer never leaves one)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_tokenizer_from_gguf(gguf_path: Path) -> Any:
    from transformers import AutoTokenizer

    with _isolated_gguf(gguf_path) as (directory, filename):
        return AutoTokenizer.from_pretrained(directory, gguf_file=filename)


def _source_record(*, name: str, sha256: str, gguf_path: Path, what: str) -> dict[str, Any]:
    import transformers

    return {
        "name": name,
        "gguf_sha256": sha256,
        "gguf_path": str(gguf_path),
        "contents": what,
        "dtype": SAVED_DTYPE,
        "transformers_version": transformers.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def convert_tokenizer(gguf_path: Path, out_dir: Path, *, name: str, sha256: str, progress: bool = True) -> Path:
    """Convert only the tokenizer of a GGUF file into `out_dir` (atomically).

    Raises:
        ModelError: transformers could not read the tokenizer from the file.
    """
    with write_dir_atomically(out_dir) as tmp:
        with _step(f"converting the tokenizer of {name}", enabled=progress):
            try:
                tokenizer = _load_tokenizer_from_gguf(gguf_path)
            except Exception as exc:  # transformers raises bare ValueError/KeyError/...
                raise ModelError(f"model {name!r}: could not read a tokenizer from {gguf_path}: {exc}") from exc
            tokenizer.save_pretrained(tmp)
        record = _source_record(name=name, sha256=sha256, gguf_path=gguf_path, what="tokenizer")
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=1))
    return out_dir


def _fix_generation_config(config: Any, generation: Any, tokenizer: Any) -> None:
    """Stop generation at the chat end token as well as at the model's own eos; set pad and bos."""
    eos: list[int] = []
    for candidate in (tokenizer.eos_token_id, config.eos_token_id, generation.eos_token_id):
        values = candidate if isinstance(candidate, (list, tuple)) else [candidate]
        eos.extend(int(v) for v in values if v is not None and int(v) not in eos)
    if tokenizer.pad_token_id is not None and int(tokenizer.pad_token_id) not in eos:
        # Qwen's <|endoftext|> is pad and bos; the instruct models also end documents with it.
        eos.append(int(tokenizer.pad_token_id))
    if eos:
        generation.eos_token_id = eos if len(eos) > 1 else eos[0]
    if tokenizer.pad_token_id is not None:
        generation.pad_token_id = int(tokenizer.pad_token_id)
        config.pad_token_id = int(tokenizer.pad_token_id)
    if tokenizer.bos_token_id is not None:
        generation.bos_token_id = int(tokenizer.bos_token_id)


def _dequantize(gguf_path: Path, *, name: str) -> tuple[Any, dict[str, Any], str]:
    """Read a GGUF file's config and dequantize its tensors to float32 HF-named tensors.

    This calls transformers' GGUF reader (name mapping, per-architecture fix-ups such as
    llama's q/k permutation) directly instead of `from_pretrained(gguf_file=...)`, which in
    transformers 5 requires `accelerate` and may keep the weights packed. The model is built
    on the meta device only to learn parameter names and shapes, so no memory is spent on
    a random initialisation.

    Returns:
        ``(config, tensors, model_class_name)``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with _isolated_gguf(gguf_path) as (directory, filename):
        config = AutoConfig.from_pretrained(directory, gguf_file=filename)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    parsed = load_gguf_checkpoint(
        str(gguf_path), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.float32
    )
    tensors: dict[str, Any] = parsed["tensors"]
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(expected) - set(tensors) - tied)
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(tensors) & set(expected) if tuple(tensors[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise ModelError(
            f"model {name!r}: {gguf_path} does not map onto {type(skeleton).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
        )
    for key in tied & set(tensors):  # a tied head is saved once, as the embedding
        del tensors[key]
    return config, tensors, type(skeleton).__name__


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    *,
    name: str,
    sha256: str,
    tokenizer_dir: Path | None = None,
    progress: bool = True,
) -> Path:
    """Dequantize a GGUF file and save it as a Hugging Face model directory, atomically.

    The directory holds `config.json`, `generation_config.json`, `model.safetensors`
    (float32), the tokenizer files and `tether_source.json` (written last).

    Args:
        gguf_path: The GGUF file (already checked against its sha256 by the caller).
        out_dir: The final directory; it appears only once complete.
        name: The model's name, for messages.
        sha256: The GGUF file's sha256, recorded in `tether_source.json`.
        tokenizer_dir: A complete tokenizer-only conversion of the same file to reuse, if any.
        progress: Show steps on stderr (transformers adds its own dequantization bar).

    Returns:
        `out_dir`.

    Raises:
        ModelError: the file could not be read, mapped or saved; nothing is left behind.
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    with write_dir_atomically(out_dir) as tmp:
        try:
            with _step(f"reading the tokenizer of {name}", enabled=progress):
                if tokenizer_dir is not None and is_complete(tokenizer_dir):
                    from transformers import AutoTokenizer

                    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
                else:
                    tokenizer = _load_tokenizer_from_gguf(gguf_path)
            with _step(f"dequantizing {name} to {SAVED_DTYPE} (once; later loads use the cache)", enabled=progress):
                config, tensors, class_name = _dequantize(gguf_path, name=name)
            config.architectures = [class_name]
            config.dtype = SAVED_DTYPE
            generation = GenerationConfig.from_model_config(config)
            _fix_generation_config(config, generation, tokenizer)
            with _step(f"saving {name} as safetensors", enabled=progress):
                save_file(
                    {k: v.contiguous() for k, v in tensors.items()},
                    str(tmp / "model.safetensors"),
                    metadata={"format": "pt"},
                )
                del tensors
                config.save_pretrained(tmp)
                generation.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"model {name!r}: converting {gguf_path} failed: {exc}") from exc
        record = _source_record(name=name, sha256=sha256, gguf_path=gguf_path, what="model+tokenizer")
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=1))
        for file in tmp.iterdir():  # safetensors writes 0600; the cache is shared like any other
            file.chmod(0o644)
    return out_dir


def is_complete(directory: Path) -> bool:
    """Whether a cache directory was fully written (its source record is the last file)."""
    return (directory / SOURCE_FILE).is_file()
