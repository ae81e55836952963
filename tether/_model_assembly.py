"""Offline assembly of GGUF files from their parts, hashing, and the on-disk cache layout.

What belongs here: byte-level work on files (concatenate, hash, stamp, lock, atomic rename)
and where each cache entry lives. What does not: anything that imports torch or transformers.

Cache layout under `tether.paths.cache_dir()`::

    gguf/<name>.gguf              a registry model's assembled GGUF file
    gguf/<name>.gguf.json         its stamp: sha256, size, mtime_ns (skips re-hashing on reuse)
    gguf/local-index.json         sha256 of local .gguf files, keyed by path, size and mtime
    hf/<name>-<sha256[:12]>/      the converted Hugging Face model directory (safetensors)
    tokenizers/<name>-<sha256[:12]>/  a tokenizer converted alone, before the weights were
    locks/                        lock files that keep two processes from doing the same work
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from tether.errors import ChecksumMismatchError, ModelError
from tether.paths import cache_dir

_CHUNK = 8 * 1024 * 1024
_STAMP_SUFFIX = ".json"


# -- layout -------------------------------------------------------------------------------


def gguf_dir() -> Path:
    """Directory of assembled GGUF files."""
    return cache_dir() / "gguf"


def hf_root() -> Path:
    """Directory of converted Hugging Face model directories."""
    return cache_dir() / "hf"


def tokenizers_root() -> Path:
    """Directory of tokenizers converted without the weights."""
    return cache_dir() / "tokenizers"


def assembled_path(name: str) -> Path:
    """Where registry model `name`'s GGUF file is assembled."""
    return gguf_dir() / f"{name}.gguf"


def safe_name(name: str) -> str:
    """`name` reduced to characters safe in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def cache_key(name: str, sha256: str) -> str:
    """The directory name of a conversion: the model name and the GGUF's sha256 prefix."""
    return f"{safe_name(name)}-{sha256[:12]}"


def hf_dir_for(name: str, sha256: str) -> Path:
    """The converted HF directory for a GGUF file with this name and sha256."""
    return hf_root() / cache_key(name, sha256)


def tokenizer_dir_for(name: str, sha256: str) -> Path:
    """The tokenizer-only directory for a GGUF file with this name and sha256."""
    return tokenizers_root() / cache_key(name, sha256)


@contextlib.contextmanager
def file_lock(key: str) -> Iterator[None]:
    """Hold an exclusive inter-process lock named `key` (blocks until it is free)."""
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{key}.lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# -- progress -----------------------------------------------------------------------------


@contextlib.contextmanager
def byte_progress(description: str, total: int | None, *, enabled: bool) -> Iterator[Any]:
    """A rich progress bar on stderr counting bytes; yields ``advance(n)``, a no-op if disabled."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


# -- hashing ------------------------------------------------------------------------------


def sha256_file(path: Path, *, progress: bool = False, description: str | None = None) -> str:
    """Return the hex SHA-256 of a file, streaming it in 8 MiB blocks."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with byte_progress(description or f"hashing {path.name}", size, enabled=progress) as advance:
        with open(path, "rb") as handle:
            while block := handle.read(_CHUNK):
                digest.update(block)
                advance(len(block))
    return digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + _STAMP_SUFFIX)


def write_stamp(path: Path, sha256: str) -> None:
    """Record that `path`, as it is now (size, mtime), has this sha256."""
    st = path.stat()
    record = {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    _write_json_atomic(_stamp_path(path), record)


def read_stamp(path: Path) -> str | None:
    """The sha256 recorded for `path`, if the file is unchanged since it was recorded."""
    try:
        st = path.stat()
    except OSError:
        return None
    return _stamped_sha(_read_json_object(_stamp_path(path)), st)


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object stored at `path`; empty when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _stamped_sha(record: Any, st: os.stat_result) -> str | None:
    """The sha256 in `record` (``{"sha256", "size", "mtime_ns"}``) if it was taken of a file
    with `st`'s size and modification time, else None (the file changed or was never hashed)."""
    if not isinstance(record, dict) or record.get("size") != st.st_size or record.get("mtime_ns") != st.st_mtime_ns:
        return None
    sha = record.get("sha256")
    return sha if isinstance(sha, str) else None


def _write_json_atomic(path: Path, record: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, path)


def local_gguf_sha256(path: Path, *, progress: bool = False) -> str:
    """The sha256 of a user's local GGUF file, re-hashed only when its size or mtime changed."""
    path = path.resolve()
    index_path = gguf_dir() / "local-index.json"
    st = path.stat()
    known = _stamped_sha(_read_json_object(index_path).get(str(path)), st)
    if known is not None:
        return known
    sha = sha256_file(path, progress=progress)
    with file_lock("local-index"):
        index = _read_json_object(index_path)  # re-read under the lock: another process may have added to it
        index[str(path)] = {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        _write_json_atomic(index_path, index)
    return sha


# -- assembly -----------------------------------------------------------------------------


def _copy_into(src: Path, out: IO[bytes], digest: Any, advance: Any) -> int:
    written = 0
    with open(src, "rb") as handle:
        while block := handle.read(_CHUNK):
            out.write(block)
            digest.update(block)
            advance(len(block))
            written += len(block)
    return written


def assemble_parts(
    name: str,
    parts: Sequence[Path],
    dest: Path,
    *,
    sha256: str,
    size: int | None = None,
    progress: bool = True,
) -> Path:
    """Concatenate `parts` into `dest`, hashing while writing, and keep it only if it matches.

    The bytes go to a temporary file beside `dest`, which is renamed onto `dest` only once
    its sha256 matches; `dest` therefore either does not exist or is complete and correct.

    Args:
        name: The model's name, for messages.
        parts: Part files in concatenation order.
        dest: The assembled file's final path.
        sha256: The pinned hex SHA-256 the result must have.
        size: The expected total size in bytes, if known (checked before renaming).
        progress: Show a progress bar on stderr.

    Returns:
        `dest`.

    Raises:
        ChecksumMismatchError: the concatenation does not have the pinned sha256; nothing is
            left on disk (the temporary file is removed, an older `dest` is left as it was).
        ModelError: the total size is wrong, or the file could not be written.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    total = sum(p.stat().st_size for p in parts)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with byte_progress(f"assembling {name}", total, enabled=progress) as advance:
            with open(tmp, "wb") as out:
                for part in parts:
                    _copy_into(part, out, digest, advance)
                out.flush()
                os.fsync(out.fileno())
        actual = digest.hexdigest()
        written = tmp.stat().st_size
        if actual != sha256:
            raise ChecksumMismatchError(name, sha256, actual)
        if size is not None and written != size:  # a sha match makes this unreachable in practice
            raise ModelError(f"model {name!r}: assembled {written} bytes, expected {size}")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    write_stamp(dest, sha256)
    return dest


def remove_path(path: Path) -> int:
    """Delete a file (with its stamp) or a directory tree; return the bytes freed."""
    freed = 0
    if path.is_dir() and not path.is_symlink():
        for sub in path.rglob("*"):
            if sub.is_file():
                freed += sub.stat().st_size
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        freed += path.stat().st_size if path.is_file() else 0
        path.unlink()
    stamp = _stamp_path(path)
    if stamp.is_file():
        freed += stamp.stat().st_size
        stamp.unlink()
    return freed


def dir_size(path: Path) -> int:
    """Total size in bytes of the files under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
