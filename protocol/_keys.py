"""Long-term X25519 identities: key pairs, key files, fingerprints and the client allowlist.

What belongs here: how static keys are made, written, read, shown and admitted. Files are
text: one base64 key per line (WireGuard's encoding), `#` starts a comment. Private key
files are created 0600 and refused when group or world can read them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import shlex
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from tether.errors import ConfigurationError

__all__ = [
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "Allowlist",
    "InsecureKeyFile",
    "KeyFileError",
    "KeyPair",
    "PublicKey",
    "load_public_key",
]

log = logging.getLogger("tether.protocol")

PRIVATE_KEY_FILE = "private.key"
PUBLIC_KEY_FILE = "public.key"
KEY_LEN = 32
_MAX_KEY_FILE_BYTES = 64 * 1024
_MAX_ALLOWLIST_BYTES = 16 * 1024 * 1024


class KeyFileError(ConfigurationError):
    """A key or allowlist file is missing or malformed; the message names the file and line."""


class InsecureKeyFile(KeyFileError):
    """A private key file can be read by group or others."""

    def __init__(self, path: Path, mode: int) -> None:
        super().__init__(
            f"private key file {path} is readable by group or others (mode {mode & 0o777:04o}); "
            f"run: chmod 600 {path}"
        )
        self.path = path
        self.mode = mode


def _decode_key(text: str, where: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFileError(f"{where}: not a base64 key") from exc
    if len(raw) != KEY_LEN:
        raise KeyFileError(f"{where}: a key is {KEY_LEN} bytes, this one decodes to {len(raw)}")
    return raw


@dataclass(frozen=True, slots=True)
class PublicKey:
    """An X25519 public key (32 raw bytes). `str()` gives base64, `fingerprint` a short id."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != KEY_LEN:
            raise ValueError(f"an X25519 public key is {KEY_LEN} bytes")

    @classmethod
    def from_text(cls, text: str) -> PublicKey:
        """Parse the base64 form (`tether keys show` prints it)."""
        return cls(_decode_key(text.strip(), "public key"))

    def to_text(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    @property
    def fingerprint(self) -> str:
        """'SHA256:' + unpadded base64 of SHA-256 of the raw key (OpenSSH's style)."""
        digest = hashlib.sha256(self.raw).digest()
        return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        return f"PublicKey({self.fingerprint})"


class KeyPair:
    """A static X25519 key pair. The private half never appears in repr, str or logs."""

    __slots__ = ("_private", "public")

    def __init__(self, private: X25519PrivateKey) -> None:
        self._private = private
        raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public = PublicKey(raw)

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        if len(raw) != KEY_LEN:
            raise ValueError(f"an X25519 private key is {KEY_LEN} bytes")
        return cls(X25519PrivateKey.from_private_bytes(raw))

    @property
    def private_key(self) -> X25519PrivateKey:
        return self._private

    def private_bytes(self) -> bytes:
        """The raw 32-byte private key. Handle with care: it is the identity."""
        return self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def __repr__(self) -> str:
        return f"KeyPair(public={self.public.fingerprint})"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyPair:
        """Read a private key file, or `private.key` inside a directory.

        Raises:
            KeyFileError: missing or malformed file.
            InsecureKeyFile: the file is readable by group or others.
        """
        file = Path(path)
        if file.is_dir():
            file = file / PRIVATE_KEY_FILE
        try:
            fd = os.open(file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError as exc:
            # A missing path is most often the key directory not created yet: suggest exactly that one.
            directory = file.parent if file.name == PRIVATE_KEY_FILE else file
            raise KeyFileError(
                f"no private key at {file} (create one: tether keys generate {shlex.quote(str(directory))})"
            ) from exc
        except OSError as exc:
            raise KeyFileError(f"cannot open private key {file}: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if os.name == "posix" and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise InsecureKeyFile(file, info.st_mode)
            data = handle.read(_MAX_KEY_FILE_BYTES + 1)
        lines = _key_lines(data, file)
        if len(lines) != 1:
            raise KeyFileError(f"{file}: expected exactly one key line, found {len(lines)}")
        lineno, text = lines[0]
        return cls.from_private_bytes(_decode_key(text.split()[0], f"{file}:{lineno}"))

    def save(self, directory: str | os.PathLike[str], *, overwrite: bool = False) -> tuple[Path, Path]:
        """Write `private.key` (mode 0600) and `public.key` into `directory` (created 0700).

        Returns:
            (private key path, public key path).

        Raises:
            KeyFileError: a key file already exists and `overwrite` is False.
        """
        root = Path(directory)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        private_path = root / PRIVATE_KEY_FILE
        public_path = root / PUBLIC_KEY_FILE
        if not overwrite:
            for existing in (private_path, public_path):
                if existing.exists():
                    raise KeyFileError(f"{existing} exists; pass --force to replace it")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
        if not overwrite:
            flags |= os.O_EXCL
        text = base64.b64encode(self.private_bytes()).decode("ascii")
        fd = os.open(private_path, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)  # an overwritten file keeps its old mode otherwise
            os.write(fd, f"# tether X25519 private key: keep secret\n{text}\n".encode("ascii"))
        finally:
            os.close(fd)
        public_path.write_text(f"{self.public.to_text()}\n", encoding="ascii")
        return private_path, public_path


def _key_lines(
    data: bytes, where: Path, *, limit: int = _MAX_KEY_FILE_BYTES, too_large: str = "file too large for a key file",
    encoding: str = "ascii",
) -> list[tuple[int, str]]:
    """The numbered non-empty lines of a key file (or, with its limit and encoding, an
    allowlist), `#` comments removed; the size is checked before decoding."""
    if len(data) > limit:
        raise KeyFileError(f"{where}: {too_large}")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise KeyFileError(f"{where}: not {encoding.upper()} text") from exc
    lines = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.split("#", 1)[0].strip()
        if stripped:
            lines.append((lineno, stripped))
    return lines


def load_public_key(source: str | os.PathLike[str] | PublicKey) -> PublicKey:
    """A public key from a PublicKey, a base64 string, a `public.key` file or a keys directory."""
    if isinstance(source, PublicKey):
        return source
    if isinstance(source, str) and len(source.strip()) == 44 and not os.path.exists(source):
        return PublicKey.from_text(source)
    path = Path(source)
    if path.is_dir():
        path = path / PUBLIC_KEY_FILE
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read public key {path}: {exc.strerror}") from exc
    lines = _key_lines(data, path)
    if len(lines) != 1:
        raise KeyFileError(f"{path}: expected exactly one key line, found {len(lines)}")
    lineno, text = lines[0]
    return PublicKey(_decode_key(text.split()[0], f"{path}:{lineno}"))


class Allowlist:
    """The client public keys a server admits.

    Built from keys (`Allowlist([key, ...])`) or from a file (`Allowlist.from_file(path)`):
    one base64 key per line, optionally followed by a comment; `#` lines are comments.
    A file-backed allowlist checks the file's mtime/size/inode on each lookup and reloads
    when it changed, so keys can be added or revoked without a restart. If a reload fails
    (file removed, malformed line) the allowlist fails closed: it admits nobody, logs the
    error, and recovers on the next successful reload.
    """

    def __init__(self, keys: Iterable[PublicKey] = (), *, path: str | os.PathLike[str] | None = None) -> None:
        self._keys: frozenset[bytes] = frozenset(k.raw for k in keys)
        self.path = Path(path) if path is not None else None
        self._stamp: tuple[int, int, int, int] | None = None
        self.reload_count = 0
        if self.path is not None:
            self._keys = self._read(self.path)
            self._stamp = self._stat(self.path)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Allowlist:
        """Load an allowlist file; raises KeyFileError at once when it is missing or malformed."""
        return cls(path=path)

    @staticmethod
    def _stat(path: Path) -> tuple[int, int, int, int]:
        info = path.stat()
        return (info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_ino)

    @staticmethod
    def _read(path: Path) -> frozenset[bytes]:
        try:
            with path.open("rb") as handle:
                data = handle.read(_MAX_ALLOWLIST_BYTES + 1)
        except OSError as exc:
            raise KeyFileError(f"cannot read allowlist {path}: {exc.strerror}") from exc
        lines = _key_lines(data, path, limit=_MAX_ALLOWLIST_BYTES,
                           too_large=f"allowlist larger than {_MAX_ALLOWLIST_BYTES} bytes", encoding="utf-8")
        return frozenset(_decode_key(content.split()[0], f"{path}:{lineno}") for lineno, content in lines)

    def refresh(self) -> None:
        """Reload the file if it changed since the last load (called by every lookup)."""
        if self.path is None:
            return
        try:
            stamp = self._stat(self.path)
        except OSError:
            stamp = None
        if stamp == self._stamp and stamp is not None:
            return
        self._stamp = stamp
        try:
            if stamp is None:
                raise KeyFileError(f"allowlist {self.path} is missing")
            self._keys = self._read(self.path)
            self.reload_count += 1
            log.info("allowlist %s reloaded: %d keys", self.path, len(self._keys))
        except KeyFileError as exc:
            self._keys = frozenset()
            log.error("allowlist reload failed, admitting no clients until fixed: %s", exc)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, PublicKey):
            return False
        self.refresh()
        return key.raw in self._keys

    def __len__(self) -> int:
        self.refresh()
        return len(self._keys)

    def __repr__(self) -> str:
        where = f"path={str(self.path)!r}, " if self.path else ""
        return f"Allowlist({where}{len(self._keys)} keys)"
