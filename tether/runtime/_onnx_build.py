"""Builds ONNX decoders with KV-cache inputs/outputs from a Hugging Face model directory.

What belongs here: running onnxruntime-genai's model builder (as a subprocess), caching
its output per source directory and precision, and describing a finished build.
What does not: running the model — that is `tether.runtime._onnx.OnnxCausalLM`.

A build lives in ``cache_dir()/onnx/<hf-dir-name>-<precision>/`` and holds the builder's
``model.onnx`` (+ ``model.onnx.data``), the source ``config.json`` copied as
``hf_config.json`` (and ``hf_generation_config.json`` when present), and ``build.json``
(precision, source fingerprint, builder version, build time). It is written into a
temporary sibling folder and renamed into place, so a crash never leaves a half build
behind; an advisory file lock keeps two processes from building the same thing at once.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final, Literal

from tether.errors import ConfigurationError, ModelError
from tether.paths import cache_dir

Precision = Literal["fp32", "int8", "int4"]

#: Precisions the CPU build supports: fp32 weights, or weight-only MatMulNBits 8/4-bit.
ONNX_PRECISIONS: Final[tuple[str, ...]] = ("fp32", "int8", "int4")

BUILD_INFO: Final = "build.json"
HF_CONFIG: Final = "hf_config.json"
HF_GENERATION_CONFIG: Final = "hf_generation_config.json"
_BUILD_FORMAT: Final = 1


def onnx_build_dir(hf_dir: Path, precision: str) -> Path:
    """Where the build of `hf_dir` at `precision` is cached (it may not exist yet)."""
    _check_precision(precision)
    return cache_dir() / "onnx" / f"{Path(hf_dir).resolve().name}-{precision}"


def source_fingerprint(hf_dir: Path) -> str:
    """A cheap identity of an HF model directory: config bytes plus weight file names and sizes.

    Weights are identified by name, size and modification time rather than hashed, so a
    multi-GB model is fingerprinted in microseconds; a rebuilt source directory gets a
    fresh modification time and therefore a fresh build.
    """
    hf_dir = Path(hf_dir)
    digest = hashlib.sha256()
    digest.update((hf_dir / "config.json").read_bytes())
    for path in sorted(hf_dir.glob("*.safetensors")) + sorted(hf_dir.glob("*.bin")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def is_built(hf_dir: Path, precision: str) -> bool:
    """True when a finished, current build of `hf_dir` at `precision` is in the cache."""
    return _current_build(onnx_build_dir(hf_dir, precision), Path(hf_dir)) is not None


def build_onnx(
    hf_dir: str | os.PathLike[str],
    precision: str = "int4",
    *,
    force: bool = False,
    progress: bool = True,
    accuracy_level: int | None = None,
    block_size: int | None = None,
) -> Path:
    """Build (or find in the cache) the ONNX decoder of an HF model directory.

    Args:
        hf_dir: a Hugging Face model directory (``config.json`` + safetensors weights;
            tokenizer files are optional).
        precision: ``"fp32"``, ``"int8"`` or ``"int4"`` (weight-only, block-wise
            MatMulNBits for the two integer ones).
        force: rebuild even if a current build is cached.
        progress: show a progress bar on stderr while building.
        accuracy_level: MatMulNBits compute precision for int8/int4 (1 fp32 … 4 int8
            activations); the builder's default for CPU is 4, the fastest.
        block_size: quantization block size for int8/int4 (builder default 32).

    Returns:
        The build directory, holding ``model.onnx``.

    Raises:
        ConfigurationError: unknown precision, or `hf_dir` is not a model directory.
        ModelError: the builder failed (its last output lines are in the message) or is
            not installed. The cache is left without a (partial) build.
    """
    _check_precision(precision)
    source = Path(hf_dir).resolve()
    if not (source / "config.json").is_file():
        raise ConfigurationError(f"{source} is not a Hugging Face model directory (no config.json)")
    target = onnx_build_dir(source, precision)
    target.parent.mkdir(parents=True, exist_ok=True)

    with _file_lock(target.parent / f".{target.name}.lock"):
        if not force and _current_build(target, source) is not None:
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; the finished build is an ordinary folder
        try:
            started = time.monotonic()
            _run_builder(source, staging, precision, progress=progress,
                         accuracy_level=accuracy_level, block_size=block_size)
            shutil.copyfile(source / "config.json", staging / HF_CONFIG)
            if (source / "generation_config.json").is_file():
                shutil.copyfile(source / "generation_config.json", staging / HF_GENERATION_CONFIG)
            info = {
                "format": _BUILD_FORMAT,
                "precision": precision,
                "source": str(source),
                "source_fingerprint": source_fingerprint(source),
                "builder": f"onnxruntime-genai {_genai_version()}",
                "accuracy_level": accuracy_level,
                "block_size": block_size,
                "build_seconds": round(time.monotonic() - started, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (staging / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
            # Swap in: an old build is moved aside first so the rename itself is atomic.
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def read_build_info(build_dir: Path) -> dict[str, object]:
    """The ``build.json`` of a finished build."""
    data: dict[str, object] = json.loads((Path(build_dir) / BUILD_INFO).read_text())
    return data


# ---------------------------------------------------------------------------- internals


def _check_precision(precision: str) -> None:
    if precision not in ONNX_PRECISIONS:
        raise ConfigurationError(
            f"unknown ONNX precision {precision!r}; valid precisions: {', '.join(ONNX_PRECISIONS)}"
        )


def _current_build(target: Path, source: Path) -> dict[str, object] | None:
    if not (target / "model.onnx").is_file() or not (target / BUILD_INFO).is_file():
        return None
    try:
        info = read_build_info(target)
    except (OSError, ValueError):
        return None
    if info.get("format") != _BUILD_FORMAT:
        return None
    if info.get("source_fingerprint") != source_fingerprint(source):
        return None
    return info


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _genai_version() -> str:
    try:
        import onnxruntime_genai  # type: ignore[import-untyped]

        return str(onnxruntime_genai.__version__)
    except ImportError as exc:
        raise ModelError(
            "building ONNX models needs onnxruntime-genai and onnx-ir: pip install 'onnxruntime-genai>=0.8' 'onnx-ir>=1.0'"
        ) from exc


def _builder_command(source: Path, output: Path, precision: str,
                     accuracy_level: int | None, block_size: int | None) -> list[str]:
    cmd = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(source), "-o", str(output), "-p", precision, "-e", "cpu",
        "-c", str(output / "_builder_cache"),
    ]
    extra = ["hf_token=false"]
    if accuracy_level is not None:
        extra.append(f"accuracy_level={int(accuracy_level)}")
    if block_size is not None:
        extra.append(f"block_size={int(block_size)}")
    return cmd + ["--extra_options", *extra]


def _run_builder(source: Path, output: Path, precision: str, *, progress: bool,
                 accuracy_level: int | None, block_size: int | None) -> None:
    _genai_version()
    config = json.loads((source / "config.json").read_text())
    num_layers = int(config.get("num_hidden_layers", 0))
    cmd = _builder_command(source, output, precision, accuracy_level, block_size)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    tail: collections.deque[str] = collections.deque(maxlen=40)

    with _BuildProgress(f"{source.name} → ONNX {precision}", num_layers, enabled=progress) as bar:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            cwd=output,
        )
        assert proc.stdout is not None
        for line in proc.stdout:  # universal newlines: tqdm's \r updates arrive as lines too
            line = line.rstrip()
            if line:
                tail.append(line)
                bar.feed(line)
        code = proc.wait()
    shutil.rmtree(output / "_builder_cache", ignore_errors=True)
    if code != 0 or not (output / "model.onnx").is_file():
        joined = "\n".join(tail)
        hint = ""
        if "No module named 'onnx_ir'" in joined:
            hint = "\nThe builder needs onnx-ir: pip install 'onnx-ir>=1.0'."
        raise ModelError(
            f"onnxruntime-genai builder failed for {source} at {precision} (exit {code}); "
            f"last output:\n{joined}{hint}"
        )


class _BuildProgress:
    """A rich progress bar driven by the builder's own log lines (layers read, then saving)."""

    def __init__(self, title: str, num_layers: int, *, enabled: bool) -> None:
        self._enabled = enabled
        self._title = title
        # Steps: embeddings, each layer, final norm, LM head, quantize/save, write config.
        self._total = num_layers + 5
        self._progress: object | None = None
        self._task: object | None = None

    def __enter__(self) -> _BuildProgress:
        if self._enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[phase]}"),
                TimeElapsedColumn(), console=Console(stderr=True), transient=False,
            )
            progress.start()
            self._task = progress.add_task(self._title, total=self._total, phase="starting")
            self._progress = progress
        return self

    def feed(self, line: str) -> None:
        if self._progress is None:
            return
        from rich.progress import Progress

        progress = self._progress
        assert isinstance(progress, Progress)
        phase: str | None = None
        if line.startswith("Reading "):
            phase = line.removeprefix("Reading ").strip()
        elif line.startswith("Saving ONNX model"):
            phase = "quantizing and saving"
        elif line.startswith("Saving GenAI config"):
            phase = "writing config"
        elif "complete quantization of" in line:
            node = line.split("complete quantization of", 1)[1].split(" with")[0].strip()
            progress.update(self._task, phase=f"quantized {node}")  # type: ignore[arg-type]
            return
        if phase is not None:
            progress.update(self._task, advance=1, phase=phase)  # type: ignore[arg-type]

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            from rich.progress import Progress

            progress = self._progress
            assert isinstance(progress, Progress)
            if exc[0] is None:
                progress.update(self._task, completed=self._total, phase="done")  # type: ignore[arg-type]
            progress.stop()
