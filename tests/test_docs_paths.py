"""Every repository path the docs name in backticks (`edge/_client.py`, `tether/cli/`) exists.

A file that moves leaves its old path behind in prose; this catches it. A path is a
backticked token of path characters with at least one `/` whose first part is a top-level
folder of the checkout. `*` is a glob that must match a file; a path with the placeholder
``NAME`` (a file a run writes) needs only its folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted(ROOT.glob("docs/*.md")) + [ROOT / "README.md"]
_PATH = re.compile(r"`([A-Za-z0-9_.*-]+(?:/[A-Za-z0-9_.*-]+)+/?)`")
_PLACEHOLDERS = ("NAME",)


def _top_folders(root: Path) -> frozenset[str]:
    return frozenset(
        p.name for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in {"build", "dist"}
        and not p.name.endswith(".egg-info")
    )


def missing_paths(text: str, root: Path, tops: frozenset[str]) -> list[str]:
    """The backticked repository paths in `text` that match nothing under `root`."""
    missing = []
    for m in _PATH.finditer(text):
        path = m.group(1)
        if path.split("/", 1)[0] not in tops:
            continue  # not a repository path (a URL piece, a package name, a mime type)
        pattern = path.rstrip("/")
        if any(word in pattern for word in _PLACEHOLDERS):
            # A template for a file a run creates (`results/protocol-NAME.json`): its folder exists.
            found = (root / pattern).parent.is_dir()
        else:
            found = any(root.glob(pattern)) if "*" in pattern else (root / pattern).exists()
        if not found:
            missing.append(path)
    return missing


def test_the_check_catches_a_moved_file(tmp_path: Path) -> None:
    (tmp_path / "edge").mkdir()
    (tmp_path / "edge" / "_client.py").write_text("")
    text = ("see `edge/_client.py`, `edge/_gone.py`, `edge/`, `edge/_c*.py`, `edge/_x*.py`, `edge/NAME.json`, "
            "`edge/gone/NAME.json` and `text/plain`")
    assert missing_paths(text, tmp_path, frozenset({"edge"})) == ["edge/_gone.py", "edge/_x*.py", "edge/gone/NAME.json"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_name_only_existing_paths(doc: Path) -> None:
    missing = missing_paths(doc.read_text(encoding="utf-8"), ROOT, _top_folders(ROOT))
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {missing}"
